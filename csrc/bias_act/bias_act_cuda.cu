// CUDA kernel of bias_act: one thread per element (a grid-stride loop), the bias read
// through the read-only cache. The math is bias_act_math.h, the same the CPU kernel runs.
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

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bias_act_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ grad,
                    T* __restrict__ out, int64_t total, int64_t C, int64_t inner, int act, int order,
                    typename Storage<T>::acc alpha, typename Storage<T>::acc gain, typename Storage<T>::acc clamp) {
  using A = typename Storage<T>::acc;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const A b = bias != nullptr ? ld(bias + (i / inner) % C) : A(0);
    const A z = ld(x + i) + b;
    const A g = grad != nullptr ? ld(grad + i) : A(0);
    out[i] = Storage<T>::store(element<A>(act, order, clamp >= A(0), z, g, alpha, gain, clamp));
  }
}

}  // namespace

void run_cuda(const Args& a, void* stream) {
  const int64_t total = a.outer * a.C * a.inner;
  if (total == 0) return;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  with_storage_type(a.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Storage<T>::acc;
    HEAD4D_LAUNCH(checked_grid(blocks < kMaxBlocks ? blocks : kMaxBlocks, kOp), kThreads, 0,
                  static_cast<cudaStream_t>(stream), bias_act_kernel<T>)(
        static_cast<const T*>(a.x), static_cast<const T*>(a.bias), static_cast<const T*>(a.grad),
        static_cast<T*>(a.out), total, a.C, a.inner, a.act, a.order, static_cast<A>(a.alpha),
        static_cast<A>(a.gain), static_cast<A>(a.clamp));
  });
  check_launch(kOp, "bias_act");
}

}  // namespace bias_act
}  // namespace head4d
