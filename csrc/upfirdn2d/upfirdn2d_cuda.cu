// CUDA kernel of upfirdn2d. The per-output math is upfirdn2d_math.h, the same function
// the CPU kernels call; this file owns the mapping: one thread per output element,
// consecutive threads along a row (coalesced stores, neighbouring loads). 2x up and 2x
// down with a 4-tap (4 x 4) filter are instantiated with the factors and filter size
// fixed, so their tap loops unroll; other calls take them at run time.
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

template <typename T, int UX, int UY, int DX, int DY, int FH, int FW, bool SEPARABLE>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ x, const typename Storage<T>::acc* __restrict__ taps, T* __restrict__ out,
                   Geometry g) {
  using A = typename Storage<T>::acc;
  const int64_t total = g.planes * g.OH * g.OW;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t ox = i % g.OW;
  const int64_t rest = i / g.OW;
  const int64_t oy = rest % g.OH;
  const int64_t plane = rest / g.OH;
  const T* in = x + plane * g.H * g.W;
  const int64_t W = g.W;
  const auto load = [in, W](int64_t iy, int64_t ix) { return ld(in + iy * W + ix); };
  out[i] = Storage<T>::store(output_value<UX, UY, DX, DY, FH, FW, SEPARABLE, A>(g, taps, oy, ox, load));
}

template <typename Fn>
void with_specialization(const Geometry& g, Fn&& fn) {
  using Zero = std::integral_constant<int, 0>;
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  using Four = std::integral_constant<int, 4>;
  const bool four_taps = g.fh == 4 && g.fw == 4;
  const bool no_up = g.upx == 1 && g.upy == 1, no_down = g.downx == 1 && g.downy == 1;
  if (four_taps && no_down && g.upx == 2 && g.upy == 2) return fn(Two{}, Two{}, One{}, One{}, Four{}, Four{});
  if (four_taps && no_up && g.downx == 2 && g.downy == 2) return fn(One{}, One{}, Two{}, Two{}, Four{}, Four{});
  return fn(Zero{}, Zero{}, Zero{}, Zero{}, Zero{}, Zero{});
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
      if (g.separable) {
        HEAD4D_LAUNCH(blocks_for(total, kThreads, kOp), kThreads, 0, static_cast<cudaStream_t>(stream),
                      forward_kernel<T, UX, UY, DX, DY, FH, FW, true>)(x, taps, out, g);
      } else {
        HEAD4D_LAUNCH(blocks_for(total, kThreads, kOp), kThreads, 0, static_cast<cudaStream_t>(stream),
                      forward_kernel<T, UX, UY, DX, DY, FH, FW, false>)(x, taps, out, g);
      }
    });
  });
  check_launch(kOp, "forward");
}

}  // namespace upfirdn2d
}  // namespace head4d
