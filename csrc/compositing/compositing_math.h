// Per-interval math of volume compositing, shared by the CPU and the CUDA kernels.
//
// Semantics: EG3D's MipRayMarcher2 (head4d/reference/compositing.py, the truth). For
// the interval k between samples k and k + 1 of a ray:
//   delta = t[k+1] - t[k],  z = (s[k] + s[k+1]) / 2 - 1,
//   sigma = softplus(z)  (torch's: z itself above 20),
//   alpha = 1 - exp(-(sigma * delta)),  w_k = alpha_k * T_k,
//   T_{k+1} = T_k * (1 - alpha_k + 1e-10),  T_0 = 1.
// alpha is computed as -expm1(-(sigma * delta)): the same function as EG3D's
// 1 - exp(-x), without its cancellation for small x (x = 1e-14 leaves only exp's last
// rounding bits). dalpha/dx = exp(-x) is computed by exp itself, not as 1 - alpha
// (which would cancel for large x).
//
// Backward, per ray, with e_k = dL/dw_k (everything that reads w_k directly):
//   dL/dalpha_k = e_k T_k - (sum_{i>k} e_i w_i) / (1 - alpha_k + 1e-10) = T_k (e_k - U_k),
//   U_k = sum_{i>k} e_i alpha_i prod_{k<j<i} keep_j,  U_{k-1} = e_k alpha_k + keep_k U_k,
// a reverse scan. (The suffix sum as "total - running prefix" cancels badly in float32
// once alpha rounds to 1 and keep = 1e-10 amplifies the cancellation error; the
// reverse recursion has no cancellation and no division by keep.) T_k is recovered in
// the reverse scan as T_{k+1} / keep_k from the final T of a cheap forward pass, in a
// scaled form that never underflows; nothing per sample is stored.
#pragma once

#include <cmath>
#include <limits>

#include "../common.h"
#include "../scalar_math.h"

namespace head4d {
namespace compositing {

template <typename A>
HEAD4D_HD bool is_nan(A x) {
  return x != x;
}

// torch.nn.functional.softplus with beta 1 and threshold 20.
template <typename A>
HEAD4D_HD A softplus(A z) {
  return z > A(20) ? z : log1p_of(exp_of(z));
}

// Its derivative, as torch's softplus_backward computes it: g * e / (e + 1), e = exp(z).
template <typename A>
HEAD4D_HD A softplus_backward(A grad, A z, A e) {
  if (z > A(20)) return grad;
  return grad * e / (e + A(1));
}

// One interval's forward quantities.
template <typename A>
struct Interval {
  A delta;  // t[k+1] - t[k]
  A z;      // shifted midpoint density, the softplus argument
  A ez;     // exp(z) (what softplus and its derivative share; unused above 20)
  A sigma;  // softplus(z)
  A optical_depth;  // x = sigma * delta
  A alpha;  // 1 - exp(-x), as -expm1(-x)
  A keep;   // 1 - alpha + 1e-10, the transmittance factor
};

template <typename A>
HEAD4D_HD Interval<A> make_interval(A s0, A s1, A t0, A t1) {
  Interval<A> iv;
  iv.delta = t1 - t0;
  iv.z = (s0 + s1) / A(2) - A(1);
  iv.ez = exp_of(iv.z);
  iv.sigma = iv.z > A(20) ? iv.z : log1p_of(iv.ez);  // softplus(z)
  iv.optical_depth = iv.sigma * iv.delta;
  iv.alpha = -expm1_of(-iv.optical_depth);
  iv.keep = A(1) - iv.alpha + A(1e-10);
  return iv;
}

// A transmittance T = m * 2^(-64 e), kept with m in a safe range so that long
// products of tiny factors (keep >= 1e-10) neither underflow nor lose the ability
// to be divided back out.
template <typename A>
struct ScaledTransmittance {
  A m = A(1);
  int e = 0;

  HEAD4D_HD void multiply(A keep) {
    m = m * keep;
    if (m < A(5.421010862427522e-20)) {  // 2^-64
      m = m * A(18446744073709551616.0);  // 2^64
      ++e;
    }
  }
  HEAD4D_HD void divide(A keep) {
    m = m / keep;
    if (e > 0 && m > A(1)) {
      m = m * A(5.421010862427522e-20);
      --e;
    }
  }
  HEAD4D_HD A value() const {
    A v = m;  // m * 2^(-64 e); a few steps at most before it underflows to 0
    for (int i = 0; i < e && v != A(0); ++i) v = v * A(5.421010862427522e-20);
    return v;
  }
};

// dalpha / dx = exp(-x), for the backward only (the forward needs no exp of x).
template <typename A>
HEAD4D_HD A alpha_derivative(const Interval<A>& iv) {
  return exp_of(-iv.optical_depth);
}

template <typename A>
HEAD4D_HD A midpoint(A a, A b) {
  return (a + b) / A(2);
}

// depth = dsum / total, then torch.nan_to_num(nan=inf): NaN (zero total weight) ->
// +inf, +-inf -> the largest finite value of that sign; then clamp to [lo, hi] like
// torch.clamp (max first, then min; a NaN bound, from a NaN among the depths, gives NaN).
template <typename A>
HEAD4D_HD A final_depth(A raw, A lo, A hi) {
  if (is_nan(lo) || is_nan(hi)) return lo + hi;
  A d = raw;
  if (is_nan(raw)) {
    d = A(INFINITY);
  } else if (raw == A(INFINITY)) {
    d = std::numeric_limits<A>::max();
  } else if (raw == -A(INFINITY)) {
    d = std::numeric_limits<A>::lowest();
  }
  d = d < lo ? lo : d;
  d = d > hi ? hi : d;
  return d;
}

// The final rgb value of one channel from sum_k w_k c_k, the total weight and the background.
template <typename A>
HEAD4D_HD A final_rgb(A acc, A total, int mode, A background) {
  A v = acc;
  if (mode == 1) {
    v = v + A(1) - total;  // white: rgb + 1 - total, in the reference's order
  } else if (mode == 2) {
    v = v + (A(1) - total) * background;
  }
  return v * A(2) - A(1);
}

// The coefficient of (t_mid_k - raw) in e_k from the depth output, as autograd
// through the reference gives it: g / total where the depth was neither NaN nor
// clamped; NaN where it was NaN (0 / 0 in the division's backward); 0 where it was
// clamped (the clamp sends the gradient to the global min / max instead).
template <typename A>
HEAD4D_HD A depth_coefficient(bool has_grad, A grad, A raw, A total, A lo, A hi) {
  if (!has_grad) return A(0);
  if (is_nan(raw)) return raw;
  if (raw >= lo && raw <= hi) return grad / total;
  return A(0);
}

// dcoef * (t_mid - raw), the depth output's part of e_k; exactly 0 where dcoef is 0
// (raw may be NaN there: a zero-weight ray whose depth got no gradient).
template <typename A>
HEAD4D_HD A depth_term(A dcoef, A t_mid, A raw) {
  return dcoef == A(0) ? A(0) : dcoef * (t_mid - raw);
}

// The backward's reverse scan over one ray, shared by the CPU and CUDA kernels. It
// starts from the final transmittance the forward saved and visits the intervals
// k = S-2 ... 0 (samples k and k+1), carrying U_k and the previous interval's terms.
// Each step returns the gradients of sample k+1, which gets half of intervals k and k+1
// through the midpoints; sample 0's come from finish() after the last step.
template <typename A>
struct ReverseScan {
  ScaledTransmittance<A> trans;
  A U = A(0);
  A w_next = A(0), gz_next = A(0), gtm_next = A(0), gdelta_next = A(0);

  struct SampleGrads {
    A density;       // dL/d sigma_raw[k+1]
    A depth;         // dL/d t[k+1]
    A color_weight;  // dL/d c[k+1] = color_weight * g
  };

  // s0, s1, t0, t1: the raw densities and depths of samples k, k+1; p0, p1: g . c[k],
  // g . c[k+1]; g_bg: g . background; dcoef, raw: the depth output's coefficient and
  // raw value; gw: the gradient of weight k, or null when the weights got none.
  HEAD4D_HD SampleGrads step(A s0, A s1, A t0, A t1, A p0, A p1, A g_bg, A dcoef, A raw, const A* gw) {
    const Interval<A> iv = make_interval(s0, s1, t0, t1);
    trans.divide(iv.keep);
    const A T = trans.value();
    const A w = iv.alpha * T;
    A e = A(2) * (midpoint(p0, p1) - g_bg) + depth_term(dcoef, midpoint(t0, t1), raw);
    if (gw != nullptr) e += *gw;
    const A g_alpha = T * (e - U);
    U = e * iv.alpha + iv.keep * U;
    const A g_x = g_alpha * alpha_derivative(iv);  // x = sigma * delta, alpha = -expm1(-x)
    const A gz = softplus_backward(g_x * iv.delta, iv.z, iv.ez);
    const A gdelta = g_x * iv.sigma;
    const A gtm = dcoef * w;
    const SampleGrads out{(gz + gz_next) / A(2), (gtm + gtm_next) / A(2) + gdelta - gdelta_next, w + w_next};
    w_next = w;
    gz_next = gz;
    gtm_next = gtm;
    gdelta_next = gdelta;
    return out;
  }

  // Sample 0's gradients, after the step of interval 0.
  HEAD4D_HD SampleGrads finish() const { return SampleGrads{gz_next / A(2), gtm_next / A(2) - gdelta_next, w_next}; }
};

}  // namespace compositing
}  // namespace head4d
