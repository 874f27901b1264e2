// Shared definitions for head4d's C++ and CUDA sources.
//
// This header is included by CPU kernels, CUDA kernels and host files alike, so it
// must not include any torch header: the kernel translation units stay cheap to
// compile and compile with plain nvcc.
#pragma once

#include <cstdint>
#include <functional>

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

// Runs fn(begin, end) over [0, n) on the host's thread pool, in chunks of at least
// `grain`. The host files pass ATen's parallel_for (host_utils.h); the CPU kernels
// take it as an argument so that they need no torch header.
using ParallelFor = std::function<void(int64_t n, int64_t grain,
                                       const std::function<void(int64_t, int64_t)>& fn)>;

}  // namespace head4d
