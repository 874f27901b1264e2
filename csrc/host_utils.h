// Helpers shared by the op host files (ATen only, no torch/extension.h).
#pragma once

#include <cstdint>
#include <functional>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"

namespace head4d {

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
