// CPU kernels of the one-ring deformation. The per-point math is onering_math.h, the
// same functions the CUDA kernels call.
//
// Forward: one task per point. The nearest-vertex search is brute force over the
// candidates, gathered once per batch element into coordinate arrays sorted by vertex
// index. Distances are computed 8 at a time in 16-byte vectors and compared with the
// best so far; only a block that holds a smaller one is walked in order (a strict `<`
// over ascending positions keeps the lowest index among ties). About 5 instructions
// per (point, candidate) pair on SSE2. Non-finite points or candidates, and points whose
// distances all overflow, go through the exact scalar rule (onering_math.h, nearer).
// Backward: one task per contiguous range of points, each with private [N, V, 3]
// buffers for the vertex gradients (task 0 writes the outputs), summed in task order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "onering.h"
#include "onering_math.h"

// The nearest-vertex search must round every product and sum on its own, as the
// reference does (onering_math.h): no contraction into fused multiply-adds, even when
// the compiler targets a CPU that has them.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#define HEAD4D_NO_CONTRACT
#elif defined(__GNUC__)
#define HEAD4D_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define HEAD4D_NO_CONTRACT
#endif

namespace head4d {
namespace onering {
namespace {

constexpr int64_t kMinPointsPerTask = 1024;
constexpr int64_t kMaxBufferElements = 1 << 24;

// Candidates of one batch element, structure of arrays, ascending vertex index.
template <typename A>
struct Candidates {
  const A* x;
  const A* y;
  const A* z;
  const int32_t* v;
  int64_t S;
  bool finite;  // all coordinates finite
};

// The exact rule, one candidate at a time.
template <typename A>
HEAD4D_NO_CONTRACT int32_t nearest_exact(const A p[3], const Candidates<A>& c) {
  A best = std::numeric_limits<A>::infinity();
  int32_t best_v = std::numeric_limits<int32_t>::max();
  for (int64_t s = 0; s < c.S; ++s) {
    const A d = search_distance(p[0], p[1], p[2], c.x[s], c.y[s], c.z[s]);
    if (nearer(d, c.v[s], best, best_v)) {
      best = d;
      best_v = c.v[s];
    }
  }
  return best_v;
}

// 16-byte vectors of A and of lane-width integers, as GCC / Clang vector extensions
// (SSE2 on x86-64, NEON on AArch64).
template <typename A>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};
template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(16)));
  typedef int64_t I __attribute__((vector_size(16)));
};

// Whether any lane of a comparison mask is set.
template <typename I>
inline bool any_lane(I mask) {
#if defined(__SSE2__)
  return _mm_movemask_epi8(reinterpret_cast<__m128i>(mask)) != 0;
#else
  uint64_t w[2];
  std::memcpy(w, &mask, sizeof(w));
  return (w[0] | w[1]) != 0;
#endif
}

template <typename A>
inline bool finite3(const A p[3]) {
  return std::isfinite(p[0]) && std::isfinite(p[1]) && std::isfinite(p[2]);
}

// The nearest candidate, for a finite point among finite candidates (so no distance is
// NaN). Blocks of 2 vectors of distances are compared with the best so far; the rare
// block that holds a smaller one is walked in order, and a strict `<` over ascending
// positions keeps the lowest vertex index among ties. Anything else (non-finite input,
// or every distance +inf) goes to nearest_exact.
template <typename A>
HEAD4D_NO_CONTRACT int32_t nearest_vertex(const A p[3], const Candidates<A>& c) {
  if (!c.finite || !finite3(p)) return nearest_exact(p, c);
  using V = typename Lanes<A>::V;
  using I = typename Lanes<A>::I;
  constexpr int L = static_cast<int>(sizeof(V) / sizeof(A));
  constexpr int U = 2;  // vectors per block
  const V px = V{} + p[0], py = V{} + p[1], pz = V{} + p[2];
  A best = std::numeric_limits<A>::infinity();
  V vbest = V{} + best;
  int64_t pos = -1;
  int64_t s = 0;
  for (; s + U * L <= c.S; s += U * L) {
    V d[U];
    I lower = I{};
    for (int u = 0; u < U; ++u) {
      V x, y, z;
      std::memcpy(&x, c.x + s + u * L, sizeof(V));
      std::memcpy(&y, c.y + s + u * L, sizeof(V));
      std::memcpy(&z, c.z + s + u * L, sizeof(V));
      const V dx = px - x, dy = py - y, dz = pz - z;
      d[u] = (dx * dx + dy * dy) + dz * dz;  // as search_distance, lane-wise
      lower |= d[u] < vbest;
    }
    if (any_lane(lower)) {
      for (int u = 0; u < U; ++u) {
        for (int j = 0; j < L; ++j) {
          if (d[u][j] < best) {
            best = d[u][j];
            pos = s + u * L + j;
          }
        }
      }
      vbest = V{} + best;
    }
  }
  for (; s < c.S; ++s) {  // the tail
    const A d = search_distance(p[0], p[1], p[2], c.x[s], c.y[s], c.z[s]);
    if (d < best) {
      best = d;
      pos = s;
    }
  }
  if (pos < 0) return nearest_exact(p, c);
  return c.v[pos];
}

template <typename A>
void forward_impl(const ForwardArgs& a, const ParallelFor& parallel_for) {
  const auto* points = static_cast<const A*>(a.points);
  const auto* vo = static_cast<const A*>(a.verts_obs);
  const auto* vc = static_cast<const A*>(a.verts_canon);
  auto* out = static_cast<A*>(a.out);
  const int64_t N = a.N, M = a.M, V = a.V, K = a.K;

  // the candidates: sorted valid vertex indices (invalid subset entries dropped)
  std::vector<int32_t> order;
  if (a.subset != nullptr) {
    order.reserve(static_cast<size_t>(a.S));
    for (int64_t s = 0; s < a.S; ++s)
      if (is_vertex(a.subset[s], V)) order.push_back(a.subset[s]);
    std::sort(order.begin(), order.end());
  } else {
    order.resize(static_cast<size_t>(V));
    for (int64_t v = 0; v < V; ++v) order[static_cast<size_t>(v)] = static_cast<int32_t>(v);
  }
  const int64_t S = static_cast<int64_t>(order.size());
  std::vector<A> coords(static_cast<size_t>(N * S * 3));
  std::vector<char> finite(static_cast<size_t>(N), 1);
  for (int64_t n = 0; n < N; ++n) {
    A* cx = coords.data() + n * S * 3;
    for (int64_t s = 0; s < S; ++s) {
      const A* v = vo + (n * V + order[static_cast<size_t>(s)]) * 3;
      cx[s] = v[0];
      cx[S + s] = v[1];
      cx[2 * S + s] = v[2];
      if (!finite3(v)) finite[static_cast<size_t>(n)] = 0;
    }
  }

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1));
  parallel_for(N * M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / M;
      const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
      const A* cx = coords.data() + n * S * 3;
      const Candidates<A> cand{cx, cx + S, cx + 2 * S, order.data(), S, finite[static_cast<size_t>(n)] != 0};
      const int32_t v = S > 0 ? nearest_vertex(p, cand) : -1;
      a.nearest[i] = is_vertex(v, V) ? v : -1;
      if (!is_vertex(v, V)) {
        for (int d = 0; d < 3; ++d) out[i * 3 + d] = std::numeric_limits<A>::quiet_NaN();
        continue;
      }
      A o[3];
      ring_forward(p, vo + n * V * 3, vc + n * V * 3, a.neighbours + static_cast<int64_t>(v) * K, K, V, o);
      for (int d = 0; d < 3; ++d) out[i * 3 + d] = o[d];
    }
  });
}

template <typename A>
void backward_impl(const BackwardArgs& a, const ParallelFor& parallel_for, int num_threads) {
  const auto* grad_out = static_cast<const A*>(a.grad_out);
  const auto* points = static_cast<const A*>(a.points);
  const auto* vo = static_cast<const A*>(a.verts_obs);
  const auto* vc = static_cast<const A*>(a.verts_canon);
  auto* grad_points = static_cast<A*>(a.grad_points);
  auto* grad_obs = static_cast<A*>(a.grad_verts_obs);
  auto* grad_canon = static_cast<A*>(a.grad_verts_canon);
  const int64_t N = a.N, M = a.M, V = a.V, K = a.K;
  const int64_t P = N * M;
  const int64_t verts_numel = N * V * 3;
  const int64_t per_task = (grad_obs != nullptr ? verts_numel : 0) + (grad_canon != nullptr ? verts_numel : 0);

  int64_t tasks = std::min<int64_t>(std::max(num_threads, 1), std::max<int64_t>(1, P / kMinPointsPerTask));
  if (per_task > 0) tasks = std::min<int64_t>(tasks, std::max<int64_t>(1, kMaxBufferElements / per_task + 1));
  else tasks = std::min<int64_t>(std::max(num_threads, 1), std::max<int64_t>(1, P / 64));
  std::unique_ptr<A[]> buffers(tasks > 1 && per_task > 0 ? new A[(tasks - 1) * per_task] : nullptr);

  parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      A* g_obs = grad_obs;
      A* g_canon = grad_canon;
      if (t > 0 && per_task > 0) {
        A* buf = buffers.get() + (t - 1) * per_task;
        std::fill(buf, buf + per_task, A(0));
        if (grad_obs != nullptr) {
          g_obs = buf;
          buf += verts_numel;
        }
        if (grad_canon != nullptr) g_canon = buf;
      }
      const int64_t lo = t * P / tasks, hi = (t + 1) * P / tasks;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t n = i / M;
        const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
        const A g[3] = {grad_out[i * 3 + 0], grad_out[i * 3 + 1], grad_out[i * 3 + 2]};
        A gp[3] = {g[0], g[1], g[2]};
        const int32_t v = a.nearest[i];
        if (is_vertex(v, V)) {
          const A* vo_n = vo + n * V * 3;
          const A* vc_n = vc + n * V * 3;
          const int32_t* row = a.neighbours + static_cast<int64_t>(v) * K;
          A usum, abar;
          ring_stats(p, g, vo_n, vc_n, row, K, V, usum, abar);
          for (int64_t k = 0; k < K; ++k) {
            const int32_t j = row[k];
            if (!is_vertex(j, V)) continue;
            A go[3], gc[3];
            ring_entry_grads(p, g, vo_n + static_cast<int64_t>(j) * 3, vc_n + static_cast<int64_t>(j) * 3, usum,
                             abar, gp, go, gc);
            const int64_t at = (n * V + j) * 3;
            if (g_obs != nullptr)
              for (int d = 0; d < 3; ++d) g_obs[at + d] += go[d];
            if (g_canon != nullptr)
              for (int d = 0; d < 3; ++d) g_canon[at + d] += gc[d];
          }
        }
        if (grad_points != nullptr)
          for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = gp[d];
      }
    }
  });

  if (tasks > 1 && per_task > 0) {
    parallel_for(verts_numel, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t t = 1; t < tasks; ++t) {
        const A* buf = buffers.get() + (t - 1) * per_task;
        if (grad_obs != nullptr) {
          for (int64_t e = begin; e < end; ++e) grad_obs[e] += buf[e];
          buf += verts_numel;
        }
        if (grad_canon != nullptr)
          for (int64_t e = begin; e < end; ++e) grad_canon[e] += buf[e];
      }
    });
  }
}

}  // namespace

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for) {
  if (args.N * args.M == 0) return;
  switch (args.dtype) {
    case Dtype::kFloat32: return forward_impl<float>(args, parallel_for);
    case Dtype::kFloat64: return forward_impl<double>(args, parallel_for);
    default: break;
  }
  throw std::invalid_argument("one_ring_deform: the kernels compute in float32 or float64");
}

void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for, int num_threads) {
  if (args.N * args.M == 0) return;
  switch (args.dtype) {
    case Dtype::kFloat32: return backward_impl<float>(args, parallel_for, num_threads);
    case Dtype::kFloat64: return backward_impl<double>(args, parallel_for, num_threads);
    default: break;
  }
  throw std::invalid_argument("one_ring_deform: the kernels compute in float32 or float64");
}

}  // namespace onering
}  // namespace head4d
