// CUDA kernel of bias_act: one thread per element (a grid-stride loop, 32-bit indices
// when they fit), the bias read through the read-only cache. The math is
// bias_act_math.h, the same the CPU kernel runs.
#include <cstdint>

#include "../cuda_launch.cuh"
#include "../cuda_storage.cuh"
#include "bias_act.h"
#include "bias_act_math.h"

namespace head4d {
namespace bias_act {
namespace {

constexpr const char* kOp = "bias_act";
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

// Index is int32_t when every element index fits (nearly always): the row of an
// element, (i / inner) % C, is then a 32-bit division, several times cheaper on the GPU
// than a 64-bit one, and the kernel stays bound by memory.
template <typename T, typename Index>
__global__ void __launch_bounds__(kThreads)
    bias_act_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ grad,
                    T* __restrict__ out, Index total, Index C, Index inner, int act, int order,
                    typename Storage<T>::acc alpha, typename Storage<T>::acc gain, typename Storage<T>::acc clamp) {
  using A = typename Storage<T>::acc;
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const A b = bias != nullptr ? ld(bias + (i / inner) % C) : A(0);
    const A z = ld(x + i) + b;
    const A g = grad != nullptr ? ld(grad + i) : A(0);
    out[i] = Storage<T>::store(element<A>(act, order, clamp >= A(0), z, g, alpha, gain, clamp));
  }
}

template <typename T, typename Index>
void launch(const Args& a, int64_t total, cudaStream_t stream) {
  using A = typename Storage<T>::acc;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  HEAD4D_LAUNCH(checked_grid(blocks < kMaxBlocks ? blocks : kMaxBlocks, kOp), kThreads, 0, stream,
                bias_act_kernel<T, Index>)(
      static_cast<const T*>(a.x), static_cast<const T*>(a.bias), static_cast<const T*>(a.grad),
      static_cast<T*>(a.out), static_cast<Index>(total), static_cast<Index>(a.C), static_cast<Index>(a.inner),
      a.act, a.order, static_cast<A>(a.alpha), static_cast<A>(a.gain), static_cast<A>(a.clamp));
}

}  // namespace

void run_cuda(const Args& a, void* stream) {
  const int64_t total = a.outer * a.C * a.inner;
  if (total == 0) return;
  // the grid-stride loop's last index is below total + kThreads * kMaxBlocks
  const bool fits_int32 = total <= INT32_MAX - kThreads * kMaxBlocks;
  with_storage_type(a.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    if (fits_int32) {
      launch<T, int32_t>(a, total, static_cast<cudaStream_t>(stream));
    } else {
      launch<T, int64_t>(a, total, static_cast<cudaStream_t>(stream));
    }
  });
  check_launch(kOp, "bias_act");
}

}  // namespace bias_act
}  // namespace head4d
