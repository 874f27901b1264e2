// Kernels that test the CUDA emulation itself (compiled into head4d._C_emulated only;
// tests/test_cuda_emulation.py): a correct block reduction and the same reduction with
// its barrier removed, a warp reduction by shuffles, and two misuses the emulation must
// report (a shuffle naming an exited lane, a barrier some threads never reach).
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda_launch.cuh"

namespace head4d {
namespace emulation_selftest {
namespace {

constexpr const char* kOp = "emulation_selftest";

// Each thread stores its value in shared memory; thread 0 then adds them up. Without the
// barrier, thread 0 may read slots the others have not written yet.
__global__ void block_sum_kernel(const float* in, float* out, bool barrier) {
  HEAD4D_DYNAMIC_SHARED(float, slots);
  const int t = static_cast<int>(threadIdx.x);
  slots[t] = in[blockIdx.x * blockDim.x + t];
  if (barrier) __syncthreads();
  if (t == 0) {
    float sum = 0.f;
    for (int i = 0; i < static_cast<int>(blockDim.x); ++i) sum += slots[i];
    out[blockIdx.x] = sum;
  }
}

// A warp's sum by shuffles; lane 0 writes it.
__global__ void warp_sum_kernel(const float* in, float* out) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  float v = in[i];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) out[i / 32] = v;
}

// Lanes 16-31 exit, then lanes 0-15 shuffle with the full mask: undefined on a GPU.
__global__ void shuffle_after_exit_kernel(const float* in, float* out) {
  const int i = static_cast<int>(threadIdx.x);
  if (i >= 16) return;
  out[i] = __shfl_xor_sync(0xffffffffu, in[i], 1);
}

// Warp 0 waits at a shuffle while warp 1 waits at __syncthreads, and warp 0's lanes 0-15
// wait at __syncthreads too: no operation can complete.
__global__ void deadlock_kernel(const float* in, float* out) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < 16) {
    __syncthreads();
  } else if (i < 32) {
    out[i] = __shfl_sync(0xffffffffu, in[i], 0);
  } else {
    __syncthreads();
  }
}

}  // namespace

// Runs the named kernel on `input` with `threads` threads per block; returns its output
// or throws the launch's error (std::runtime_error).
std::vector<float> run(const std::string& kernel, const std::vector<float>& input, int threads) {
  if (threads < 1 || input.size() % static_cast<size_t>(threads) != 0)
    throw std::invalid_argument("emulation_selftest: input size must be a multiple of threads");
  const unsigned int blocks = static_cast<unsigned int>(input.size() / threads);
  std::vector<float> out(input.size(), 0.f);
  cudaStream_t stream = nullptr;
  if (kernel == "block_sum" || kernel == "block_sum_no_barrier") {
    HEAD4D_LAUNCH(blocks, threads, threads * sizeof(float), stream, block_sum_kernel)(input.data(), out.data(),
                                                                                        kernel == "block_sum");
    out.resize(blocks);
  } else if (kernel == "warp_sum") {
    HEAD4D_LAUNCH(blocks, threads, 0, stream, warp_sum_kernel)(input.data(), out.data());
    out.resize(input.size() / 32);
  } else if (kernel == "shuffle_after_exit") {
    HEAD4D_LAUNCH(blocks, threads, 0, stream, shuffle_after_exit_kernel)(input.data(), out.data());
  } else if (kernel == "deadlock") {
    HEAD4D_LAUNCH(blocks, threads, 0, stream, deadlock_kernel)(input.data(), out.data());
  } else if (kernel == "too_much_shared") {
    HEAD4D_LAUNCH(blocks, threads, 64 * 1024, stream, block_sum_kernel)(input.data(), out.data(), true);
  } else {
    throw std::invalid_argument("emulation_selftest: unknown kernel " + kernel);
  }
  check_launch(kOp, kernel.c_str());
  return out;
}

}  // namespace emulation_selftest
}  // namespace head4d
