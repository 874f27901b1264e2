// Per-ray math of importance sampling, shared by the CPU and the CUDA kernels.
//
// Semantics: EG3D's sample_importance / sample_pdf (restated below,
// and head4d/reference/sampling.py, the truth). Per ray, with S coarse depths z, their
// S - 1 weights w, K = S - 3 and A the compute type (float32, float64 for float64):
//
//   pooled[j]   = max(w[j-1], w[j])                  (max_pool1d 2, stride 1, padding 1)
//   smoothed[j] = (pooled[j] + pooled[j+1]) / 2 + 0.01   (avg_pool1d 2, stride 1)
//   v[i]        = smoothed[i+1] + 1e-5,  i = 0..K-1  (only the inner values are used, and
//                 they never touch the padding: v[i] needs w[i], w[i+1], w[i+2])
//   pdf[i]      = v[i] / sum(v),   cdf = [0, cumsum(pdf)]  (K + 1 values)
//   bins[i]     = 0.5 * (z[i] + z[i+1])
//   idx = searchsorted(cdf, u, right=True), below = max(idx-1, 0), above = min(idx, K)
//   step = cdf[above] - cdf[below], 1 where under 1e-5
//   sample = bins[below] + (u - cdf[below]) / step * (bins[above] - bins[below])
//
// Float arithmetic follows the reference op by op, in the same order, rounding to A
// after each (no fused multiply-add: on the GPU the intrinsics below keep nvcc from
// contracting; the host compilers do not contract in ISO C++ mode). The two sums:
//   * sum(v): sequential, accumulated in float64, then rounded to A. torch sums float32 with
//     float32 partial sums in an ISA-dependent order, so its total can differ from
//     this (correctly rounded, in practice) one by an ulp;
//   * cumsum(pdf): sequential, accumulated in float64 and rounded to A at each step,
//     which is exactly what torch's CPU cumsum does (its CPU accumulation type of
//     float32 is float64); torch's CUDA cumsum scans in float32 in a tree order.
// So the CDF agrees with the reference's to an ulp or two, and the samples agree to
// float32 rounding of that (a few eps times bin width / pdf of the bin). A sample can
// jump rather than move by rounding only where the reference's result itself is
// discontinuous in the CDF: where u lies within those ulps of a CDF value whose
// neighbouring step is right at the 1e-5 threshold (a bin whose normalized weight is
// ~1e-5, i.e. weights spanning ~1e3 times the 0.01 floor times K). At an ordinary CDF
// knot the interpolation is continuous (both sides give bins[idx]), so picking the
// neighbouring bin there changes the sample by rounding only.
#pragma once

#include <cstdint>

#include "../common.h"
#include "../scalar_math.h"

namespace head4d {
namespace importance {

// The max of max_pool1d over the window (a, b) in that order: NaN wins (torch's
// `val > max || isnan(val)` scan), else the larger, the first on a tie.
template <typename A>
HEAD4D_HD A pool_max(A a, A b) {
  const A larger = b > a ? b : a;  // selects, not branches: the weights' order is random
  const A with_b_nan = b != b ? b : larger;
  return a != a ? a : with_b_nan;
}

// v[i] from the three weights w[i], w[i+1], w[i+2]: the inner smoothed weight plus
// the PDF's 1e-5.
template <typename A>
HEAD4D_HD A inner_weight(A w0, A w1, A w2) {
  const A m0 = pool_max(w0, w1);
  const A m1 = pool_max(w1, w2);
  const A smoothed = add_rn(div_rn(add_rn(m0, m1), A(2)), A(0.01));
  return add_rn(smoothed, A(1e-5));
}

// The CDF from the inner weights: on entry cdf[1..K] holds v[0..K-1] and `total` is
// sum(v) accumulated sequentially from v[0] in float64; on exit cdf[0..K] is the CDF.
// The cumsum is sequential and accumulated in float64 too (see the file comment).
// Returns whether the CDF is sorted, i.e. no pdf value was negative or NaN (rounding is
// monotone, so running sums of non-negative values round to a non-decreasing sequence).
template <typename A>
HEAD4D_HD bool cdf_from_total(A* cdf, int64_t K, double total) {
  const A sum = static_cast<A>(total);
  double running = 0.0;
  bool sorted = true;
  cdf[0] = A(0);
  for (int64_t i = 1; i <= K; ++i) {
    const A pdf = div_rn(cdf[i], sum);
    sorted = sorted && pdf >= A(0);
    running = add_rn(running, static_cast<double>(pdf));
    cdf[i] = static_cast<A>(running);
  }
  return sorted;
}

// One ray's CDF, in place in a row of K + 2 = S - 1 values: on entry row[0..K+1] holds
// the ray's weights (widened to A), on exit row[0..K] holds the CDF (row[K+1] is left
// as it was). Smoothing, sum and cumsum are one sequential pass each, in this order on
// every backend, so every backend gets the same bits. Returns whether the CDF is sorted.
template <typename A>
HEAD4D_HD bool ray_cdf(A* row, int64_t K) {
  A w0 = row[0], w1 = row[1];
  double total = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    const A w2 = row[i + 2];  // not yet overwritten: step i writes row[i + 1]
    const A v = inner_weight(w0, w1, w2);
    row[i + 1] = v;
    total = add_rn(total, static_cast<double>(v));
    w0 = w1;
    w1 = w2;
  }
  return cdf_from_total(row, K, total);
}

// searchsorted(cdf, u, right=True) over the K + 1 CDF values, then EG3D's clamps:
// below = max(idx - 1, 0), above = min(idx, K).
//
// idx is torch's: the first index whose value is > u, by torch's binary search (a NaN
// compares as "not greater"). On a sorted CDF that index is unique, so any correct
// search finds it: there a branch-free search with a data-independent trip count
// (halving the range, a select per step) runs instead. On an unsorted one (negative or
// NaN weights) the answer depends on the probes, so torch's probe sequence runs.
template <typename A>
HEAD4D_HD void locate(const A* cdf, int64_t K, A u, bool sorted, int64_t& below, int64_t& above) {
  int64_t idx;
  if (sorted) {
    int64_t base = 0, len = K + 1;
    while (len > 1) {  // invariant: idx in [base, base + len], cdf[0 .. base-1] not > u
      const int64_t half = len >> 1;
      base = !(cdf[base + half - 1] > u) ? base + half : base;
      len -= half;
    }
    idx = base + (!(cdf[base] > u) ? 1 : 0);
  } else {
    int64_t lo = 0, hi = K + 1;
    while (lo < hi) {
      const int64_t mid = lo + ((hi - lo) >> 1);
      if (!(cdf[mid] > u)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    idx = lo;
  }
  below = idx - 1 < 0 ? 0 : idx - 1;
  above = idx > K ? K : idx;
}

// bins[i] from z[i] and z[i+1].
template <typename A>
HEAD4D_HD A bin_mid(A z0, A z1) {
  return mul_rn(A(0.5), add_rn(z0, z1));
}

// The sample inside [bin_below, bin_above] for u, from cdf[below] and cdf[above].
template <typename A>
HEAD4D_HD A interpolate(A u, A cdf_below, A cdf_above, A bin_below, A bin_above) {
  A step = sub_rn(cdf_above, cdf_below);
  if (step < A(1e-5)) step = A(1);
  const A t = div_rn(sub_rn(u, cdf_below), step);
  return add_rn(bin_below, mul_rn(t, sub_rn(bin_above, bin_below)));
}

}  // namespace importance
}  // namespace head4d
