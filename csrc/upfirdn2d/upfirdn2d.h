// Launchers of the FIR resampling kernels (upfirdn2d): raw pointers in, no torch types,
// so the kernel files compile without torch headers (and with plain nvcc). Inputs are
// checked, the filter prepared and the output allocated by upfirdn2d_host.cpp.
//
// "acc" below is the accumulation type: float64 for float64 inputs, float32 otherwise.
#pragma once

#include <cstdint>

#include "../common.h"

namespace head4d {
namespace upfirdn2d {

// Sizes and factors of one call. The kernels correlate the zero-inserted, padded input
// with `taps` (the host has already flipped the filter for a true convolution and
// scaled it by the gain).
struct Geometry {
  int64_t planes;      // N * C
  int64_t H, W;        // input rows, columns
  int64_t OH, OW;      // output rows, columns
  int upx, upy;        // zero-insertion factors
  int downx, downy;    // decimation factors
  int padx0, pady0;    // leading padding (negative: cropping); the trailing one only sets OH, OW
  int fh, fw;          // filter rows, columns (fh == fw for a separable filter)
  bool separable;      // taps is one 1-D filter applied along x, then along y
};

struct Args {
  const void* x;     // [N * C, H, W] contiguous, `dtype`
  const void* taps;  // [fh, fw], or [fw] when separable; contiguous, acc
  void* out;         // [N * C, OH, OW] contiguous, `dtype`
  Geometry geometry;
  Dtype dtype;
};

void forward_cpu(const Args& args, const ParallelFor& parallel_for);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void forward_cuda(const Args& args, void* stream);
#endif

}  // namespace upfirdn2d
}  // namespace head4d
