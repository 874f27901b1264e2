// Launchers of the bias_act kernels: raw pointers in, no torch types. Inputs are
// checked, made contiguous and outputs allocated by bias_act_host.cpp.
//
// x is viewed as [outer, C, inner] (C = x.shape[dim], 1 without a bias); the bias is
// indexed by the middle index. "acc" is float64 for float64 x, float32 otherwise.
#pragma once

#include <cstdint>

#include "../common.h"

namespace head4d {
namespace bias_act {

struct Args {
  const void* x;     // [outer, C, inner] contiguous, `dtype`
  const void* bias;  // [C] `dtype`, or nullptr (no bias)
  const void* grad;  // [outer, C, inner] contiguous, `dtype`; nullptr for order 0
  void* out;         // [outer, C, inner] contiguous, `dtype`
  int64_t outer, C, inner;
  int act;           // Act (bias_act_math.h)
  int order;         // 0 value, 1 first derivative times grad, 2 second derivative times grad
  double alpha, gain, clamp;  // clamp < 0: no clamp
  Dtype dtype;
};

void run_cpu(const Args& args, const ParallelFor& parallel_for);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void run_cuda(const Args& args, void* stream);
#endif

}  // namespace bias_act
}  // namespace head4d
