// Per-element math of bias_act (StyleGAN2's fused bias + activation + gain + clamp),
// shared by the CPU and CUDA kernels.
//
// With z = x + b[c], v = f(z) * gain:
//   order 0 (forward):            y   = clamp(v, -clamp, clamp)
//   order 1 (first derivative):   out = g * gain * f'(z)  * pass
//   order 2 (second derivative):  out = g * gain * f''(z) * pass
// pass = 1 where |v| < clamp (or without a clamp, clamp < 0), else 0: the gradient is
// zero where the output is clamped, the boundary included (StyleGAN2's rule). The
// clamp is piecewise constant, so it adds no term of its own to f''.
// The derivatives are written from z (not from the output y), so order 1 and order 2
// are exact for every activation whether or not the output was clamped.
#pragma once

#include <cmath>

#include "../common.h"
#include "../scalar_math.h"

namespace head4d {
namespace bias_act {

// The activations, in the order of the public table (head4d/ops/bias_act.py).
enum Act : int { kLinear = 0, kRelu, kLrelu, kTanh, kSigmoid, kElu, kSelu, kSoftplus, kSwish };

// torch.nn.functional.selu's constants.
constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
// torch.nn.functional.softplus (beta 1) returns z itself above this threshold.
constexpr double kSoftplusThreshold = 20.0;

// f(z), f'(z) and f''(z) of one activation (alpha: the negative slope of lrelu).
template <typename A>
struct Derivatives {
  A value, first, second;
};

template <typename A>
HEAD4D_HD Derivatives<A> activation(int act, A z, A alpha) {
  switch (act) {
    case kRelu:  // torch.relu: NaN stays NaN; the gradient passes where z > 0
      return {z < A(0) ? A(0) : z, z > A(0) ? A(1) : A(0), A(0)};
    case kLrelu:
      return {z > A(0) ? z : z * alpha, z > A(0) ? A(1) : alpha, A(0)};
    case kTanh: {
      const A t = tanh_of(z);
      const A d = A(1) - t * t;
      return {t, d, A(-2) * t * d};
    }
    case kSigmoid: {
      const A s = sigmoid_of(z);
      const A d = s * (A(1) - s);
      return {s, d, d * (A(1) - A(2) * s)};
    }
    case kElu: {  // alpha 1, as StyleGAN2 calls torch's elu
      if (z > A(0)) return {z, A(1), A(0)};
      const A e = exp_of(z);
      return {expm1_of(z), e, e};
    }
    case kSelu: {
      const A scale = A(kSeluScale);
      if (z > A(0)) return {scale * z, scale, A(0)};
      const A e = A(kSeluScale * kSeluAlpha) * exp_of(z);
      return {A(kSeluScale * kSeluAlpha) * expm1_of(z), e, e};
    }
    case kSoftplus: {
      if (z > A(kSoftplusThreshold)) return {z, A(1), A(0)};
      const A s = sigmoid_of(z);
      return {log1p_of(exp_of(z)), s, s * (A(1) - s)};
    }
    case kSwish: {  // z * sigmoid(z)
      const A s = sigmoid_of(z);
      const A d = s * (A(1) - s);
      return {z * s, s + z * d, d * (A(2) + z * (A(1) - A(2) * s))};
    }
    default:  // kLinear
      return {z, A(1), A(0)};
  }
}

// One output element (see the top of this file). `g` is ignored for order 0;
// `has_clamp` is clamp >= 0. Written with selects, not early returns, so that a CPU
// loop over elements with act, order and has_clamp fixed at compile time vectorizes.
template <typename A>
HEAD4D_HD A element(int act, int order, bool has_clamp, A z, A g, A alpha, A gain, A clamp) {
  const Derivatives<A> d = activation(act, z, alpha);
  const A v = d.value * gain;
  if (order == 0) {
    const A clamped = v < -clamp ? -clamp : (v > clamp ? clamp : v);  // NaN stays NaN, as torch.clamp
    return has_clamp ? clamped : v;
  }
  const A derivative = g * gain * (order == 1 ? d.first : d.second);
  return !has_clamp || (v < clamp && v > -clamp) ? derivative : A(0);
}

}  // namespace bias_act
}  // namespace head4d
