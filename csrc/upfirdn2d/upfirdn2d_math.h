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
// size (the kernels instantiate 2x up and 2x down with 4 x 4 and 4-tap filters); 0
// reads it from the Geometry at run time.
#pragma once

#include <cstdint>

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

// One output value in the accumulation type A. load(iy, ix) returns input (iy, ix) of
// the current plane, widened to A.
template <int UX, int UY, int DX, int DY, int FH, int FW, bool SEPARABLE, typename A, typename Load>
HEAD4D_HD A output_value(const Geometry& g, const A* taps, int64_t oy, int64_t ox, Load&& load) {
  const int upx = fixed_or<UX>(g.upx), upy = fixed_or<UY>(g.upy);
  const int downx = fixed_or<DX>(g.downx), downy = fixed_or<DY>(g.downy);
  const int fh = fixed_or<FH>(g.fh), fw = fixed_or<FW>(g.fw);
  const int64_t start_y = oy * downy - g.pady0;  // zero-inserted row of tap row 0
  const int64_t start_x = ox * downx - g.padx0;
  const int i0 = first_tap(start_y, upy), j0 = first_tap(start_x, upx);
  A sum = A(0);
  for (int i = i0; i < fh; i += upy) {
    const int64_t iy = (start_y + i) / upy;  // exact
    if (iy < 0 || iy >= g.H) continue;
    A row = A(0);
    for (int j = j0; j < fw; j += upx) {
      const int64_t ix = (start_x + j) / upx;
      if (ix < 0 || ix >= g.W) continue;
      row += taps[SEPARABLE ? j : i * fw + j] * load(iy, ix);
    }
    sum += SEPARABLE ? taps[i] * row : row;
  }
  return sum;
}

}  // namespace upfirdn2d
}  // namespace head4d
