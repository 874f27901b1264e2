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

}  // namespace head4d
