// Shared definitions for head4d's C++ and CUDA sources.
//
// This header is included by CPU kernels, CUDA kernels and host files alike, so it
// must not include any torch header: the kernel translation units stay cheap to
// compile and compile with plain nvcc.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HEAD4D_HD __host__ __device__ __forceinline__
#else
#define HEAD4D_HD inline
#endif

namespace head4d {

// Scalar types the kernels are instantiated for. The host files map torch dtypes
// onto these, the launchers map them onto the storage type of each side
// (c10::Half on the CPU, __half on the GPU, ...).
enum class Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace head4d
