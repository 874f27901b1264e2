// Launchers of the importance-sampling kernels (sample_importance): raw pointers in,
// no torch types, so the kernel files compile without torch headers.
// Inputs are checked, made contiguous and the output allocated by importance_host.cpp.
//
// Shapes below use `rays` = N * R, S coarse samples per ray, K = S - 3 inner bins and
// `n` fine samples per ray. Storage tensors are in `dtype`; everything marked "acc" is
// float64 for float64 inputs and float32 otherwise (the reference's compute type).
#pragma once

#include <cstdint>

#include "../common.h"

namespace head4d {
namespace importance {

struct Args {
  const void* depths;   // [rays, S] contiguous, dtype
  const void* weights;  // [rays, S - 1] contiguous, dtype
  const void* u;        // acc: [rays, n] contiguous (u_ray_stride = n), or one row [n]
                        // shared by all rays (u_ray_stride = 0, the deterministic u)
  void* out;            // [rays, n] dtype
  void* scratch;        // CUDA only: cuda_scratch_elements() acc values when that is > 0, else nullptr
  int64_t rays, S, n;
  int64_t u_ray_stride;
  Dtype dtype;
};

void sample_cpu(const Args& args, const ParallelFor& parallel_for);

#ifdef HEAD4D_WITH_CUDA
// How many acc elements of global scratch the CUDA kernel needs: 0 when a warp's 32
// rows of S - 1 values fit in shared memory (S up to ~380 in float32, ~190 in
// float64), else about rays * S.
int64_t cuda_scratch_elements(const Args& args);

// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void sample_cuda(const Args& args, void* stream);
#endif

}  // namespace importance
}  // namespace head4d
