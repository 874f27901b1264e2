// CUDA kernels of the fused triplane decoder. The per-point math is decoding_math.h
// (the MLP) and triplanes_math.h (the bilinear stencils), the functions the CPU
// kernels call; this file owns the memory traffic.
//
// One thread per point, a grid-stride loop over the points with as many blocks as are
// resident at once, so each block stages the packed weights (decoding_math.h; 17 KB
// for C 32, Hd 64, O 33 in fp32) into shared memory once. The per-point arrays (mean
// feature, outputs, their gradients) have compile-time sizes and live in registers;
// the MLP streams over the hidden units, reading each weight row with 16-byte shared
// loads that the whole warp shares (every thread is at the same hidden unit).
//
// Planes are channels-last [N, 3, H, W, Cs] with the channel stride Cs a multiple of
// 16 bytes (the host pads C when needed) and a 16-byte aligned base, so every texel
// read is a run of 16-byte loads.
//
// Forward: gather the 12 texels, mean, MLP, write rgb and sigma. Nothing else.
// Backward: recompute the features and the MLP, backpropagate (the hidden layer is
// recomputed a second time rather than kept), then
//  - grad_points: dot products of dL/df with the texels (no atomics);
//  - grad_planes: atomics into a float32 (float64) channels-last buffer, 16-byte vector
//    atomics on sm_90, as sample_triplanes' backward does;
//  - the weight gradients: the per-point vectors f, h, dL/dz and dL/do of a chunk of
//    points are written feature-major to small buffers (coalesced: consecutive threads,
//    consecutive points), and the host sums them over points with matrix products.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../cuda_storage.cuh"
#include "../triplanes/triplanes.h"
#include "decoding.h"
#include "decoding_math.h"

namespace head4d {
namespace decoding {
namespace {

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
  extern __shared__ __align__(16) unsigned char shared_raw[];
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

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("decode_triplanes: ") + what + ": " + cudaGetErrorString(err));
}

// Blocks for `work` points: as many as can be resident at once (each stages the
// weights once), fewer when there is less work. Opts in to more than 48 KB of
// dynamic shared memory when the weights need it.
template <typename Kernel>
unsigned int grid_for(Kernel kernel, int64_t work, size_t shared_bytes) {
  int device = 0, sms = 0, per_sm = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  if (shared_bytes > 48 * 1024)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)),
          "the weights do not fit in shared memory");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared_bytes), "occupancy");
  if (per_sm < 1)
    throw std::runtime_error("decode_triplanes: the weights (" + std::to_string(shared_bytes) +
                             " bytes) do not fit in this GPU's shared memory");
  const int64_t needed = (work + kThreads - 1) / kThreads;
  const int64_t resident = static_cast<int64_t>(sms) * per_sm;
  return static_cast<unsigned int>(needed < resident ? needed : resident);
}

template <typename T, int KC, int KO>
void launch_forward(const ForwardArgs& a, int Cs, cudaStream_t stream) {
  using A = typename Storage<T>::acc;
  const int hidden = static_cast<int>(a.hidden);
  const size_t shared_bytes = static_cast<size_t>(Packing<KC, KO>{hidden}.size()) * sizeof(A);
  const int64_t total = a.N * a.M;
  auto kernel = forward_kernel<T, KC, KO>;
  const unsigned int blocks = grid_for(kernel, total, shared_bytes);
  kernel<<<blocks, kThreads, shared_bytes, stream>>>(
      static_cast<const T*>(a.planes), static_cast<const A*>(a.points), a.weights, static_cast<T*>(a.rgb),
      static_cast<T*>(a.sigma), total, a.M, static_cast<int>(a.C), Cs, static_cast<int>(a.H),
      static_cast<int>(a.W), hidden, static_cast<int>(a.outputs), static_cast<A>(a.scale), a.layout);
  check(cudaGetLastError(), "forward launch failed");
}

template <typename T, int KC, int KO>
void launch_backward(const BackwardArgs& a, const ChunkBuffers& chunk, int Cs, int64_t begin, int64_t end,
                     cudaStream_t stream) {
  using A = typename Storage<T>::acc;
  const int hidden = static_cast<int>(a.hidden);
  const size_t shared_bytes = static_cast<size_t>(Packing<KC, KO>{hidden}.size()) * sizeof(A);
  auto kernel = backward_kernel<T, KC, KO>;
  const unsigned int blocks = grid_for(kernel, end - begin, shared_bytes);
  kernel<<<blocks, kThreads, shared_bytes, stream>>>(
      static_cast<const A*>(a.grad_rgb), static_cast<const A*>(a.grad_sigma), static_cast<const T*>(a.planes),
      static_cast<const A*>(a.points), a.weights, static_cast<A*>(a.grad_planes), static_cast<A*>(a.grad_points),
      chunk, begin, end, a.M, static_cast<int>(a.C), Cs, static_cast<int>(a.H), static_cast<int>(a.W), hidden,
      static_cast<int>(a.outputs), static_cast<A>(a.scale), a.layout);
  check(cudaGetLastError(), "backward launch failed");
}

// Picks the compile-time bounds KC >= Cs and KO >= O.
template <typename Fn>
void with_bounds(int64_t Cs, int64_t O, Fn&& fn) {
  if (Cs <= 32) {
    if (O <= 36) return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 36>{});
    return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, kMaxOutputs>{});
  }
  if (O <= 36) return fn(std::integral_constant<int, kMaxFeatures>{}, std::integral_constant<int, 36>{});
  return fn(std::integral_constant<int, kMaxFeatures>{}, std::integral_constant<int, kMaxOutputs>{});
}

template <typename Fn>
void with_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(float{});
    case Dtype::kFloat64: return fn(double{});
    case Dtype::kFloat16: return fn(__half{});
    case Dtype::kBFloat16: return fn(__nv_bfloat16{});
  }
  throw std::invalid_argument("decode_triplanes: unsupported dtype");
}

void check_sizes(int64_t C, int64_t hidden, int64_t outputs) {
  if (C < 1 || C > kMaxFeatures || hidden < 1 || hidden > kMaxHidden || outputs < 1 || outputs > kMaxOutputs)
    throw std::invalid_argument("decode_triplanes: unsupported sizes");
}

}  // namespace

void forward_cuda(const ForwardArgs& args, void* stream) {
  check_sizes(args.C, args.hidden, args.outputs);
  if (args.N * args.M == 0) return;
  with_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int Cs = static_cast<int>(cuda_channel_stride(args.C, args.dtype));
    with_bounds(Cs, args.outputs, [&](auto kc, auto ko) {
      launch_forward<T, decltype(kc)::value, decltype(ko)::value>(args, Cs, static_cast<cudaStream_t>(stream));
    });
  });
}

void backward_cuda(const BackwardArgs& args, const ChunkBuffers& chunk, int64_t begin, int64_t end, void* stream) {
  check_sizes(args.C, args.hidden, args.outputs);
  if (end <= begin) return;
  with_dtype(args.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int Cs = static_cast<int>(cuda_channel_stride(args.C, args.dtype));
    with_bounds(Cs, args.outputs, [&](auto kc, auto ko) {
      launch_backward<T, decltype(kc)::value, decltype(ko)::value>(args, chunk, Cs, begin, end,
                                                                      static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace decoding
}  // namespace head4d
