// Kernel launch helpers shared by every *_cuda.cu file: one launch syntax that nvcc and
// the CPU emulation (csrc/cuda_emulation/) both compile, the launch check, the grid
// size for a thread count, the storage-type dispatch and dynamic shared memory.
//
//   HEAD4D_LAUNCH(blocks, threads, shared_bytes, stream, kernel<T, K>)(args...);
//   check_launch("sample_grid3d", "forward");
//
// With nvcc, HEAD4D_LAUNCH is the triple-chevron launch. In the emulated build (the
// .cu files compiled as host C++ with HEAD4D_CUDA_EMULATION) it runs the kernel's
// blocks and threads on the CPU through head4d::emu::launch. The grid, block and
// shared-memory arguments must not contain top-level commas (use a variable).
//
// HEAD4D_SYNC_LAUNCHES=1 in the environment makes check_launch synchronize the device
// after every launch and report an asynchronous fault as the failure of the op and
// kernel that caused it (slow: for debugging and the GPU test script).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common.h"

#if defined(HEAD4D_CUDA_EMULATION)
#define HEAD4D_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::head4d::emu::launcher((grid), (block), (shared_bytes), (stream), __VA_ARGS__)
// A kernel's dynamic shared memory as an array of `type` (16-byte aligned).
#define HEAD4D_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::head4d::emu::dynamic_shared())
#else
#define HEAD4D_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<(grid), (block), (shared_bytes), (stream)>>>
#define HEAD4D_DYNAMIC_SHARED(type, name)                   \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  type* name = reinterpret_cast<type*>(name##_raw)
#endif

namespace head4d {

// Whether every launch synchronizes and checks (HEAD4D_SYNC_LAUNCHES=1); read once.
inline bool sync_launches() {
  static const bool enabled = [] {
    const char* v = std::getenv("HEAD4D_SYNC_LAUNCHES");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return enabled;
}

// Throws std::runtime_error("<op>: <what> launch failed: <reason>") when the last launch
// failed (or, with HEAD4D_SYNC_LAUNCHES=1, when the kernel faulted while running).
inline void check_launch(const char* op, const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && sync_launches()) err = cudaDeviceSynchronize();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": " + what + " launch failed: " + cudaGetErrorString(err));
}

// Throws std::runtime_error("<op>: <what>: <reason>") unless err is cudaSuccess.
inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": " + what + ": " + cudaGetErrorString(err));
}

// A grid of `blocks` blocks, checked against the grid's x limit.
inline unsigned int checked_grid(int64_t blocks, const char* op) {
  if (blocks > 0x7fffffffLL) throw std::runtime_error(std::string(op) + ": input too large for one launch");
  return static_cast<unsigned int>(blocks);
}

// Blocks of `threads_per_block` covering `threads` threads; the grid's x limit checked.
inline unsigned int blocks_for(int64_t threads, int threads_per_block, const char* op) {
  return checked_grid((threads + threads_per_block - 1) / threads_per_block, op);
}

// Calls fn(T{}) with T the device storage type of `dtype` (float, double, __half,
// __nv_bfloat16).
template <typename Fn>
void with_storage_type(Dtype dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(float{});
    case Dtype::kFloat64: return fn(double{});
    case Dtype::kFloat16: return fn(__half{});
    case Dtype::kBFloat16: return fn(__nv_bfloat16{});
  }
  throw std::invalid_argument(std::string(op) + ": unsupported dtype");
}

// Calls fn(A{}) with A the accumulation type of a float32 / float64 op.
template <typename Fn>
void with_float_type(Dtype dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(float{});
    case Dtype::kFloat64: return fn(double{});
    default: break;
  }
  throw std::invalid_argument(std::string(op) + ": unsupported dtype (float32 or float64 expected)");
}

}  // namespace head4d
