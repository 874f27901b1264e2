// Dtype dispatch of the CPU kernels: one switch for every op (the CUDA kernels have
// with_storage_type in cuda_launch.cuh).
#pragma once

#include <stdexcept>
#include <string>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"

namespace head4d {

// Calls fn(scalar_t{}, acc_t{}): the storage type of `dtype` (float, double, c10::Half,
// c10::BFloat16) and its accumulation type (float64 for float64, float32 otherwise).
template <typename Fn>
void with_cpu_storage_type(Dtype dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(float{}, float{});
    case Dtype::kFloat64: return fn(double{}, double{});
    case Dtype::kFloat16: return fn(c10::Half{}, float{});
    case Dtype::kBFloat16: return fn(c10::BFloat16{}, float{});
  }
  throw std::invalid_argument(std::string(op) + ": unsupported dtype");
}

}  // namespace head4d
