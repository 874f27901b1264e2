// CPU kernels of the fused triplane decoder. The per-point math is decoding_math.h
// (the MLP) and triplanes_math.h (the bilinear stencils), the functions the CUDA
// kernels call.
//
// Forward: one task per point: gather the 12 texels into the mean feature, run the
// MLP with the packed weights (a few tens of KB, cache-resident), write rgb and sigma.
// Backward: points are processed in chunks. Within a chunk, a fixed number of tasks
// (one per thread) each recompute their points' features and MLP, backpropagate, and
// add the weight gradients to the task's own accumulators (summed at the end: no
// atomics, and the result does not depend on scheduling; two-level sums, over blocks of
// 256 points and then over the blocks, keep float32 rounding small); grad_points is written per
// point; dL/df of the chunk goes to a small buffer that a second pass scatters into
// grad_planes split by (batch, plane, band of rows), as sample_triplanes' CPU backward
// does, so that no two tasks write the same texel.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>


#include "../triplanes/triplanes.h"
#include "decoding.h"
#include "decoding_math.h"
#include "../cpu_dispatch.h"

namespace head4d {
namespace decoding {
namespace {

using triplanes::corner_texel;
using triplanes::make_stencil;
using triplanes::project;
using triplanes::Stencil;
using triplanes::value_without_corners;

constexpr int64_t kChunkPoints = int64_t(1) << 16;  // points per backward chunk (bounds the dL/df buffer)
constexpr int64_t kBlockPoints = 256;  // weight gradients: summed per block of points, then the blocks

template <int KC, int KO, typename A>
std::vector<A> pack(const Weights& w, int C, int hidden, int outputs) {
  const Packing<KC, KO> pk{hidden};
  std::vector<A> packed(static_cast<size_t>(pk.size()));
  const auto* w1 = static_cast<const A*>(w.w1);
  const auto* b1 = static_cast<const A*>(w.b1);
  const auto* w2 = static_cast<const A*>(w.w2);
  const auto* b2 = static_cast<const A*>(w.b2);
  for (int64_t i = 0; i < pk.size(); ++i)
    packed[static_cast<size_t>(i)] = packed_value<KC, KO>(w1, b1, w2, b2, i, C, hidden, outputs);
  return packed;
}

// The mean over the three planes of the bilinear samples at point p (batch n); zero
// past channel C. Per plane the four taps are summed first, then the planes, then /3,
// as sample_triplanes computes it.
template <int KC, typename scalar_t, typename A>
void gather_mean(const scalar_t* planes, int64_t n, const A p[3], A scale, int layout, int64_t C, int64_t H,
                 int64_t W, A (&f)[KC]) {
  const int64_t plane_size = H * W * C;
  A value[KC];
  for (int c = 0; c < KC; ++c) f[c] = A(0);
  for (int k = 0; k < 3; ++k) {
    A u, v;
    project(p, scale, layout, k, u, v);
    Stencil<A> st;
    if (!make_stencil(u, v, static_cast<int>(W), static_cast<int>(H), st)) {
      const A miss = value_without_corners(u, v);  // 0, or NaN for a non-finite coordinate
      for (int c = 0; c < KC; ++c) f[c] += miss;
      continue;
    }
    for (int c = 0; c < KC; ++c) value[c] = A(0);
    const scalar_t* base = planes + (n * 3 + k) * plane_size;
    for (int corner = 0; corner < 4; ++corner) {
      if (!st.in[corner]) continue;
      const scalar_t* texel = base + corner_texel(st, corner, static_cast<int>(W)) * C;
      const A w = st.w[corner];
      for (int64_t c = 0; c < C; ++c) value[c] += w * static_cast<A>(texel[c]);
    }
    for (int c = 0; c < KC; ++c) f[c] += value[c];
  }
  for (int c = 0; c < KC; ++c) f[c] = f[c] / A(3);
}

template <typename scalar_t, typename A, int KC, int KO>
void forward_impl(const ForwardArgs& a, const ParallelFor& parallel_for) {
  const auto* planes = static_cast<const scalar_t*>(a.planes);
  const auto* points = static_cast<const A*>(a.points);
  auto* rgb = static_cast<scalar_t*>(a.rgb);
  auto* sigma = static_cast<scalar_t*>(a.sigma);
  const int64_t M = a.M, C = a.C, H = a.H, W = a.W;
  const int hidden = static_cast<int>(a.hidden), outputs = static_cast<int>(a.outputs);
  const int64_t co = a.outputs - 1;
  const A scale = static_cast<A>(a.scale);
  const std::vector<A> packed = pack<KC, KO, A>(a.weights, static_cast<int>(C), hidden, outputs);

  parallel_for(a.N * M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
      A f[KC];
      gather_mean<KC>(planes, i / M, p, scale, a.layout, C, H, W, f);
      A o[KO];
      mlp_forward<KC, KO>(packed.data(), hidden, f, o);
      outputs_to_rgb(o);
      sigma[i] = static_cast<scalar_t>(o[0]);
      for (int64_t k = 1; k <= co; ++k) rgb[i * co + k - 1] = static_cast<scalar_t>(o[k]);
    }
  });
}

template <typename scalar_t, typename A, int KC, int KO>
void backward_impl(const BackwardArgs& a, const ParallelFor& parallel_for, int num_threads) {
  const auto* grad_rgb = static_cast<const A*>(a.grad_rgb);
  const auto* grad_sigma = static_cast<const A*>(a.grad_sigma);
  const auto* planes = static_cast<const scalar_t*>(a.planes);
  const auto* points = static_cast<const A*>(a.points);
  auto* grad_planes = static_cast<A*>(a.grad_planes);
  auto* grad_points = static_cast<A*>(a.grad_points);
  const int64_t N = a.N, M = a.M, C = a.C, H = a.H, W = a.W;
  const int hidden = static_cast<int>(a.hidden), outputs = static_cast<int>(a.outputs);
  const int64_t Hd = a.hidden, O = a.outputs, co = a.outputs - 1;
  const int64_t plane_size = H * W * C;
  const A scale = static_cast<A>(a.scale);
  const std::vector<A> packed = pack<KC, KO, A>(a.weights, static_cast<int>(C), hidden, outputs);

  const bool need_w1 = a.grad_w1 != nullptr, need_b1 = a.grad_b1 != nullptr;
  const bool need_w2 = a.grad_w2 != nullptr, need_b2 = a.grad_b2 != nullptr;
  const bool need_weights = need_w1 || need_b1 || need_w2 || need_b2;
  const bool need_gf = grad_planes != nullptr || grad_points != nullptr;

  // Per-task accumulators of the weight gradients: [w1 | b1 | w2 | b2] each.
  const int64_t off_b1 = Hd * C, off_w2 = off_b1 + Hd, off_b2 = off_w2 + O * Hd, wsize = off_b2 + O;
  const int64_t tasks = std::max(1, num_threads);
  std::vector<A> partial(need_weights ? static_cast<size_t>(tasks * wsize) : 0, A(0));
  std::vector<A> block_sums(need_weights ? static_cast<size_t>(tasks * wsize) : 0, A(0));

  const int64_t total = N * M;
  const int64_t chunk = grad_planes != nullptr ? std::min(total, kChunkPoints) : total;
  std::vector<A> gf_buffer(grad_planes != nullptr ? static_cast<size_t>(chunk * C) : 0);

  for (int64_t start = 0; start < total; start += chunk) {
    const int64_t stop = std::min(total, start + chunk), len = stop - start;

    parallel_for(tasks, 1, [&](int64_t task_begin, int64_t task_end) {
      A h[kMaxHidden];
      A gz[kMaxHidden];
      for (int64_t task = task_begin; task < task_end; ++task) {
        A* total_acc = need_weights ? partial.data() + task * wsize : nullptr;
        A* acc = need_weights ? block_sums.data() + task * wsize : nullptr;
        const int64_t lo = start + len * task / tasks, hi = start + len * (task + 1) / tasks;
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t n = i / M;
          const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
          A f[KC];
          gather_mean<KC>(planes, n, p, scale, a.layout, C, H, W, f);
          A o[KO];
          mlp_forward<KC, KO>(packed.data(), hidden, f, o);
          A g[KO];
          for (int k = 0; k < KO; ++k) g[k] = A(0);
          if (grad_sigma != nullptr) g[0] = grad_sigma[i];
          if (grad_rgb != nullptr)
            for (int64_t k = 1; k <= co; ++k) g[k] = grad_rgb[i * co + k - 1];
          output_grads(o, g);
          A gf[KC];
          mlp_backward<KC, KO>(packed.data(), hidden, f, g, need_gf, gf, need_w2 ? h : nullptr,
                               (need_w1 || need_b1) ? gz : nullptr, 1);

          if (need_w1) {
            for (int64_t j = 0; j < Hd; ++j) {
              A* row = acc + j * C;
              const A v = gz[j];
              for (int64_t c = 0; c < C; ++c) row[c] += v * f[c];
            }
          }
          if (need_b1)
            for (int64_t j = 0; j < Hd; ++j) acc[off_b1 + j] += gz[j];
          if (need_w2) {
            for (int64_t k = 0; k < O; ++k) {
              A* row = acc + off_w2 + k * Hd;
              const A v = g[k];
              for (int64_t j = 0; j < Hd; ++j) row[j] += v * h[j];
            }
          }
          if (need_b2)
            for (int64_t k = 0; k < O; ++k) acc[off_b2 + k] += g[k];
          if (need_weights && ((i - lo + 1) % kBlockPoints == 0 || i + 1 == hi)) {
            for (int64_t idx = 0; idx < wsize; ++idx) {  // the block's sums into the task's totals
              total_acc[idx] += acc[idx];
              acc[idx] = A(0);
            }
          }
          if (!need_gf) continue;

          for (int c = 0; c < KC; ++c) gf[c] = gf[c] / A(3);  // the mean's backward
          if (grad_planes != nullptr) {
            A* dst = gf_buffer.data() + (i - start) * C;
            for (int64_t c = 0; c < C; ++c) dst[c] = gf[c];
          }
          if (grad_points != nullptr) {
            A grad_p[3] = {A(0), A(0), A(0)};
            for (int k = 0; k < 3; ++k) {
              A u, v;
              project(p, scale, a.layout, k, u, v);
              Stencil<A> st;
              if (!make_stencil(u, v, static_cast<int>(W), static_cast<int>(H), st)) continue;
              A dw_dix[4], dw_diy[4];
              triplanes::stencil_weight_grads(st, dw_dix, dw_diy);
              const scalar_t* base = planes + (n * 3 + k) * plane_size;
              A g_ix = A(0), g_iy = A(0);
              for (int corner = 0; corner < 4; ++corner) {
                if (!st.in[corner]) continue;
                const scalar_t* texel = base + corner_texel(st, corner, static_cast<int>(W)) * C;
                A dot = A(0);
                for (int64_t c = 0; c < C; ++c) dot += gf[c] * static_cast<A>(texel[c]);
                g_ix += dot * dw_dix[corner];
                g_iy += dot * dw_diy[corner];
              }
              triplanes::accumulate_point_grad(g_ix, g_iy, static_cast<int>(W), static_cast<int>(H), scale,
                                               a.layout, k, grad_p);
            }
            for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = grad_p[d];
          }
        }
      }
    });

    if (grad_planes == nullptr) continue;
    // Scatter dL/df of the chunk: tasks (batch, plane, band of rows) over the batches
    // the chunk touches; each task writes only its own rows.
    const int64_t n_lo = start / M, n_hi = (stop - 1) / M;
    const int64_t planes_total = (n_hi - n_lo + 1) * 3;
    const int64_t bands =
        std::max<int64_t>(1, std::min<int64_t>(H, (2 * tasks + planes_total - 1) / planes_total));
    const int64_t rows_per_band = (H + bands - 1) / bands;
    parallel_for(planes_total * bands, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t nk = t / bands, band = t % bands;
        const int64_t n = n_lo + nk / 3;
        const int k = static_cast<int>(nk % 3);
        const int64_t row_lo = band * rows_per_band, row_hi = std::min(H, row_lo + rows_per_band);
        A* base = grad_planes + (n * 3 + k) * plane_size;
        const int64_t i_lo = std::max(start, n * M), i_hi = std::min(stop, (n + 1) * M);
        for (int64_t i = i_lo; i < i_hi; ++i) {
          const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
          A u, v;
          project(p, scale, a.layout, k, u, v);
          Stencil<A> st;
          if (!make_stencil(u, v, static_cast<int>(W), static_cast<int>(H), st)) continue;
          if (st.y0 + 1 < row_lo || st.y0 >= row_hi) continue;
          const A* g = gf_buffer.data() + (i - start) * C;
          for (int corner = 0; corner < 4; ++corner) {
            const int64_t row = st.y0 + (corner >> 1);
            if (!st.in[corner] || row < row_lo || row >= row_hi) continue;
            A* texel = base + corner_texel(st, corner, static_cast<int>(W)) * C;
            const A w = st.w[corner];
            for (int64_t c = 0; c < C; ++c) texel[c] += w * g[c];
          }
        }
      }
    });
  }

  if (!need_weights) return;
  // Sum the per-task accumulators into the outputs, in task order.
  A* outs[4] = {static_cast<A*>(a.grad_w1), static_cast<A*>(a.grad_b1), static_cast<A*>(a.grad_w2),
                static_cast<A*>(a.grad_b2)};
  const int64_t offsets[5] = {0, off_b1, off_w2, off_b2, wsize};
  parallel_for(wsize, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      int part = 0;
      while (idx >= offsets[part + 1]) ++part;
      A* out = outs[part];
      if (out == nullptr) continue;
      A sum = A(0);
      for (int64_t t = 0; t < tasks; ++t) sum += partial[static_cast<size_t>(t * wsize + idx)];
      out[idx - offsets[part]] = sum;
    }
  });
}

// Picks the compile-time bounds KC >= C and KO >= O.
template <typename Fn>
void with_bounds(int64_t C, int64_t O, Fn&& fn) {
  if (C <= 32) {
    if (O <= 36) return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 36>{});
    return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, kMaxOutputs>{});
  }
  if (O <= 36) return fn(std::integral_constant<int, kMaxFeatures>{}, std::integral_constant<int, 36>{});
  return fn(std::integral_constant<int, kMaxFeatures>{}, std::integral_constant<int, kMaxOutputs>{});
}

void check_sizes(int64_t C, int64_t hidden, int64_t outputs) {
  if (C < 1 || C > kMaxFeatures || hidden < 1 || hidden > kMaxHidden || outputs < 1 || outputs > kMaxOutputs)
    throw std::invalid_argument("decode_triplanes: unsupported sizes");
}

}  // namespace

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for) {
  check_sizes(args.C, args.hidden, args.outputs);
  if (args.N * args.M == 0) return;
  with_cpu_storage_type(args.dtype, "decode_triplanes", [&](auto storage, auto accumulate) {
    using scalar_t = decltype(storage);
    using A = decltype(accumulate);
    with_bounds(args.C, args.outputs, [&](auto kc, auto ko) {
      forward_impl<scalar_t, A, decltype(kc)::value, decltype(ko)::value>(args, parallel_for);
    });
  });
}

void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for, int num_threads) {
  check_sizes(args.C, args.hidden, args.outputs);
  if (args.N * args.M == 0) return;
  with_cpu_storage_type(args.dtype, "decode_triplanes", [&](auto storage, auto accumulate) {
    using scalar_t = decltype(storage);
    using A = decltype(accumulate);
    with_bounds(args.C, args.outputs, [&](auto kc, auto ko) {
      backward_impl<scalar_t, A, decltype(kc)::value, decltype(ko)::value>(args, parallel_for, num_threads);
    });
  });
}

}  // namespace decoding
}  // namespace head4d
