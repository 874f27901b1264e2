// Launchers of the volume-compositing kernels (composite_rays): raw pointers in,
// no torch types, so the kernel files compile without torch headers.
// Inputs are checked, made contiguous and outputs allocated by compositing_host.cpp.
//
// Shapes below use `rays` = N * R. Storage tensors are in `dtype`; everything
// marked "acc" is float64 for float64 inputs and float32 otherwise.
#pragma once

#include <cstdint>
#include <functional>

#include "../common.h"

namespace head4d {
namespace compositing {

// What is composited behind the samples: nothing, white (1 on every channel), or a
// per-ray tensor.
// Values per ray in ForwardArgs::aux.
constexpr int kAux = 4;

enum Background : int { kNoBackground = 0, kWhite = 1, kTensor = 2 };

struct ForwardArgs {
  const void* colors;      // [rays, S, C] contiguous, dtype
  const void* densities;   // [rays, S] contiguous, dtype
  const void* depths;      // [rays, S] contiguous, dtype
  const void* background;  // [rays, C] contiguous, dtype; only for kTensor
  const void* depth_min;   // one acc value: min over all depths
  const void* depth_max;   // one acc value: max over all depths
  void* rgb;               // [rays, C] dtype
  void* depth;             // [rays] dtype
  void* weights;           // [rays, S - 1] dtype
  void* aux;               // [rays, kAux] acc: sum_k w_k; the unclamped depth
                           // sum_k w_k t_k / sum_k w_k (NaN kept); the final
                           // transmittance as ScaledTransmittance's (m, e)
  int64_t rays, S, C;
  int background_mode;     // Background
  Dtype dtype;
};

struct BackwardArgs {
  const void* grad_rgb;      // [rays, C] acc
  const void* grad_depth;    // [rays] acc, or nullptr when the depth output got no gradient
  const void* grad_weights;  // [rays, S - 1] acc, or nullptr
  const void* colors;        // like ForwardArgs
  const void* densities;
  const void* depths;
  const void* background;
  const void* depth_min;
  const void* depth_max;
  const void* aux;           // ForwardArgs::aux
  void* grad_colors;         // [rays, S, C] acc, every element written
  void* grad_densities;      // [rays, S] acc, every element written
  void* grad_depths;         // [rays, S] acc, every element written (without the gradient that
                             // the clamp sends to the global min / max: the host adds that)
  void* grad_background;     // [rays, C] acc, or nullptr
  int64_t rays, S, C;
  int background_mode;
  Dtype dtype;
};

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for);
void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void forward_cuda(const ForwardArgs& args, void* stream);
void backward_cuda(const BackwardArgs& args, void* stream);
#endif

}  // namespace compositing
}  // namespace head4d
