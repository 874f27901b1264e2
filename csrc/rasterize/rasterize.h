// Launchers of the triangle rasterizer: raw pointers in, no torch types, so the kernel
// files compile without torch headers (and with plain nvcc). rasterize_host.cpp checks
// the inputs, converts them and allocates the outputs.
//
// "A" below is the computation type: float64 for float64 vertices, float32 otherwise
// (the host converts half-precision vertices to float32).
#pragma once

#include <cstdint>

#include "../common.h"

namespace head4d {
namespace rasterize {

struct Args {
  const void* vertices;   // [N, V, 4] clip space, contiguous, A
  const int32_t* faces;   // [F, 3] contiguous; an index outside [0, V) drops the face
  int64_t* face_index;    // [N, H, W] out: the visible face, -1 where empty
  void* barycentric;      // [N, H, W, 3] out, A: perspective-correct, 0 where empty
  void* depth;            // [N, H, W] out, A: NDC z, 0 where empty
  uint64_t* keys;         // [N, H, W] scratch: the depth-test keys (rasterize_math.h)
  int64_t N, V, F;
  int height, width;
  bool cull_backfaces;
  Dtype dtype;            // kFloat32 or kFloat64: the type A of vertices, barycentric, depth
};

void forward_cpu(const Args& args, const ParallelFor& parallel_for);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void forward_cuda(const Args& args, void* stream);
#endif

}  // namespace rasterize
}  // namespace head4d
