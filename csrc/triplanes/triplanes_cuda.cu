// CUDA kernels of triplane sampling. The per-point math is triplanes_math.h,
// the same functions the CPU kernels call; this file owns the memory traffic.
//
// Layout: planes channels-last [N, 3, H, W, C], so a texel's channels are contiguous.
// Mapping: G = ceil(C / VEC) consecutive threads per point, each owning VEC channels.
// With VEC * sizeof(T) = 16 every texel read is one 16-byte load and the G threads of
// a point read one contiguous run of the texel (C = 32 fp32: 8 threads x float4).
// Each thread recomputes its point's three stencils (a few dozen FLOPs), which is
// cheaper than sharing them through shared memory.
//
// Backward: one kernel for both gradients.
//  - grad_points: each thread's partial dot products are summed over the G threads of
//    its point with warp shuffles when G is a power of two <= 32 (no atomics), else
//    with 3 atomics per thread.
//  - grad_planes: atomics into a float32 (float64) channels-last buffer; on sm_90 one
//    16-byte vector atomic per (point, texel, 4 channels) instead of one per channel.

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../cuda_launch.cuh"
#include "../cuda_storage.cuh"
#include "triplanes.h"
#include "triplanes_math.h"

namespace head4d {
namespace triplanes {
namespace {

constexpr const char* kOp = "sample_triplanes";

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ planes, const typename Storage<T>::acc* __restrict__ points,
                   T* __restrict__ out, int64_t N, int64_t M, int64_t C, int H, int W,
                   typename Storage<T>::acc scale, int layout, int reduce) {
  using acc_t = typename Storage<T>::acc;
  const int64_t groups = (C + VEC - 1) / VEC;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= N * M * groups) return;
  const int64_t i = t / groups;
  const int64_t c0 = (t - i * groups) * VEC;
  const int64_t n = i / M;
  const int64_t m = i - n * M;
  const acc_t p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
  const int64_t plane_size = static_cast<int64_t>(H) * W * C;

  acc_t total[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) total[j] = acc_t(0);

#pragma unroll
  for (int k = 0; k < 3; ++k) {
    acc_t value[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) value[j] = acc_t(0);
    acc_t u, v;
    project(p, scale, layout, k, u, v);
    Stencil<acc_t> st;
    if (make_stencil(u, v, W, H, st)) {
      const T* base = planes + (n * 3 + k) * plane_size + c0;
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (!st.in[corner]) continue;
        acc_t texel[VEC];
        load_vec<T, VEC>(base + corner_texel(st, corner, W) * C, texel);
        const acc_t w = st.w[corner];
#pragma unroll
        for (int j = 0; j < VEC; ++j) value[j] += w * texel[j];
      }
    } else {
      const acc_t miss = value_without_corners(u, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) value[j] = miss;
    }
    if (reduce == kNone) {
      store_vec<T, VEC>(out + ((n * 3 + k) * M + m) * C + c0, value);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) total[j] += value[j];
    }
  }
  if (reduce != kNone) {
    const acc_t divisor = reduce_divisor<acc_t>(reduce);
#pragma unroll
    for (int j = 0; j < VEC; ++j) total[j] = total[j] / divisor;
    store_vec<T, VEC>(out + i * C + c0, total);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ planes,
                    const typename Storage<T>::acc* __restrict__ points,
                    typename Storage<T>::acc* __restrict__ grad_planes,
                    typename Storage<T>::acc* __restrict__ grad_points, int64_t N, int64_t M, int64_t C,
                    int H, int W, typename Storage<T>::acc scale, int layout, int reduce, bool shuffle_reduce) {
  using acc_t = typename Storage<T>::acc;
  const int64_t groups = (C + VEC - 1) / VEC;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // No early return: every lane must reach the shuffles below.
  const bool active = t < N * M * groups;
  const int64_t i = active ? t / groups : 0;
  const int64_t c0 = active ? (t - i * groups) * VEC : 0;
  const int64_t n = i / M;
  const int64_t m = i - n * M;
  const int64_t plane_size = static_cast<int64_t>(H) * W * C;
  acc_t grad_p[3] = {acc_t(0), acc_t(0), acc_t(0)};

  if (active) {
    const acc_t p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
    const acc_t divisor = reduce_divisor<acc_t>(reduce);
    acc_t g_reduced[VEC];
    if (reduce != kNone) {
      load_vec<T, VEC>(grad_out + i * C + c0, g_reduced);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g_reduced[j] = g_reduced[j] / divisor;
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      acc_t u, v;
      project(p, scale, layout, k, u, v);
      Stencil<acc_t> st;
      if (!make_stencil(u, v, W, H, st)) continue;
      acc_t g[VEC];
      if (reduce == kNone) {
        load_vec<T, VEC>(grad_out + ((n * 3 + k) * M + m) * C + c0, g);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) g[j] = g_reduced[j];
      }
      acc_t dw_dix[4], dw_diy[4];
      stencil_weight_grads(st, dw_dix, dw_diy);
      const T* base = planes + (n * 3 + k) * plane_size + c0;
      acc_t g_ix = acc_t(0), g_iy = acc_t(0);
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        if (!st.in[corner]) continue;
        const int64_t offset = corner_texel(st, corner, W) * C;
        if (grad_points != nullptr) {
          acc_t texel[VEC];
          load_vec<T, VEC>(base + offset, texel);
          acc_t dot = acc_t(0);
#pragma unroll
          for (int j = 0; j < VEC; ++j) dot += g[j] * texel[j];
          g_ix += dot * dw_dix[corner];
          g_iy += dot * dw_diy[corner];
        }
        if (grad_planes != nullptr) {
          acc_t contribution[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) contribution[j] = st.w[corner] * g[j];
          atomic_add_vec<acc_t, VEC>(grad_planes + (n * 3 + k) * plane_size + c0 + offset, contribution);
        }
      }
      if (grad_points != nullptr) accumulate_point_grad(g_ix, g_iy, W, H, scale, layout, k, grad_p);
    }
  }

  if (grad_points == nullptr) return;
  if (shuffle_reduce) {
    // G = groups is a power of two <= 32 and blockDim is a multiple of 32, so the G
    // threads of a point form one aligned segment of a warp.
    const int width = static_cast<int>(groups);
    for (int offset = width / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int d = 0; d < 3; ++d) grad_p[d] += __shfl_down_sync(0xffffffffu, grad_p[d], offset, width);
    }
    if (active && c0 == 0) {
#pragma unroll
      for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = grad_p[d];
    }
  } else if (active) {
#pragma unroll
    for (int d = 0; d < 3; ++d) atomicAdd(grad_points + i * 3 + d, grad_p[d]);
  }
}

template <typename T, int VEC>
void launch_forward(const ForwardArgs& a, cudaStream_t stream) {
  using acc_t = typename Storage<T>::acc;
  const int64_t threads = a.N * a.M * ((a.C + VEC - 1) / VEC);
  HEAD4D_LAUNCH(blocks_for(threads, kThreads, kOp), kThreads, 0, stream, forward_kernel<T, VEC>)(
      static_cast<const T*>(a.planes), static_cast<const acc_t*>(a.points), static_cast<T*>(a.out), a.N, a.M, a.C,
      static_cast<int>(a.H), static_cast<int>(a.W), static_cast<acc_t>(a.scale), a.layout, a.reduce);
  check_launch(kOp, "forward");
}

template <typename T, int VEC>
void launch_backward(const BackwardArgs& a, cudaStream_t stream) {
  using acc_t = typename Storage<T>::acc;
  const int64_t groups = (a.C + VEC - 1) / VEC;
  const bool shuffle_reduce = groups <= 32 && (groups & (groups - 1)) == 0;
  HEAD4D_LAUNCH(blocks_for(a.N * a.M * groups, kThreads, kOp), kThreads, 0, stream, backward_kernel<T, VEC>)(
      static_cast<const T*>(a.grad_out), static_cast<const T*>(a.planes), static_cast<const acc_t*>(a.points),
      static_cast<acc_t*>(a.grad_planes), static_cast<acc_t*>(a.grad_points), a.N, a.M, a.C,
      static_cast<int>(a.H), static_cast<int>(a.W), static_cast<acc_t>(a.scale), a.layout, a.reduce,
      shuffle_reduce);
  check_launch(kOp, "backward");
}

// Picks the 16-byte vector width when allowed, else one channel per thread.
template <typename T, typename Fn>
void with_width(bool vector_loads, Fn&& fn) {
  constexpr int kVec = static_cast<int>(16 / sizeof(T));
  if (vector_loads) {
    fn(std::integral_constant<int, kVec>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

}  // namespace

void forward_cuda(const ForwardArgs& args, void* stream, bool vector_loads) {
  if (args.N * args.M * args.C == 0) return;
  with_storage_type(args.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    with_width<T>(vector_loads, [&](auto width) {
      launch_forward<T, decltype(width)::value>(args, static_cast<cudaStream_t>(stream));
    });
  });
}

void backward_cuda(const BackwardArgs& args, void* stream, bool vector_loads) {
  if (args.N * args.M * args.C == 0) return;
  with_storage_type(args.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    with_width<T>(vector_loads, [&](auto width) {
      launch_backward<T, decltype(width)::value>(args, static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace triplanes
}  // namespace head4d
