// Launchers of the voxel-grid sampling kernels (sample_grid3d): raw pointers in, no
// torch types, so the kernel files compile without torch headers (and with plain nvcc).
// Inputs are checked, relaid and outputs allocated by grid3d_host.cpp.
//
// "acc" below is the accumulation type: float64 for float64 grids, float32 otherwise.
#pragma once

#include <cstdint>
#include <functional>

#include "../common.h"

namespace head4d {
namespace grid3d {

// Outside the grid: zeros beyond the outermost grid points, or the coordinates clamped
// onto the grid (grid_sample's padding_mode "zeros" / "border").
enum Padding : int { kZeros = 0, kBorder = 1 };

struct ForwardArgs {
  const void* grid;    // [N, D, H, W, C] channels-last, contiguous, `dtype`
  const void* points;  // [N, M, 3] contiguous, acc
  void* out;           // [N, M, C] contiguous, `dtype`
  int64_t N, M, C, D, H, W;
  double bound;        // points / bound lie in [-1, 1] on the grid
  int padding;         // Padding
  Dtype dtype;
};

struct BackwardArgs {
  const void* grad_out;  // [N, M, C] contiguous, acc
  const void* grid;      // like ForwardArgs::grid
  const void* points;    // like ForwardArgs::points
  void* grad_grid;       // [N, D, H, W, C] acc, zero-filled; nullptr when not needed
  void* grad_points;     // [N, M, 3] acc, every element written; nullptr when not needed
  int64_t N, M, C, D, H, W;
  double bound;
  int padding;
  Dtype dtype;
};

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for);
// `num_threads`: the size of the host's thread pool; the grid gradient goes through
// that many private buffers (reduced at the end) when they are small, else through
// tasks that each own a band of depth slices. Either way the result does not depend
// on scheduling (only on num_threads).
void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for, int num_threads);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void forward_cuda(const ForwardArgs& args, void* stream);
void backward_cuda(const BackwardArgs& args, void* stream);
#endif

}  // namespace grid3d
}  // namespace head4d
