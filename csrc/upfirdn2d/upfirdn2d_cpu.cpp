// CPU kernels of upfirdn2d. The per-output math is upfirdn2d_math.h, the same functions
// the CUDA kernel calls; here the column spans are computed once per call and the row
// span once per row. One task per range of output rows (over all planes); each row is
// written once, so the result does not depend on scheduling.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>


#include "upfirdn2d.h"
#include "upfirdn2d_math.h"
#include "../cpu_dispatch.h"

namespace head4d {
namespace upfirdn2d {
namespace {

constexpr int64_t kGrainOutputs = 4096;  // outputs per task at least

// The 4 x 4 correlation taps as a local table (a separable filter as its outer product).
template <typename acc_t, bool SEPARABLE>
void taps_4x4(const acc_t* taps, acc_t (&t)[4][4]) {
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) t[i][j] = SEPARABLE ? taps[i] * taps[j] : taps[i * 4 + j];
  }
}

// Interior of one output row of 2x upsampling with 4 x 4 taps, where both tap rows meet
// input rows `in0` and `in1` (taps rows i0 and i0 + 2). With c = ox - padx0, output
// column c = 2m reads taps 0 and 2 at inputs m and m + 1, and c = 2m + 1 reads taps 1
// and 3 at inputs m + 1 and m + 2 (the polyphase rule of upfirdn2d_math.h), so a pair
// of outputs needs three neighbouring inputs per row and no bounds checks: the loop
// vectorizes. Returns the columns [begin, end) it wrote.
template <typename scalar_t, typename acc_t>
std::pair<int64_t, int64_t> up2_row_interior(const scalar_t* __restrict in0, const scalar_t* __restrict in1,
                                             scalar_t* __restrict dst, const acc_t (&t)[4][4], int i0,
                                             int64_t W, int64_t OW, int padx0) {
  // m in [m_lo, m_hi]: 0 <= m, m + 2 <= W - 1, and both outputs padx0 + 2m (+1) in [0, OW)
  const int64_t m_lo = std::max<int64_t>(0, (static_cast<int64_t>(-padx0) + 1) / 2);
  const int64_t m_hi = std::min<int64_t>(W - 3, (OW - 2 - padx0) >= 0 ? (OW - 2 - padx0) / 2 : -1);
  if (m_hi < m_lo) return {0, 0};
  const acc_t a0 = t[i0][0], a1 = t[i0][1], a2 = t[i0][2], a3 = t[i0][3];
  const acc_t b0 = t[i0 + 2][0], b1 = t[i0 + 2][1], b2 = t[i0 + 2][2], b3 = t[i0 + 2][3];
  scalar_t* __restrict out = dst + padx0;
  for (int64_t m = m_lo; m <= m_hi; ++m) {
    const acc_t p0 = static_cast<acc_t>(in0[m]), p1 = static_cast<acc_t>(in0[m + 1]),
                p2 = static_cast<acc_t>(in0[m + 2]);
    const acc_t q0 = static_cast<acc_t>(in1[m]), q1 = static_cast<acc_t>(in1[m + 1]),
                q2 = static_cast<acc_t>(in1[m + 2]);
    out[2 * m] = static_cast<scalar_t>((a0 * p0 + a2 * p1) + (b0 * q0 + b2 * q1));
    out[2 * m + 1] = static_cast<scalar_t>((a1 * p1 + a3 * p2) + (b1 * q1 + b3 * q2));
  }
  return {padx0 + 2 * m_lo, padx0 + 2 * m_hi + 2};
}

// Interior of one output row of a 4 x 4 filter with decimation by D (1: filter only,
// 2: 2x downsampling) over input rows rows[0..3]: output ox reads columns
// D ox - padx0 + j, j < 4, all in range for ox in the returned [begin, end).
template <int D, typename scalar_t, typename acc_t>
std::pair<int64_t, int64_t> decimate_row_interior(const scalar_t* const (&rows)[4], scalar_t* __restrict dst,
                                                  const acc_t (&t)[4][4], int64_t W, int64_t OW, int padx0) {
  // D ox - padx0 >= 0 and D ox - padx0 + 3 <= W - 1, and ox < OW
  const int64_t begin = padx0 > 0 ? (padx0 + D - 1) / D : 0;
  const int64_t end = std::min<int64_t>(OW, W - 4 + padx0 >= 0 ? (W - 4 + padx0) / D + 1 : 0);
  if (end <= begin) return {0, 0};
  const scalar_t* __restrict r0 = rows[0] - padx0;
  const scalar_t* __restrict r1 = rows[1] - padx0;
  const scalar_t* __restrict r2 = rows[2] - padx0;
  const scalar_t* __restrict r3 = rows[3] - padx0;
  for (int64_t ox = begin; ox < end; ++ox) {
    const int64_t c = D * ox;
    acc_t sum = acc_t(0);
    for (int j = 0; j < 4; ++j) {
      sum += t[0][j] * static_cast<acc_t>(r0[c + j]) + t[1][j] * static_cast<acc_t>(r1[c + j]) +
             t[2][j] * static_cast<acc_t>(r2[c + j]) + t[3][j] * static_cast<acc_t>(r3[c + j]);
    }
    dst[ox] = static_cast<scalar_t>(sum);
  }
  return {begin, end};
}

template <typename scalar_t, typename acc_t, int UX, int UY, int DX, int DY, int FH, int FW, bool SEPARABLE>
void forward_impl(const Args& a, const ParallelFor& parallel_for) {
  const Geometry g = a.geometry;
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* taps = static_cast<const acc_t*>(a.taps);
  auto* out = static_cast<scalar_t*>(a.out);
  // 2x up, 2x down and filtering only, with 4 x 4 taps: the interior of each row runs a
  // bounds-free loop,
  // the columns and rows near the borders the general per-output code below.
  constexpr bool kUp2 = UX == 2 && UY == 2 && DX == 1 && DY == 1 && FH == 4 && FW == 4;
  constexpr bool kDown2 = UX == 1 && UY == 1 && DX == 2 && DY == 2 && FH == 4 && FW == 4;
  constexpr bool kFilter4 = UX == 1 && UY == 1 && DX == 1 && DY == 1 && FH == 4 && FW == 4;
  acc_t t[4][4] = {};
  if (kUp2 || kDown2 || kFilter4) taps_4x4<acc_t, SEPARABLE>(taps, t);
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
      std::pair<int64_t, int64_t> done{0, 0};
      if (kUp2 && row_span.count == 2) {
        done = up2_row_interior<scalar_t, acc_t>(in + row_span.first_index * W, in + (row_span.first_index + 1) * W,
                                                 dst, t, row_span.first_tap, W, g.OW, g.padx0);
      } else if ((kDown2 || kFilter4) && row_span.count == 4) {
        const scalar_t* const row_ptrs[4] = {in + row_span.first_index * W, in + (row_span.first_index + 1) * W,
                                             in + (row_span.first_index + 2) * W,
                                             in + (row_span.first_index + 3) * W};
        done = decimate_row_interior<kDown2 ? 2 : 1, scalar_t, acc_t>(row_ptrs, dst, t, W, g.OW, g.padx0);
      }
      for (int64_t ox = 0; ox < g.OW; ++ox) {
        if (ox == done.first && done.second > done.first) ox = done.second;
        if (ox >= g.OW) break;
        dst[ox] = static_cast<scalar_t>(
            output_value_in_spans<UX, UY, FW, SEPARABLE, acc_t>(g, taps, row_span, col_spans[ox], load));
      }
    }
  });
}

}  // namespace

void forward_cpu(const Args& args, const ParallelFor& parallel_for) {
  const Geometry& g = args.geometry;
  if (g.planes * g.OH * g.OW == 0) return;
  with_cpu_storage_type(args.dtype, "upfirdn2d", [&](auto s, auto acc) {
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
