// CUDA kernel of upfirdn2d. The per-output math is upfirdn2d_math.h, the same function
// the CPU kernels call; this file owns the mapping: one thread per output element,
// consecutive threads along a row (coalesced stores, neighbouring loads), 32-bit index
// arithmetic when the sizes allow. 2x up, 2x down and filtering alone with a 4-tap
// (4 x 4) filter are instantiated with the factors and filter size fixed
// (with_specialization in upfirdn2d_math.h), so their tap loops unroll; other calls take
// them at run time.
#include <cstdint>
#include <type_traits>

#include "../cuda_launch.cuh"
#include "../cuda_storage.cuh"
#include "upfirdn2d.h"
#include "upfirdn2d_math.h"

namespace head4d {
namespace upfirdn2d {
namespace {

constexpr const char* kOp = "upfirdn2d";
constexpr int kThreads = 256;

// Index: int32_t when every input and output index fits (nearly always), so that the
// division of the flat index into (plane, oy, ox) is 32-bit, several times cheaper on
// the GPU than 64-bit.
template <typename T, typename Index, int UX, int UY, int DX, int DY, int FH, int FW, bool SEPARABLE>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const typename Storage<T>::acc* __restrict__ taps, T* __restrict__ out,
                   Geometry g) {
  using A = typename Storage<T>::acc;
  const Index total = static_cast<Index>(g.planes * g.OH * g.OW);
  const Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const Index OW = static_cast<Index>(g.OW), OH = static_cast<Index>(g.OH);
  const Index ox = i % OW;
  const Index rest = i / OW;
  const Index oy = rest % OH;
  const Index plane = rest / OH;
  const T* in = x + plane * g.H * g.W;
  const int64_t W = g.W;
  const auto load = [in, W](int64_t iy, int64_t ix) { return ld(in + iy * W + ix); };
  out[i] = Storage<T>::store(output_value<UX, UY, DX, DY, FH, FW, SEPARABLE, A>(g, taps, oy, ox, load));
}

}  // namespace

void forward_cuda(const Args& a, void* stream) {
  const Geometry& g = a.geometry;
  const int64_t total = g.planes * g.OH * g.OW;
  if (total == 0) return;
  with_storage_type(a.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Storage<T>::acc;
    with_specialization(g, [&](auto ux, auto uy, auto dx, auto dy, auto fh, auto fw) {
      constexpr int UX = decltype(ux)::value, UY = decltype(uy)::value, DX = decltype(dx)::value,
                    DY = decltype(dy)::value, FH = decltype(fh)::value, FW = decltype(fw)::value;
      const auto* x = static_cast<const T*>(a.x);
      const auto* taps = static_cast<const A*>(a.taps);
      auto* out = static_cast<T*>(a.out);
      const auto launch = [&](auto index_tag, auto separable) {
        using Index = decltype(index_tag);
        HEAD4D_LAUNCH(blocks_for(total, kThreads, kOp), kThreads, 0, static_cast<cudaStream_t>(stream),
                      forward_kernel<T, Index, UX, UY, DX, DY, FH, FW, decltype(separable)::value>)(x, taps, out, g);
      };
      // the last thread's index is below total + kThreads
      const bool fits_int32 = total + kThreads <= INT32_MAX && g.planes * g.H * g.W <= INT32_MAX;
      if (fits_int32 && g.separable) return launch(int32_t{}, std::true_type{});
      if (fits_int32) return launch(int32_t{}, std::false_type{});
      if (g.separable) return launch(int64_t{}, std::true_type{});
      launch(int64_t{}, std::false_type{});
    });
  });
  check_launch(kOp, "forward");
}

}  // namespace upfirdn2d
}  // namespace head4d
