// Launchers of the triplane-sampling kernels: raw pointers in, no torch types,
// so the kernel files compile without torch headers (and with plain nvcc).
// Inputs are checked and outputs allocated by triplanes_host.cpp.
#pragma once

#include <cstdint>
#include <functional>

#include "../common.h"

namespace head4d {
namespace triplanes {

// Plane layouts, as the Python API's plane_layout names them.
//   kPortrait4D: plane 0 at (x, y), plane 1 at (y, z), plane 2 at (z, x).
//   kEG3D:       plane 0 at (x, y), plane 1 at (x, z), plane 2 at (z, x)  (EG3D's quirk).
enum Layout : int { kPortrait4D = 0, kEG3D = 1 };

// How the three planes' features are combined.
enum Reduce : int { kMean = 0, kSum = 1, kNone = 2 };

struct ForwardArgs {
  const void* planes;  // [N, 3, H, W, C] channels-last, contiguous, `dtype`
  const void* points;  // [N, M, 3] contiguous, float64 if dtype is float64 else float32
  void* out;           // [N, M, C] (mean, sum) or [N, 3, M, C] (none), contiguous, `dtype`
  int64_t N, M, C, H, W;
  double scale;        // 2 / box_warp
  int layout;          // Layout
  int reduce;          // Reduce
  Dtype dtype;
};

struct BackwardArgs {
  const void* grad_out;  // like ForwardArgs::out
  const void* planes;    // like ForwardArgs::planes
  const void* points;    // like ForwardArgs::points
  void* grad_planes;     // [N, 3, H, W, C] accumulation type (float64 for float64, else float32),
                         // zero-filled; nullptr when not needed
  void* grad_points;     // [N, M, 3] accumulation type, zero-filled; nullptr when not needed
  int64_t N, M, C, H, W;
  double scale;
  int layout;
  int reduce;
  Dtype dtype;
};

// Copies planes [P, C, H, W] (contiguous, `element_size` bytes per element) to
// channels-last [P, H, W, C]: a cache-blocked transpose, parallel over planes and rows.
void to_channels_last_cpu(const void* src, void* dst, int64_t P, int64_t C, int64_t H, int64_t W,
                          int element_size, const ParallelFor& parallel_for);

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for, int num_threads);
void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for, int num_threads);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. `vector_loads` allows 16-byte channel loads; the host
// grants it when C * sizeof(dtype) is a multiple of 16 and the pointers are 16-byte aligned.
// Throws std::runtime_error when a launch fails.
void forward_cuda(const ForwardArgs& args, void* stream, bool vector_loads);
void backward_cuda(const BackwardArgs& args, void* stream, bool vector_loads);
#endif

}  // namespace triplanes
}  // namespace head4d
