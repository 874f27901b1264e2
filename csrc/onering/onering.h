// Launchers of the one-ring deformation kernels (one_ring_deform): raw pointers in, no
// torch types, so the kernel files compile without torch headers (and with plain nvcc).
// Inputs are checked, converted and outputs allocated by onering_host.cpp.
//
// Every floating array is in the accumulation type `dtype` (float32, or float64 for
// float64 inputs): the host converts half-precision inputs and outputs, which are
// small next to the work (a nearest-vertex search per point).
#pragma once

#include <cstdint>
#include <functional>

#include "../common.h"

namespace head4d {
namespace onering {

struct ForwardArgs {
  const void* points;         // [N, M, 3] contiguous
  const void* verts_obs;      // [N, V, 3] contiguous
  const void* verts_canon;    // [N, V, 3] contiguous
  const int32_t* neighbours;  // [V, K] contiguous; entries outside [0, V) are padding
  const int32_t* subset;      // [S] candidate vertices (any order, repeats allowed), or nullptr for all V
  void* out;                  // [N, M, 3]
  int32_t* nearest;           // [N, M] the chosen vertex per point (-1: none, only for invalid input)
  int64_t N, M, V, K, S;      // S = V when subset is nullptr
  Dtype dtype;                // kFloat32 or kFloat64
};

struct BackwardArgs {
  const void* grad_out;       // [N, M, 3] contiguous
  const void* points;         // like ForwardArgs
  const void* verts_obs;
  const void* verts_canon;
  const int32_t* neighbours;
  const int32_t* nearest;     // ForwardArgs::nearest
  void* grad_points;          // [N, M, 3], every element written; nullptr when not needed
  void* grad_verts_obs;       // [N, V, 3], zero-filled; nullptr when not needed
  void* grad_verts_canon;     // [N, V, 3], zero-filled; nullptr when not needed
  int64_t N, M, V, K;
  Dtype dtype;
};

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for);
// `num_threads`: the host's pool size; the vertex gradients go through that many
// private buffers, summed in a fixed order (the result depends on it, not on scheduling).
void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for, int num_threads);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void forward_cuda(const ForwardArgs& args, void* stream);
void backward_cuda(const BackwardArgs& args, void* stream);
#endif

}  // namespace onering
}  // namespace head4d
