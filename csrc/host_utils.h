// Helpers shared by the op host files (ATen only, no torch/extension.h).
#pragma once

#include <cstdint>
#include <functional>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(HEAD4D_WITH_CUDA) && !defined(HEAD4D_CUDA_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "common.h"

// Kernel dispatch in the op host files:
//
//   if (uses_cuda_kernels(planes)) {
//     HEAD4D_ON_CUDA(planes, kOp, triplanes::forward_cuda(args, stream));
//   } else {
//     HEAD4D_ON_CPU(planes, kOp, triplanes::forward_cpu(args, host_parallel_for()));
//   }
//
// HEAD4D_ON_CUDA runs its statements with `stream` (the current cudaStream_t of the
// tensor's device, as a void*) under a device guard; in a build without CUDA kernels it
// raises an error naming the op. HEAD4D_ON_CPU checks that the tensor is on the CPU.
// In the emulated build (HEAD4D_CUDA_EMULATION: the CUDA kernels compiled as host code,
// the `cuda_emulated` test backend) the CUDA kernels take CPU tensors and run on the CPU.
#if defined(HEAD4D_CUDA_EMULATION)
#define HEAD4D_ON_CUDA(like, op, ...) \
  do {                                \
    void* stream = nullptr;           \
    (void)stream;                     \
    __VA_ARGS__;                      \
  } while (0)
#elif defined(HEAD4D_WITH_CUDA)
#define HEAD4D_ON_CUDA(like, op, ...)                                     \
  do {                                                                    \
    const c10::cuda::CUDAGuard head4d_device_guard_((like).device());     \
    void* stream = c10::cuda::getCurrentCUDAStream().stream();            \
    (void)stream;                                                         \
    __VA_ARGS__;                                                          \
  } while (0)
#else
#define HEAD4D_ON_CUDA(like, op, ...) \
  TORCH_CHECK(false, op, ": head4d._C was built without CUDA kernels; rebuild with nvcc available")
#endif

#define HEAD4D_ON_CPU(like, op, ...)                                                      \
  do {                                                                                    \
    TORCH_CHECK_VALUE((like).is_cpu(), op, ": unsupported device ", (like).device());     \
    __VA_ARGS__;                                                                          \
  } while (0)

namespace head4d {

// Whether the kernels for `t` are the CUDA ones: for CUDA tensors, and in the emulated
// build for CPU tensors as well (it has no other).
inline bool uses_cuda_kernels(const at::Tensor& t) {
#if defined(HEAD4D_CUDA_EMULATION)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// Whether p is 16-byte aligned (the CUDA kernels' vector loads need it).
inline bool is_aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Raises ValueError naming `op` unless `t` is on a device this build has kernels for.
inline void check_kernel_device(const at::Tensor& t, const char* op) {
#if defined(HEAD4D_WITH_CUDA)
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), op, ": unsupported device ", t.device());
#else
  TORCH_CHECK_VALUE(t.is_cpu(), op, ": head4d._C was built without CUDA kernels; rebuild with nvcc available (got ",
                    t.device(), ")");
#endif
}

// The kernels' Dtype of a floating tensor; a TypeError naming `op` and `what` otherwise.
inline Dtype kernel_dtype(const at::Tensor& t, const char* op, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", what, " must be float16, bfloat16, float32 or float64, got ",
                       t.scalar_type());
  }
  return Dtype::kFloat32;
}

// The type the kernels accumulate a storage dtype in: float64 for float64, else float32.
inline at::ScalarType accumulate_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ATen's thread pool as the kernels' ParallelFor.
inline ParallelFor host_parallel_for() {
  return [](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    at::parallel_for(0, n, grain, fn);
  };
}

}  // namespace head4d
