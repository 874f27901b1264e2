// CPU kernels of volume compositing. The per-interval math is compositing_math.h,
// the same functions the CUDA kernels call.
//
// Forward: one task per ray, a single pass over its S samples carrying the
// transmittance; the channel sums accumulate in a small per-task buffer.
// Backward: one task per ray, one reverse pass over the samples that recovers T_k from
// the final transmittance the forward saved, carries U_k (compositing_math.h) and
// writes every sample's gradients.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>


#include "compositing.h"
#include "compositing_math.h"
#include "../cpu_dispatch.h"

namespace head4d {
namespace compositing {
namespace {

// g . x over C channels with 8 independent partial sums (vectorizes; the order of a
// float sum is otherwise fixed and serial).
template <typename scalar_t, typename A>
A dot(const A* g, const scalar_t* x, int64_t C) {
  A part[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int j = 0; j < 8; ++j) part[j] += g[c + j] * static_cast<A>(x[c + j]);
  }
  A sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; c < C; ++c) sum += g[c] * static_cast<A>(x[c]);
  return sum;
}

template <typename scalar_t, typename A>
void forward_impl(const ForwardArgs& a, const ParallelFor& parallel_for) {
  const auto* colors = static_cast<const scalar_t*>(a.colors);
  const auto* densities = static_cast<const scalar_t*>(a.densities);
  const auto* depths = static_cast<const scalar_t*>(a.depths);
  const auto* background = static_cast<const scalar_t*>(a.background);
  auto* rgb = static_cast<scalar_t*>(a.rgb);
  auto* depth = static_cast<scalar_t*>(a.depth);
  auto* weights = static_cast<scalar_t*>(a.weights);
  auto* aux = static_cast<A*>(a.aux);
  const int64_t S = a.S, C = a.C;
  const A lo = *static_cast<const A*>(a.depth_min), hi = *static_cast<const A*>(a.depth_max);
  const int64_t grain = std::max<int64_t>(1, 4096 / (S * (C + 2)));

  parallel_for(a.rays, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(static_cast<size_t>(C));
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* col = colors + r * S * C;
      const scalar_t* dens = densities + r * S;
      const scalar_t* dep = depths + r * S;
      std::fill(acc.begin(), acc.end(), A(0));
      A trans = A(1), total = A(0), dsum = A(0);
      ScaledTransmittance<A> scaled;  // the same product, for the backward's reverse scan
      A s0 = static_cast<A>(dens[0]), t0 = static_cast<A>(dep[0]);
      for (int64_t k = 0; k + 1 < S; ++k) {
        const A s1 = static_cast<A>(dens[k + 1]), t1 = static_cast<A>(dep[k + 1]);
        const Interval<A> iv = make_interval(s0, s1, t0, t1);
        const A w = iv.alpha * trans;
        trans = trans * iv.keep;
        scaled.multiply(iv.keep);
        weights[r * (S - 1) + k] = static_cast<scalar_t>(w);
        total += w;
        dsum += w * midpoint(t0, t1);
        const scalar_t* c0 = col + k * C;
        const scalar_t* c1 = c0 + C;
        for (int64_t c = 0; c < C; ++c) acc[c] += w * midpoint(static_cast<A>(c0[c]), static_cast<A>(c1[c]));
        s0 = s1;
        t0 = t1;
      }
      const A raw = dsum / total;
      aux[r * kAux + 0] = total;
      aux[r * kAux + 1] = raw;
      aux[r * kAux + 2] = scaled.m;
      aux[r * kAux + 3] = static_cast<A>(scaled.e);
      depth[r] = static_cast<scalar_t>(final_depth(raw, lo, hi));
      for (int64_t c = 0; c < C; ++c) {
        const A bg = a.background_mode == kTensor ? static_cast<A>(background[r * C + c]) : A(0);
        rgb[r * C + c] = static_cast<scalar_t>(final_rgb(acc[c], total, a.background_mode, bg));
      }
    }
  });
}

template <typename scalar_t, typename A>
void backward_impl(const BackwardArgs& a, const ParallelFor& parallel_for) {
  const auto* grad_rgb = static_cast<const A*>(a.grad_rgb);
  const auto* grad_depth = static_cast<const A*>(a.grad_depth);
  const auto* grad_weights = static_cast<const A*>(a.grad_weights);
  const auto* colors = static_cast<const scalar_t*>(a.colors);
  const auto* densities = static_cast<const scalar_t*>(a.densities);
  const auto* depths = static_cast<const scalar_t*>(a.depths);
  const auto* background = static_cast<const scalar_t*>(a.background);
  const auto* aux = static_cast<const A*>(a.aux);
  auto* grad_colors = static_cast<A*>(a.grad_colors);
  auto* grad_densities = static_cast<A*>(a.grad_densities);
  auto* grad_depths = static_cast<A*>(a.grad_depths);
  auto* grad_background = static_cast<A*>(a.grad_background);
  const int64_t S = a.S, C = a.C;
  const A lo = *static_cast<const A*>(a.depth_min), hi = *static_cast<const A*>(a.depth_max);
  const int64_t grain = std::max<int64_t>(1, 4096 / (S * (C + 2)));

  parallel_for(a.rays, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* col = colors + r * S * C;
      const scalar_t* dens = densities + r * S;
      const scalar_t* dep = depths + r * S;
      const A* g = grad_rgb + r * C;
      const A total = aux[r * kAux + 0], raw = aux[r * kAux + 1];

      A g_bg = A(0);  // g . background
      for (int64_t c = 0; c < C; ++c) {
        if (a.background_mode == kWhite) g_bg += g[c];
        else if (a.background_mode == kTensor) g_bg += g[c] * static_cast<A>(background[r * C + c]);
      }
      if (grad_background != nullptr) {
        for (int64_t c = 0; c < C; ++c) grad_background[r * C + c] = A(2) * g[c] * (A(1) - total);
      }
      const A dcoef = depth_coefficient(grad_depth != nullptr, grad_depth ? grad_depth[r] : A(0), raw, total,
                                        lo, hi);
      const A* gw = grad_weights ? grad_weights + r * (S - 1) : nullptr;

      ReverseScan<A> scan;  // from the final transmittance, as the forward left it
      scan.trans.m = aux[r * kAux + 2];
      scan.trans.e = static_cast<int>(aux[r * kAux + 3]);
      A* gc = grad_colors + r * S * C;
      A* gs = grad_densities + r * S;
      A* gt = grad_depths + r * S;
      A s1 = static_cast<A>(dens[S - 1]), t1 = static_cast<A>(dep[S - 1]);
      A p1 = dot(g, col + (S - 1) * C, C);  // g . c[k + 1]
      for (int64_t k = S - 2; k >= 0; --k) {
        const A s0 = static_cast<A>(dens[k]), t0 = static_cast<A>(dep[k]);
        const A p0 = dot(g, col + k * C, C);
        const auto out = scan.step(s0, s1, t0, t1, p0, p1, g_bg, dcoef, raw, gw != nullptr ? gw + k : nullptr);
        gs[k + 1] = out.density;
        gt[k + 1] = out.depth;
        for (int64_t c = 0; c < C; ++c) gc[(k + 1) * C + c] = out.color_weight * g[c];
        s1 = s0;
        t1 = t0;
        p1 = p0;
      }
      const auto first = scan.finish();
      gs[0] = first.density;
      gt[0] = first.depth;
      for (int64_t c = 0; c < C; ++c) gc[c] = first.color_weight * g[c];
    }
  });
}

}  // namespace

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for) {
  if (args.rays == 0) return;
  with_cpu_storage_type(args.dtype, "composite_rays", [&](auto s, auto acc) {
    forward_impl<decltype(s), decltype(acc)>(args, parallel_for);
  });
}

void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for) {
  if (args.rays == 0) return;
  with_cpu_storage_type(args.dtype, "composite_rays", [&](auto s, auto acc) {
    backward_impl<decltype(s), decltype(acc)>(args, parallel_for);
  });
}

}  // namespace compositing
}  // namespace head4d
