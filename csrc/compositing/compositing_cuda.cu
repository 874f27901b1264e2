// CUDA kernels of volume compositing. The per-interval math is compositing_math.h,
// the same functions the CPU kernels call; this file owns the memory traffic.
//
// Forward: one thread per ray. The channel sums live in registers, CHUNK channels at a
// time (CHUNK * sizeof(T) = 32 bytes, one sector per sample read); for C > CHUNK the
// scan over the samples is repeated per chunk (it reads only a density and a depth per
// sample and costs an exp and a log1p, cheap next to the colors). The weights, the
// depth and the per-ray aux values are written by the first chunk.
// Backward: one thread per ray, the reverse scan of compositing_math.h from the final
// transmittance the forward saved; no per-channel array at
// all (dot products with grad_rgb are running sums, grad_rgb is re-read from L1).

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../cuda_launch.cuh"
#include "../cuda_storage.cuh"
#include "compositing.h"
#include "compositing_math.h"

namespace head4d {
namespace compositing {
namespace {

constexpr const char* kOp = "composite_rays";

constexpr int kThreads = 128;

template <typename T, int CHUNK>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ colors, const T* __restrict__ densities, const T* __restrict__ depths,
               const T* __restrict__ background, const typename Storage<T>::acc* __restrict__ depth_min,
               const typename Storage<T>::acc* __restrict__ depth_max, T* __restrict__ rgb, T* __restrict__ depth,
               T* __restrict__ weights, typename Storage<T>::acc* __restrict__ aux, int64_t rays, int64_t S,
               int64_t C, int mode) {
  using A = typename Storage<T>::acc;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rays) return;
  const T* col = colors + r * S * C;
  const T* dens = densities + r * S;
  const T* dep = depths + r * S;
  A* ax = aux + r * kAux;
  for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
    const bool first = c0 == 0;
    const int cn = static_cast<int>(C - c0 < CHUNK ? C - c0 : CHUNK);
    A acc[CHUNK];
    A prev[CHUNK];
#pragma unroll
    for (int c = 0; c < CHUNK; ++c) {
      acc[c] = A(0);
      prev[c] = c < cn ? ld(col + c0 + c) : A(0);
    }
    A trans = A(1), total = A(0), dsum = A(0);
    ScaledTransmittance<A> scaled;  // the same product, for the backward's reverse scan
    A s0 = ld(dens), t0 = ld(dep);
    for (int64_t k = 0; k + 1 < S; ++k) {
      const A s1 = ld(dens + k + 1), t1 = ld(dep + k + 1);
      const Interval<A> iv = make_interval(s0, s1, t0, t1);
      const A w = iv.alpha * trans;
      trans = trans * iv.keep;
      if (first) {
        scaled.multiply(iv.keep);
        weights[r * (S - 1) + k] = Storage<T>::store(w);
        total += w;
        dsum += w * midpoint(t0, t1);
      }
      const T* c1 = col + (k + 1) * C + c0;
#pragma unroll
      for (int c = 0; c < CHUNK; ++c) {
        if (c < cn) {
          const A next = ld(c1 + c);
          acc[c] += w * midpoint(prev[c], next);
          prev[c] = next;
        }
      }
      s0 = s1;
      t0 = t1;
    }
    if (first) {
      const A raw = dsum / total;
      ax[0] = total;
      ax[1] = raw;
      ax[2] = scaled.m;
      ax[3] = static_cast<A>(scaled.e);
      depth[r] = Storage<T>::store(final_depth(raw, *depth_min, *depth_max));
    } else {
      total = ax[0];
    }
#pragma unroll
    for (int c = 0; c < CHUNK; ++c) {
      if (c < cn) {
        const A bg = mode == kTensor ? ld(background + r * C + c0 + c) : A(0);
        rgb[r * C + c0 + c] = Storage<T>::store(final_rgb(acc[c], total, mode, bg));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const typename Storage<T>::acc* __restrict__ grad_rgb,
                const typename Storage<T>::acc* __restrict__ grad_depth,
                const typename Storage<T>::acc* __restrict__ grad_weights, const T* __restrict__ colors,
                const T* __restrict__ densities, const T* __restrict__ depths, const T* __restrict__ background,
                const typename Storage<T>::acc* __restrict__ depth_min,
                const typename Storage<T>::acc* __restrict__ depth_max,
                const typename Storage<T>::acc* __restrict__ aux, typename Storage<T>::acc* __restrict__ grad_colors,
                typename Storage<T>::acc* __restrict__ grad_densities,
                typename Storage<T>::acc* __restrict__ grad_depths,
                typename Storage<T>::acc* __restrict__ grad_background, int64_t rays, int64_t S, int64_t C,
                int mode) {
  using A = typename Storage<T>::acc;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rays) return;
  const T* col = colors + r * S * C;
  const T* dens = densities + r * S;
  const T* dep = depths + r * S;
  const A* g = grad_rgb + r * C;
  const A total = aux[r * kAux + 0], raw = aux[r * kAux + 1];

  A g_bg = A(0);
  for (int64_t c = 0; c < C; ++c) {
    const A gc = __ldg(g + c);
    if (mode == kWhite) g_bg += gc;
    else if (mode == kTensor) g_bg += gc * ld(background + r * C + c);
    if (grad_background != nullptr) grad_background[r * C + c] = A(2) * gc * (A(1) - total);
  }
  const A dcoef = depth_coefficient(grad_depth != nullptr, grad_depth ? grad_depth[r] : A(0), raw, total,
                                    *depth_min, *depth_max);
  const A* gw = grad_weights ? grad_weights + r * (S - 1) : nullptr;

  ReverseScan<A> scan;  // from the final transmittance, as the forward left it
  scan.trans.m = aux[r * kAux + 2];
  scan.trans.e = static_cast<int>(aux[r * kAux + 3]);
  A* gcol = grad_colors + r * S * C;
  A* gs = grad_densities + r * S;
  A* gt = grad_depths + r * S;
  A s1 = ld(dens + S - 1), t1 = ld(dep + S - 1);
  A p1 = A(0);
  for (int64_t c = 0; c < C; ++c) p1 += __ldg(g + c) * ld(col + (S - 1) * C + c);
  for (int64_t k = S - 2; k >= 0; --k) {
    const A s0 = ld(dens + k), t0 = ld(dep + k);
    const T* c0 = col + k * C;
    A p0 = A(0);
    for (int64_t c = 0; c < C; ++c) p0 += __ldg(g + c) * ld(c0 + c);
    const auto out = scan.step(s0, s1, t0, t1, p0, p1, g_bg, dcoef, raw, gw != nullptr ? gw + k : nullptr);
    gs[k + 1] = out.density;
    gt[k + 1] = out.depth;
    A* gck = gcol + (k + 1) * C;
    for (int64_t c = 0; c < C; ++c) gck[c] = out.color_weight * __ldg(g + c);
    s1 = s0;
    t1 = t0;
    p1 = p0;
  }
  const auto first = scan.finish();
  gs[0] = first.density;
  gt[0] = first.depth;
  for (int64_t c = 0; c < C; ++c) gcol[c] = first.color_weight * __ldg(g + c);
}

template <typename T>
void launch_forward(const ForwardArgs& a, cudaStream_t stream) {
  using A = typename Storage<T>::acc;
  constexpr int kChunk = static_cast<int>(32 / sizeof(T));
  HEAD4D_LAUNCH(blocks_for(a.rays, kThreads, kOp), kThreads, 0, stream, forward_kernel<T, kChunk>)(
      static_cast<const T*>(a.colors), static_cast<const T*>(a.densities), static_cast<const T*>(a.depths),
      static_cast<const T*>(a.background), static_cast<const A*>(a.depth_min), static_cast<const A*>(a.depth_max),
      static_cast<T*>(a.rgb), static_cast<T*>(a.depth), static_cast<T*>(a.weights), static_cast<A*>(a.aux), a.rays,
      a.S, a.C, a.background_mode);
  check_launch(kOp, "forward");
}

template <typename T>
void launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  using A = typename Storage<T>::acc;
  HEAD4D_LAUNCH(blocks_for(a.rays, kThreads, kOp), kThreads, 0, stream, backward_kernel<T>)(
      static_cast<const A*>(a.grad_rgb), static_cast<const A*>(a.grad_depth), static_cast<const A*>(a.grad_weights),
      static_cast<const T*>(a.colors), static_cast<const T*>(a.densities), static_cast<const T*>(a.depths),
      static_cast<const T*>(a.background), static_cast<const A*>(a.depth_min), static_cast<const A*>(a.depth_max),
      static_cast<const A*>(a.aux), static_cast<A*>(a.grad_colors), static_cast<A*>(a.grad_densities),
      static_cast<A*>(a.grad_depths), static_cast<A*>(a.grad_background), a.rays, a.S, a.C, a.background_mode);
  check_launch(kOp, "backward");
}

}  // namespace

void forward_cuda(const ForwardArgs& args, void* stream) {
  if (args.rays == 0) return;
  with_storage_type(args.dtype, kOp, [&](auto tag) {
    launch_forward<decltype(tag)>(args, static_cast<cudaStream_t>(stream));
  });
}

void backward_cuda(const BackwardArgs& args, void* stream) {
  if (args.rays == 0) return;
  with_storage_type(args.dtype, kOp, [&](auto tag) {
    launch_backward<decltype(tag)>(args, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace compositing
}  // namespace head4d
