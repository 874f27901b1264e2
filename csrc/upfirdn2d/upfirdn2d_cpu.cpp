// CPU kernels of upfirdn2d. The per-output math is upfirdn2d_math.h, the same functions
// the CUDA kernel calls; here the column spans are computed once per call and the row
// span once per row. One task per range of output rows (over all planes); each row is
// written once, so the result does not depend on scheduling.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "upfirdn2d.h"
#include "upfirdn2d_math.h"

namespace head4d {
namespace upfirdn2d {
namespace {

constexpr int64_t kGrainOutputs = 4096;  // outputs per task at least

template <typename scalar_t, typename acc_t, int UX, int UY, int DX, int DY, int FH, int FW, bool SEPARABLE>
void forward_impl(const Args& a, const ParallelFor& parallel_for) {
  const Geometry g = a.geometry;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* taps = static_cast<const acc_t*>(a.taps);
  auto* out = static_cast<scalar_t*>(a.out);
  // the column spans are the same for every row and plane: computed once
  std::vector<TapSpan> col_spans(static_cast<size_t>(g.OW));
  for (int64_t ox = 0; ox < g.OW; ++ox) {
    col_spans[ox] = tap_span(ox, fixed_or<DX>(g.downx), g.padx0, fixed_or<UX>(g.upx), fixed_or<FW>(g.fw), g.W);
  }
  const int64_t rows = g.planes * g.OH;
  const int64_t grain = std::max<int64_t>(1, kGrainOutputs / std::max<int64_t>(1, g.OW));
  parallel_for(rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / g.OH, oy = r - plane * g.OH;
      const TapSpan row_span =
          tap_span(oy, fixed_or<DY>(g.downy), g.pady0, fixed_or<UY>(g.upy), fixed_or<FH>(g.fh), g.H);
      const scalar_t* in = x + plane * g.H * g.W;
      const int64_t W = g.W;
      const auto load = [in, W](int64_t iy, int64_t ix) { return static_cast<acc_t>(in[iy * W + ix]); };
      scalar_t* dst = out + r * g.OW;
      for (int64_t ox = 0; ox < g.OW; ++ox) {
        dst[ox] = static_cast<scalar_t>(
            output_value_in_spans<UX, UY, FW, SEPARABLE, acc_t>(g, taps, row_span, col_spans[ox], load));
      }
    }
  });
}

// fn(UX, UY, DX, DY, FH, FW) as integral constants: 2x up or 2x down (both axes) with a
// 4-tap (4 x 4) filter fixed at compile time, everything else at run time.
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

template <typename Fn>
void with_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: return fn(float{}, float{});
    case Dtype::kFloat64: return fn(double{}, double{});
    case Dtype::kFloat16: return fn(c10::Half{}, float{});
    case Dtype::kBFloat16: return fn(c10::BFloat16{}, float{});
  }
  throw std::invalid_argument("upfirdn2d: unsupported dtype");
}

}  // namespace

void forward_cpu(const Args& args, const ParallelFor& parallel_for) {
  const Geometry& g = args.geometry;
  if (g.planes * g.OH * g.OW == 0) return;
  with_dtype(args.dtype, [&](auto s, auto acc) {
    using scalar_t = decltype(s);
    using acc_t = decltype(acc);
    with_specialization(g, [&](auto ux, auto uy, auto dx, auto dy, auto fh, auto fw) {
      constexpr int UX = decltype(ux)::value, UY = decltype(uy)::value, DX = decltype(dx)::value,
                    DY = decltype(dy)::value, FH = decltype(fh)::value, FW = decltype(fw)::value;
      if (g.separable) {
        forward_impl<scalar_t, acc_t, UX, UY, DX, DY, FH, FW, true>(args, parallel_for);
      } else {
        forward_impl<scalar_t, acc_t, UX, UY, DX, DY, FH, FW, false>(args, parallel_for);
      }
    });
  });
}

}  // namespace upfirdn2d
}  // namespace head4d
