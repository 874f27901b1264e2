// Storage types of the CUDA kernels and their accumulation types: float32 and float64
// accumulate in themselves, float16 and bfloat16 in float32. Device code only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace head4d {

template <typename T>
struct Storage;  // load: storage -> accumulation type; store: back, rounding to nearest

template <>
struct Storage<float> {
  using acc = float;
  __device__ __forceinline__ static float load(float x) { return x; }
  __device__ __forceinline__ static float store(float x) { return x; }
};
template <>
struct Storage<double> {
  using acc = double;
  __device__ __forceinline__ static double load(double x) { return x; }
  __device__ __forceinline__ static double store(double x) { return x; }
};
template <>
struct Storage<__half> {
  using acc = float;
  __device__ __forceinline__ static float load(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Storage<__nv_bfloat16> {
  using acc = float;
  __device__ __forceinline__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// One element through the read-only cache, widened to the accumulation type.
template <typename T>
__device__ __forceinline__ typename Storage<T>::acc ld(const T* p) {
  return Storage<T>::load(__ldg(p));
}

// Vector loads, stores and atomics of VEC consecutive elements (one 16-byte access when
// VEC * sizeof(T) == 16 and p is 16-byte aligned; element by element otherwise).
// VEC elements of T at p (16-byte aligned when VEC * sizeof(T) == 16), widened.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, typename Storage<T>::acc out[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = Storage<T>::load(v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = Storage<T>::load(p[j]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const typename Storage<T>::acc in[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = Storage<T>::store(in[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = Storage<T>::store(in[j]);
  }
}

// dst[j] += val[j] for j < VEC, atomically; VEC float32 adds on sm_90 go 4 at a time.
template <typename A, int VEC>
__device__ __forceinline__ void atomic_add_vec(A* dst, const A val[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = sizeof(A) == 4 && VEC % 4 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4)
      atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(val[j], val[j + 1], val[j + 2], val[j + 3]));
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(dst + j, val[j]);
  }
}

}  // namespace head4d
