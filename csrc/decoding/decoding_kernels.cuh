// The fused triplane decoder's CUDA kernels and their launchers, as templates over the
// storage type T and the compile-time bounds KC >= channels (padded) and KO >= outputs.
// decoding_cuda.cu dispatches; decoding_cuda_<dtype>.cu instantiate one storage type
// each, so the four compile in parallel.
//
#pragma once

#include <cstdint>
#include <functional>
#include <type_traits>

#include "../cuda_launch.cuh"
#include "../cuda_storage.cuh"
#include "../triplanes/triplanes.h"
#include "decoding.h"
#include "decoding_math.h"

namespace head4d {
namespace decoding {
namespace kernels {

constexpr const char* kOp = "decode_triplanes";

using triplanes::corner_texel;
using triplanes::make_stencil;
using triplanes::project;
using triplanes::Stencil;
using triplanes::value_without_corners;

constexpr int kThreads = 128;

// Copies the packed weights (decoding_math.h) into shared memory; every thread of the
// block must call it.
template <int KC, int KO, typename A>
__device__ __forceinline__ const A* stage_weights(const Weights& w, int C, int hidden, int outputs) {
  HEAD4D_DYNAMIC_SHARED(unsigned char, shared_raw);
  A* packed = reinterpret_cast<A*>(shared_raw);
  const Packing<KC, KO> pk{hidden};
  const auto* w1 = static_cast<const A*>(w.w1);
  const auto* b1 = static_cast<const A*>(w.b1);
  const auto* w2 = static_cast<const A*>(w.w2);
  const auto* b2 = static_cast<const A*>(w.b2);
  for (int64_t idx = threadIdx.x; idx < pk.size(); idx += blockDim.x)
    packed[idx] = packed_value<KC, KO>(w1, b1, w2, b2, idx, C, hidden, outputs);
  __syncthreads();
  return packed;
}

// The mean over the three planes of the bilinear samples at p (batch n): per plane
// the taps in corner order, then the planes, then / 3 (the CPU kernel's order).
template <typename T, int KC>
__device__ __forceinline__ void gather_mean(const T* __restrict__ planes, int64_t n,
                                            const typename Storage<T>::acc p[3], typename Storage<T>::acc scale,
                                            int layout, int Cs, int H, int W, typename Storage<T>::acc (&f)[KC]) {
  using A = typename Storage<T>::acc;
  constexpr int VEC = static_cast<int>(16 / sizeof(T));
  static_assert(KC % VEC == 0, "KC must be a multiple of the vector width");
  const int64_t plane_size = static_cast<int64_t>(H) * W * Cs;
#pragma unroll
  for (int c = 0; c < KC; ++c) f[c] = A(0);
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    A u, v;
    project(p, scale, layout, k, u, v);
    Stencil<A> st;
    if (!make_stencil(u, v, W, H, st)) {
      const A miss = value_without_corners(u, v);  // 0, or NaN for a non-finite coordinate
#pragma unroll
      for (int c = 0; c < KC; ++c) f[c] += miss;
      continue;
    }
    A value[KC];
#pragma unroll
    for (int c = 0; c < KC; ++c) value[c] = A(0);
    const T* base = planes + (n * 3 + k) * plane_size;
#pragma unroll
    for (int corner = 0; corner < 4; ++corner) {
      if (!st.in[corner]) continue;
      const T* texel = base + corner_texel(st, corner, W) * Cs;
      const A w = st.w[corner];
#pragma unroll
      for (int c0 = 0; c0 < KC; c0 += VEC) {
        if (c0 < Cs) {
          A t[VEC];
          load_vec<T, VEC>(texel + c0, t);
#pragma unroll
          for (int j = 0; j < VEC; ++j) value[c0 + j] += w * t[j];
        }
      }
    }
#pragma unroll
    for (int c = 0; c < KC; ++c) f[c] += value[c];
  }
#pragma unroll
  for (int c = 0; c < KC; ++c) f[c] = f[c] / A(3);
}

template <typename T, int KC, int KO>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ planes, const typename Storage<T>::acc* __restrict__ points, Weights w,
                   T* __restrict__ rgb, T* __restrict__ sigma, int64_t total, int64_t M, int C, int Cs, int H,
                   int W, int hidden, int outputs, typename Storage<T>::acc scale, int layout) {
  using A = typename Storage<T>::acc;
  const A* packed = stage_weights<KC, KO, A>(w, C, hidden, outputs);
  const int64_t co = outputs - 1;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
    A f[KC];
    gather_mean<T, KC>(planes, i / M, p, scale, layout, Cs, H, W, f);
    A o[KO];
    mlp_forward<KC, KO>(packed, hidden, f, o);
    outputs_to_rgb(o);
    sigma[i] = Storage<T>::store(o[0]);
    T* dst = rgb + i * co;
#pragma unroll
    for (int k = 1; k < KO; ++k) {
      if (k < outputs) dst[k - 1] = Storage<T>::store(o[k]);
    }
  }
}

template <typename T, int KC, int KO>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const typename Storage<T>::acc* __restrict__ grad_rgb,
                    const typename Storage<T>::acc* __restrict__ grad_sigma, const T* __restrict__ planes,
                    const typename Storage<T>::acc* __restrict__ points, Weights w,
                    typename Storage<T>::acc* __restrict__ grad_planes,
                    typename Storage<T>::acc* __restrict__ grad_points, ChunkBuffers chunk, int64_t begin,
                    int64_t end, int64_t M, int C, int Cs, int H, int W, int hidden, int outputs,
                    typename Storage<T>::acc scale, int layout) {
  using A = typename Storage<T>::acc;
  constexpr int VEC = static_cast<int>(16 / sizeof(T));
  const A* packed = stage_weights<KC, KO, A>(w, C, hidden, outputs);
  A* buf_f = static_cast<A*>(chunk.f);
  A* buf_h = static_cast<A*>(chunk.h);
  A* buf_gz = static_cast<A*>(chunk.gz);
  A* buf_go = static_cast<A*>(chunk.go);
  const int64_t stride = chunk.stride;
  const bool need_gf = grad_planes != nullptr || grad_points != nullptr;
  const int64_t co = outputs - 1;
  const int64_t plane_size = static_cast<int64_t>(H) * W * Cs;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t i = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end; i += step) {
    const int64_t n = i / M;
    const int64_t q = i - begin;  // row in the chunk buffers
    const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
    A f[KC];
    gather_mean<T, KC>(planes, n, p, scale, layout, Cs, H, W, f);
    A o[KO];
    mlp_forward<KC, KO>(packed, hidden, f, o);
    A g[KO];
#pragma unroll
    for (int k = 0; k < KO; ++k) g[k] = A(0);
    if (grad_sigma != nullptr) g[0] = grad_sigma[i];
    if (grad_rgb != nullptr) {
#pragma unroll
      for (int k = 1; k < KO; ++k) {
        if (k < outputs) g[k] = grad_rgb[i * co + k - 1];
      }
    }
    output_grads(o, g);
    if (buf_f != nullptr) {
#pragma unroll
      for (int c = 0; c < KC; ++c) {
        if (c < C) buf_f[c * stride + q] = f[c];
      }
    }
    if (buf_go != nullptr) {
#pragma unroll
      for (int k = 0; k < KO; ++k) {
        if (k < outputs) buf_go[k * stride + q] = g[k];
      }
    }
    A gf[KC];
    mlp_backward<KC, KO>(packed, hidden, f, g, need_gf, gf, buf_h != nullptr ? buf_h + q : nullptr,
                         buf_gz != nullptr ? buf_gz + q : nullptr, stride);
    if (!need_gf) continue;

#pragma unroll
    for (int c = 0; c < KC; ++c) gf[c] = gf[c] / A(3);  // the mean's backward
    A grad_p[3] = {A(0), A(0), A(0)};
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      A u, v;
      project(p, scale, layout, k, u, v);
      Stencil<A> st;
      if (!make_stencil(u, v, W, H, st)) continue;
      A dw_dix[4], dw_diy[4];
      triplanes::stencil_weight_grads(st, dw_dix, dw_diy);
      const int64_t base = (n * 3 + k) * plane_size;
      A g_ix = A(0), g_iy = A(0);
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (!st.in[corner]) continue;
        const int64_t offset = base + corner_texel(st, corner, W) * Cs;
        if (grad_points != nullptr) {
          A dot = A(0);
#pragma unroll
          for (int c0 = 0; c0 < KC; c0 += VEC) {
            if (c0 < Cs) {
              A t[VEC];
              load_vec<T, VEC>(planes + offset + c0, t);
#pragma unroll
              for (int j = 0; j < VEC; ++j) dot += gf[c0 + j] * t[j];
            }
          }
          g_ix += dot * dw_dix[corner];
          g_iy += dot * dw_diy[corner];
        }
        if (grad_planes != nullptr) {
          const A wc = st.w[corner];
#pragma unroll
          for (int c0 = 0; c0 < KC; c0 += VEC) {
            if (c0 < Cs) {
              A contribution[VEC];
#pragma unroll
              for (int j = 0; j < VEC; ++j) contribution[j] = wc * gf[c0 + j];
              atomic_add_vec<A, VEC>(grad_planes + offset + c0, contribution);
            }
          }
        }
      }
      if (grad_points != nullptr) triplanes::accumulate_point_grad(g_ix, g_iy, W, H, scale, layout, k, grad_p);
    }
    if (grad_points != nullptr) {
#pragma unroll
      for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = grad_p[d];
    }
  }
}

// Blocks for `work` points: as many as can be resident at once (each stages the
// weights once), fewer when there is less work. `resident` (called once per device,
// kernel and shared-memory size, then cached) opts in to more than 48 KB of dynamic
// shared memory when the weights need it and returns the resident blocks per
// multiprocessor.
unsigned int grid_for(const void* kernel, int64_t work, size_t shared_bytes, const std::function<int()>& resident);

template <typename Kernel>
int resident_blocks(Kernel kernel, size_t shared_bytes) {
  if (shared_bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)),
               kOp, "the weights do not fit in shared memory");
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared_bytes), kOp, "occupancy");
  return per_sm;
}

template <typename T, int KC, int KO>
void launch_forward(const ForwardArgs& a, int Cs, cudaStream_t stream) {
  using A = typename Storage<T>::acc;
  const int hidden = static_cast<int>(a.hidden);
  const size_t shared_bytes = static_cast<size_t>(Packing<KC, KO>{hidden}.size()) * sizeof(A);
  const int64_t total = a.N * a.M;
  auto kernel = forward_kernel<T, KC, KO>;
  const unsigned int blocks = grid_for(reinterpret_cast<const void*>(kernel), total, shared_bytes, [&] {
    return resident_blocks(kernel, shared_bytes);
  });
  HEAD4D_LAUNCH(blocks, kThreads, shared_bytes, stream, kernel)(
      static_cast<const T*>(a.planes), static_cast<const A*>(a.points), a.weights, static_cast<T*>(a.rgb),
      static_cast<T*>(a.sigma), total, a.M, static_cast<int>(a.C), Cs, static_cast<int>(a.H),
      static_cast<int>(a.W), hidden, static_cast<int>(a.outputs), static_cast<A>(a.scale), a.layout);
  check_launch(kOp, "forward");
}

template <typename T, int KC, int KO>
void launch_backward(const BackwardArgs& a, const ChunkBuffers& chunk, int Cs, int64_t begin, int64_t end,
                     cudaStream_t stream) {
  using A = typename Storage<T>::acc;
  const int hidden = static_cast<int>(a.hidden);
  const size_t shared_bytes = static_cast<size_t>(Packing<KC, KO>{hidden}.size()) * sizeof(A);
  auto kernel = backward_kernel<T, KC, KO>;
  const unsigned int blocks = grid_for(reinterpret_cast<const void*>(kernel), end - begin, shared_bytes, [&] {
    return resident_blocks(kernel, shared_bytes);
  });
  HEAD4D_LAUNCH(blocks, kThreads, shared_bytes, stream, kernel)(
      static_cast<const A*>(a.grad_rgb), static_cast<const A*>(a.grad_sigma), static_cast<const T*>(a.planes),
      static_cast<const A*>(a.points), a.weights, static_cast<A*>(a.grad_planes), static_cast<A*>(a.grad_points),
      chunk, begin, end, a.M, static_cast<int>(a.C), Cs, static_cast<int>(a.H), static_cast<int>(a.W), hidden,
      static_cast<int>(a.outputs), static_cast<A>(a.scale), a.layout);
  check_launch(kOp, "backward");
}

// The (KC, KO) pairs compiled: Portrait4D's and EG3D's decoder (32 channels, 33
// outputs) and one general pair for everything else the op accepts. float64 (a dtype
// for tests against float64 references, not for speed) has the general pair alone.
// PREFIX is empty to instantiate, `extern` to declare the instantiation made elsewhere.
#define HEAD4D_DECODING_INSTANTIATE_GENERAL(PREFIX, T)                                                          \
  PREFIX template void launch_forward<T, kMaxFeatures, kMaxOutputs>(const ForwardArgs&, int, cudaStream_t);      \
  PREFIX template void launch_backward<T, kMaxFeatures, kMaxOutputs>(const BackwardArgs&, const ChunkBuffers&, \
                                                                     int, int64_t, int64_t, cudaStream_t);
#define HEAD4D_DECODING_INSTANTIATE(PREFIX, T)                                                                   \
  HEAD4D_DECODING_INSTANTIATE_GENERAL(PREFIX, T)                                                                 \
  PREFIX template void launch_forward<T, 32, 36>(const ForwardArgs&, int, cudaStream_t);                         \
  PREFIX template void launch_backward<T, 32, 36>(const BackwardArgs&, const ChunkBuffers&, int, int64_t,        \
                                                  int64_t, cudaStream_t);

// Whether (32, 36) is compiled for storage type T.
template <typename T>
constexpr bool kHasSmallBounds = !std::is_same<T, double>::value;

}  // namespace kernels
}  // namespace decoding
}  // namespace head4d
