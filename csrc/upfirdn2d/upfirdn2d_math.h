// Per-output math of upfirdn2d, shared by the CPU and CUDA kernels.
//
// Output (oy, ox) correlates taps (i, j) with the zero-inserted, padded image at row
// oy * downy + i, column ox * downx + j. That row is input row (oy * downy + i - pady0)
// / upy when the division is exact (the other rows are inserted zeros) and the result
// lies in [0, H); likewise for columns. So only every upy-th tap row, starting at the
// first one that lands on an input row, contributes (polyphase): for 2x upsampling
// with a 4-tap filter, 2 x 2 of the 16 taps per output.
//
// Compile-time specializations: UX, UY, DX, DY, FH, FW > 0 fix the factor or filter
// size (the kernels instantiate 2x up, 2x down and filtering alone with 4 x 4 and
// 4-tap filters: with_specialization below); 0 reads it from the Geometry at run time.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../common.h"
#include "upfirdn2d.h"

namespace head4d {
namespace upfirdn2d {

template <int K>
HEAD4D_HD int fixed_or(int runtime) {
  return K > 0 ? K : runtime;
}

// The first tap index in [0, up) whose sample lands on an input row (column), given the
// zero-inserted coordinate `start` of tap 0.
HEAD4D_HD int first_tap(int64_t start, int up) {
  const int64_t r = start % up;  // in (-up, up)
  return static_cast<int>(r == 0 ? 0 : (r > 0 ? up - r : -r));
}

// The taps along one axis that meet input samples for output index `o`: taps
// first_tap, first_tap + up, ... (count of them) read inputs first_index, first_index + 1, ...
struct TapSpan {
  int first_tap;
  int count;
  int64_t first_index;
};

HEAD4D_HD TapSpan tap_span(int64_t o, int down, int pad0, int up, int taps, int64_t size) {
  const int64_t start = o * down - pad0;  // zero-inserted coordinate of tap 0
  const int j0 = first_tap(start, up);
  const int64_t index0 = (start + j0) / up;  // exact
  const int64_t reaching = j0 < taps ? (taps - 1 - j0) / up + 1 : 0;
  const int64_t k_begin = index0 < 0 ? -index0 : 0;
  const int64_t k_end = reaching < size - index0 ? reaching : size - index0;
  TapSpan span{j0, 0, index0};
  if (k_end > k_begin) {
    span.first_tap = static_cast<int>(j0 + k_begin * up);
    span.count = static_cast<int>(k_end - k_begin);
    span.first_index = index0 + k_begin;
  }
  return span;
}

// One output value in the accumulation type A from its row and column spans (no bounds
// checks left: the spans hold only in-range samples). load(iy, ix) returns input (iy, ix)
// of the current plane, widened to A.
template <int UX, int UY, int FW, bool SEPARABLE, typename A, typename Load>
HEAD4D_HD A output_value_in_spans(const Geometry& g, const A* taps, const TapSpan& rows, const TapSpan& cols,
                                  Load&& load) {
  const int upx = fixed_or<UX>(g.upx), upy = fixed_or<UY>(g.upy), fw = fixed_or<FW>(g.fw);
  A sum = A(0);
  for (int a = 0; a < rows.count; ++a) {
    const int i = rows.first_tap + a * upy;
    const int64_t iy = rows.first_index + a;
    A row = A(0);
    for (int b = 0; b < cols.count; ++b) {
      const int j = cols.first_tap + b * upx;
      row += taps[SEPARABLE ? j : i * fw + j] * load(iy, cols.first_index + b);
    }
    sum += SEPARABLE ? taps[i] * row : row;
  }
  return sum;
}

// One output value (oy, ox) in the accumulation type A.
template <int UX, int UY, int DX, int DY, int FH, int FW, bool SEPARABLE, typename A, typename Load>
HEAD4D_HD A output_value(const Geometry& g, const A* taps, int64_t oy, int64_t ox, Load&& load) {
  const TapSpan rows = tap_span(oy, fixed_or<DY>(g.downy), g.pady0, fixed_or<UY>(g.upy), fixed_or<FH>(g.fh), g.H);
  const TapSpan cols = tap_span(ox, fixed_or<DX>(g.downx), g.padx0, fixed_or<UX>(g.upx), fixed_or<FW>(g.fw), g.W);
  return output_value_in_spans<UX, UY, FW, SEPARABLE, A>(g, taps, rows, cols, load);
}

// fn(UX, UY, DX, DY, FH, FW) as std::integral_constant values: the compile-time
// specializations of the kernels (2x up, 2x down and filtering alone, each with a 4-tap
// or 4 x 4 filter: the cases around every resolution change of StyleGAN2's networks);
// zeros (everything at run time) otherwise. Host code: the CPU and CUDA launchers both
// dispatch through it.
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
  if (four_taps && no_up && no_down) return fn(One{}, One{}, One{}, One{}, Four{}, Four{});
  return fn(Zero{}, Zero{}, Zero{}, Zero{}, Zero{}, Zero{});
}

}  // namespace upfirdn2d
}  // namespace head4d
