// Launchers of the fused triplane decoding kernels (decode_triplanes): raw pointers in,
// no torch types, so the kernel files compile without torch headers.
// Inputs are checked, relaid and converted and outputs allocated by decoding_host.cpp.
//
// Per point p (semantics: head4d/reference/decoding.py):
//   f = mean over the three planes of the bilinear samples   [C]   (as sample_triplanes)
//   z = W1 f + b1,  h = softplus(z)                            [Hd]
//   o = W2 h + b2                                              [O = 1 + Co]
//   sigma = o[0];  rgb = sigmoid(o[1:]) * (1 + 2 * 0.001) - 0.001
// Nothing per point but rgb and sigma is written by the forward; the backward
// recomputes f, z, h and o.
//
// "acc" below is float64 for float64 planes and float32 otherwise.
#pragma once

#include <cstdint>

#include "../common.h"

namespace head4d {
namespace decoding {

// Largest sizes the kernels support (compile-time bounds of their per-point arrays).
constexpr int kMaxFeatures = 64;   // C
constexpr int kMaxHidden = 128;    // Hd
constexpr int kMaxOutputs = 64;    // O = 1 + Co

struct Weights {
  const void* w1;  // [Hd, C] acc, contiguous
  const void* b1;  // [Hd] acc
  const void* w2;  // [O, Hd] acc, contiguous
  const void* b2;  // [O] acc
};

// Bytes per element of a storage dtype.
inline int64_t element_size(Dtype dtype) {
  return dtype == Dtype::kFloat64 ? 8 : (dtype == Dtype::kFloat32 ? 4 : 2);
}

// The channel stride Cs of the planes (and of grad_planes) that the kernels read:
// C on the CPU; C rounded up to a multiple of 16 bytes on CUDA (the host pads the
// extra channels with zeros), so that texels are read with 16-byte loads.
inline int64_t cuda_channel_stride(int64_t C, Dtype dtype) {
  const int64_t vec = 16 / element_size(dtype);
  return (C + vec - 1) / vec * vec;
}

struct ForwardArgs {
  const void* planes;  // [N, 3, H, W, Cs] channels-last, contiguous, `dtype`; CUDA: 16-byte aligned
  const void* points;  // [N, M, 3] contiguous, acc
  Weights weights;
  void* rgb;           // [N, M, O - 1] contiguous, `dtype`
  void* sigma;         // [N, M] contiguous, `dtype`
  int64_t N, M, C, H, W, hidden, outputs;
  double scale;        // 2 / box_warp
  int layout;          // triplanes::Layout
  Dtype dtype;
};

// Per-point vectors the CUDA backward writes for the weight gradients (which the host
// accumulates with matrix products), feature-major: element (d, p) at d * stride + p,
// p = point index - first point of the chunk. A pointer is nullptr when not needed.
struct ChunkBuffers {
  void* f;   // [C, stride] acc: the mean features            (for grad w1)
  void* h;   // [Hd, stride] acc: softplus(z)                  (for grad w2)
  void* gz;  // [Hd, stride] acc: dL/dz                         (for grad w1, b1)
  void* go;  // [O, stride] acc: dL/do                          (for grad w2, b2)
  int64_t stride;
};

struct BackwardArgs {
  const void* grad_rgb;    // [N, M, O - 1] acc, or nullptr (zero)
  const void* grad_sigma;  // [N, M] acc, or nullptr (zero)
  const void* planes;      // like ForwardArgs
  const void* points;
  Weights weights;
  void* grad_planes;       // [N, 3, H, W, Cs] acc, zero-filled; nullptr when not needed
  void* grad_points;       // [N, M, 3] acc, every element written; nullptr when not needed
  // Weight gradients, acc, zero-filled, each nullptr when not needed. Written by the
  // CPU kernels; the CUDA kernels leave them to the host (see ChunkBuffers).
  void* grad_w1;           // [Hd, C]
  void* grad_b1;           // [Hd]
  void* grad_w2;           // [O, Hd]
  void* grad_b2;           // [O]
  int64_t N, M, C, H, W, hidden, outputs;
  double scale;
  int layout;
  Dtype dtype;
};

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for);
void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for, int num_threads);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void forward_cuda(const ForwardArgs& args, void* stream);
// Processes the points [begin, end) (flat indices into N * M): grad_points and
// grad_planes for them, and the chunk buffers (row p - begin) when given.
void backward_cuda(const BackwardArgs& args, const ChunkBuffers& chunk, int64_t begin, int64_t end,
                   void* stream);
#endif

}  // namespace decoding
}  // namespace head4d
