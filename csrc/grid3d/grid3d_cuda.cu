// CUDA kernels of voxel-grid sampling. The per-point math is grid3d_math.h, the same
// functions the CPU kernels call; this file owns the memory traffic.
//
// Layout: grid channels-last [N, D, H, W, C] (the host relays it when C > 1), so each
// of a point's 8 corners is one contiguous run of C values.
// Mapping: one thread per point, walking the channels: Portrait4D's grids have C = 3
// (the displacement) and C = 1 (the squared distance), both compiled with C known;
// other C go through registers CHUNK channels at a time.
// Backward: one kernel for both gradients. grad_points: per thread, written directly.
// grad_grid: float32 (float64) atomics into a channels-last buffer that the host turns
// back into the grid's layout and dtype.
#include <cstdint>
#include <type_traits>

#include "../cuda_launch.cuh"
#include "../cuda_storage.cuh"
#include "grid3d.h"
#include "grid3d_math.h"

namespace head4d {
namespace grid3d {
namespace {

constexpr const char* kOp = "sample_grid3d";
constexpr int kThreads = 256;
constexpr int kChunk = 4;  // channels per register pass when C is not known at compile time

// CC: the channel count when known at compile time, else 0 (runtime C, kChunk at a time).
template <typename T, int CC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ grid, const typename Storage<T>::acc* __restrict__ points,
                   T* __restrict__ out, int64_t N, int64_t M, int64_t C_runtime, int64_t D, int64_t H, int64_t W,
                   typename Storage<T>::acc bound, int padding) {
  using A = typename Storage<T>::acc;
  constexpr int kStep = CC > 0 ? CC : kChunk;
  const int64_t C = CC > 0 ? CC : C_runtime;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * M) return;
  const int64_t n = i / M;
  const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
  Stencil<A> st;
  const bool hit = make_stencil(p, bound, W, H, D, padding, st);
  const A miss = hit ? A(0) : value_without_corners(p);
  const T* base = grid + n * (D * H * W * C);
  T* dst = out + i * C;
  for (int64_t c0 = 0; c0 < C; c0 += kStep) {
    A acc[kStep];
#pragma unroll
    for (int j = 0; j < kStep; ++j) acc[j] = miss;
    if (hit) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (!corner_in(st, k)) continue;
        const A w = corner_weight(st, k);
        const T* v = base + corner_voxel(st, k, W, H) * C + c0;
#pragma unroll
        for (int j = 0; j < kStep; ++j) {
          if (CC > 0 || c0 + j < C) acc[j] += ld(v + j) * w;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kStep; ++j) {
      if (CC > 0 || c0 + j < C) dst[c0 + j] = Storage<T>::store(acc[j]);
    }
  }
}

template <typename T, int CC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const typename Storage<T>::acc* __restrict__ grad_out, const T* __restrict__ grid,
                    const typename Storage<T>::acc* __restrict__ points, typename Storage<T>::acc* __restrict__ grad_grid,
                    typename Storage<T>::acc* __restrict__ grad_points, int64_t N, int64_t M, int64_t C_runtime,
                    int64_t D, int64_t H, int64_t W, typename Storage<T>::acc bound, int padding) {
  using A = typename Storage<T>::acc;
  constexpr int kStep = CC > 0 ? CC : kChunk;
  const int64_t C = CC > 0 ? CC : C_runtime;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * M) return;
  const int64_t n = i / M;
  const A p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
  Stencil<A> st;
  if (!make_stencil(p, bound, W, H, D, padding, st)) {
    if (grad_points != nullptr) {
#pragma unroll
      for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = A(0);
    }
    return;
  }
  const int64_t grid_size = D * H * W * C;
  const T* base = grid + n * grid_size;
  A* gbase = grad_grid != nullptr ? grad_grid + n * grid_size : nullptr;
  const A* g_in = grad_out + i * C;
  A g_pos[3] = {A(0), A(0), A(0)};
  for (int64_t c0 = 0; c0 < C; c0 += kStep) {
    A g[kStep];
#pragma unroll
    for (int j = 0; j < kStep; ++j) g[j] = (CC > 0 || c0 + j < C) ? g_in[c0 + j] : A(0);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (!corner_in(st, k)) continue;
      const int64_t offset = corner_voxel(st, k, W, H) * C + c0;
      if (grad_points != nullptr) {
        A dot = A(0);
#pragma unroll
        for (int j = 0; j < kStep; ++j) {
          if (CC > 0 || c0 + j < C) dot += g[j] * ld(base + offset + j);
        }
        A dx, dy, dz;
        corner_weight_grads(st, k, dx, dy, dz);
        g_pos[0] += dot * dx;
        g_pos[1] += dot * dy;
        g_pos[2] += dot * dz;
      }
      if (gbase != nullptr) {
        const A w = corner_weight(st, k);
#pragma unroll
        for (int j = 0; j < kStep; ++j) {
          if (CC > 0 || c0 + j < C) atomicAdd(gbase + offset + j, w * g[j]);
        }
      }
    }
  }
  if (grad_points != nullptr) {
    A gp[3];
    point_grad(st, g_pos, gp);
#pragma unroll
    for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = gp[d];
  }
}

template <typename Fn>
void with_channels(int64_t C, Fn&& fn) {
  if (C == 1) return fn(std::integral_constant<int, 1>{});
  if (C == 3) return fn(std::integral_constant<int, 3>{});
  return fn(std::integral_constant<int, 0>{});
}

}  // namespace

void forward_cuda(const ForwardArgs& a, void* stream) {
  if (a.N * a.M * a.C == 0) return;
  with_storage_type(a.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Storage<T>::acc;
    with_channels(a.C, [&](auto cc) {
      HEAD4D_LAUNCH(blocks_for(a.N * a.M, kThreads, kOp), kThreads, 0, static_cast<cudaStream_t>(stream),
                    forward_kernel<T, decltype(cc)::value>)(
          static_cast<const T*>(a.grid), static_cast<const A*>(a.points), static_cast<T*>(a.out), a.N, a.M, a.C, a.D,
          a.H, a.W, static_cast<A>(a.bound), a.padding);
    });
  });
  check_launch(kOp, "forward");
}

void backward_cuda(const BackwardArgs& a, void* stream) {
  if (a.N * a.M == 0) return;
  with_storage_type(a.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Storage<T>::acc;
    with_channels(a.C, [&](auto cc) {
      HEAD4D_LAUNCH(blocks_for(a.N * a.M, kThreads, kOp), kThreads, 0, static_cast<cudaStream_t>(stream),
                    backward_kernel<T, decltype(cc)::value>)(
          static_cast<const A*>(a.grad_out), static_cast<const T*>(a.grid), static_cast<const A*>(a.points),
          static_cast<A*>(a.grad_grid), static_cast<A*>(a.grad_points), a.N, a.M, a.C, a.D, a.H, a.W,
          static_cast<A>(a.bound), a.padding);
    });
  });
  check_launch(kOp, "backward");
}

}  // namespace grid3d
}  // namespace head4d
