// CUDA kernels of the one-ring deformation. The per-point math is onering_math.h, the
// same functions the CPU kernels call; this file owns the memory traffic.
//
// Forward: one thread per point; a block's points all belong to one batch element.
// The candidate vertices go through shared memory in tiles of kTile (one 16-byte
// record per vertex: x, y, z and its index): the block loads a tile cooperatively,
// then every thread scans all of it. The scan is exact brute force, which for a few
// thousand candidates (Portrait4D's face set: ~4,000; eyes: ~1,100) costs about ten
// instructions per (point, candidate) pair with all operands in registers or broadcast
// from shared memory. The chosen vertex is saved (int32) for the backward.
// Backward: one thread per point, from the saved vertex; the vertex gradients are
// float32 (float64) atomics into [N, V, 3].

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "../cuda_launch.cuh"
#include "onering.h"
#include "onering_math.h"

namespace head4d {
namespace onering {
namespace {

constexpr const char* kOp = "one_ring_deform";

constexpr int kThreads = 256;
constexpr int kTile = 256;

template <typename A>
struct __align__(16) Candidate {
  A x, y, z;
  int32_t v;
};

template <typename A>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const A* __restrict__ points, const A* __restrict__ verts_obs, const A* __restrict__ verts_canon,
                   const int32_t* __restrict__ neighbours, const int32_t* __restrict__ subset, A* __restrict__ out,
                   int32_t* __restrict__ nearest, int64_t M, int64_t V, int64_t K, int64_t S,
                   int64_t blocks_per_item) {
  __shared__ Candidate<A> tile[kTile];
  const int64_t n = blockIdx.x / blocks_per_item;
  const int64_t m = (blockIdx.x - n * blocks_per_item) * static_cast<int64_t>(kThreads) + threadIdx.x;
  const bool active = m < M;
  const int64_t i = n * M + m;
  A p[3] = {A(0), A(0), A(0)};
  if (active) {
    p[0] = points[i * 3 + 0];
    p[1] = points[i * 3 + 1];
    p[2] = points[i * 3 + 2];
  }
  const A* vo = verts_obs + n * V * 3;
  const A* vc = verts_canon + n * V * 3;

  A best = A(INFINITY);
  int32_t best_v = 0x7fffffff;
  for (int64_t t0 = 0; t0 < S; t0 += kTile) {
    const int count = static_cast<int>(S - t0 < kTile ? S - t0 : kTile);
    __syncthreads();  // the previous tile has been scanned by every thread
    for (int j = threadIdx.x; j < count; j += kThreads) {
      const int32_t v = subset != nullptr ? subset[t0 + j] : static_cast<int32_t>(t0 + j);
      Candidate<A> c;
      if (is_vertex(v, V)) {
        const A* q = vo + static_cast<int64_t>(v) * 3;
        c.x = q[0];
        c.y = q[1];
        c.z = q[2];
        c.v = v;
      } else {  // cannot win against a real vertex (invalid input only)
        c.x = c.y = c.z = A(INFINITY);
        c.v = 0x7fffffff;
      }
      tile[j] = c;
    }
    __syncthreads();
    if (active) {
#pragma unroll 8
      for (int j = 0; j < count; ++j) {
        const Candidate<A> c = tile[j];
        const A d = search_distance(p[0], p[1], p[2], c.x, c.y, c.z);
        // `!(d > best)` lets through only improvements, ties, and NaN on either side
        if (!(d > best) && nearer(d, c.v, best, best_v)) {
          best = d;
          best_v = c.v;
        }
      }
    }
  }
  if (!active) return;
  if (!is_vertex(best_v, V)) {
    nearest[i] = -1;
    for (int d = 0; d < 3; ++d) out[i * 3 + d] = A(NAN);
    return;
  }
  nearest[i] = best_v;
  A o[3];
  ring_forward(p, vo, vc, neighbours + static_cast<int64_t>(best_v) * K, K, V, o);
  out[i * 3 + 0] = o[0];
  out[i * 3 + 1] = o[1];
  out[i * 3 + 2] = o[2];
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const A* __restrict__ grad_out, const A* __restrict__ points, const A* __restrict__ verts_obs,
                    const A* __restrict__ verts_canon, const int32_t* __restrict__ neighbours,
                    const int32_t* __restrict__ nearest, A* __restrict__ grad_points, A* __restrict__ grad_obs,
                    A* __restrict__ grad_canon, int64_t N, int64_t M, int64_t V, int64_t K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * M) return;
  const int64_t n = i / M;
  const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
  const A g[3] = {grad_out[i * 3 + 0], grad_out[i * 3 + 1], grad_out[i * 3 + 2]};
  A gp[3] = {g[0], g[1], g[2]};
  const int32_t v = nearest[i];
  if (is_vertex(v, V)) {
    const A* vo = verts_obs + n * V * 3;
    const A* vc = verts_canon + n * V * 3;
    const int32_t* row = neighbours + static_cast<int64_t>(v) * K;
    A usum, abar;
    ring_stats(p, g, vo, vc, row, K, V, usum, abar);
    for (int64_t k = 0; k < K; ++k) {
      const int32_t j = row[k];
      if (!is_vertex(j, V)) continue;
      A go[3], gc[3];
      ring_entry_grads(p, g, vo + static_cast<int64_t>(j) * 3, vc + static_cast<int64_t>(j) * 3, usum, abar, gp, go,
                       gc);
      const int64_t at = (n * V + j) * 3;
      if (grad_obs != nullptr) {
#pragma unroll
        for (int d = 0; d < 3; ++d) atomicAdd(grad_obs + at + d, go[d]);
      }
      if (grad_canon != nullptr) {
#pragma unroll
        for (int d = 0; d < 3; ++d) atomicAdd(grad_canon + at + d, gc[d]);
      }
    }
  }
  if (grad_points != nullptr) {
#pragma unroll
    for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = gp[d];
  }
}

template <typename A>
void launch_forward(const ForwardArgs& a, cudaStream_t stream) {
  const int64_t per_item = (a.M + kThreads - 1) / kThreads;
  HEAD4D_LAUNCH(checked_grid(a.N * per_item, kOp), kThreads, 0, stream, forward_kernel<A>)(
      static_cast<const A*>(a.points), static_cast<const A*>(a.verts_obs), static_cast<const A*>(a.verts_canon),
      a.neighbours, a.subset, static_cast<A*>(a.out), a.nearest, a.M, a.V, a.K, a.S, per_item);
  check_launch(kOp, "forward");
}

template <typename A>
void launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  HEAD4D_LAUNCH(checked_grid((a.N * a.M + kThreads - 1) / kThreads, kOp), kThreads, 0, stream, backward_kernel<A>)(
      static_cast<const A*>(a.grad_out), static_cast<const A*>(a.points), static_cast<const A*>(a.verts_obs),
      static_cast<const A*>(a.verts_canon), a.neighbours, a.nearest, static_cast<A*>(a.grad_points),
      static_cast<A*>(a.grad_verts_obs), static_cast<A*>(a.grad_verts_canon), a.N, a.M, a.V, a.K);
  check_launch(kOp, "backward");
}

}  // namespace

void forward_cuda(const ForwardArgs& args, void* stream) {
  if (args.N * args.M == 0) return;
  switch (args.dtype) {
    case Dtype::kFloat32: return launch_forward<float>(args, static_cast<cudaStream_t>(stream));
    case Dtype::kFloat64: return launch_forward<double>(args, static_cast<cudaStream_t>(stream));
    default: break;
  }
  throw std::invalid_argument("one_ring_deform: the kernels compute in float32 or float64");
}

void backward_cuda(const BackwardArgs& args, void* stream) {
  if (args.N * args.M == 0) return;
  switch (args.dtype) {
    case Dtype::kFloat32: return launch_backward<float>(args, static_cast<cudaStream_t>(stream));
    case Dtype::kFloat64: return launch_backward<double>(args, static_cast<cudaStream_t>(stream));
    default: break;
  }
  throw std::invalid_argument("one_ring_deform: the kernels compute in float32 or float64");
}

}  // namespace onering
}  // namespace head4d
