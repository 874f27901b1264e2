// Scalar functions shared by the per-element math of several ops (the *_math.h files),
// for the host and the device alike.
#pragma once

#include <cmath>

#include "common.h"

namespace head4d {

// exp, expm1 and log1p of the accumulation type: the CUDA math library on the device,
// <cmath> on the host.
template <typename A>
HEAD4D_HD A exp_of(A x) {
#ifdef __CUDA_ARCH__
  return exp(x);
#else
  return std::exp(x);
#endif
}

// exp(x) - 1 without the cancellation of computing it that way: accurate to a few ulp
// also for |x| far below 1, where 1 - exp(-x) keeps only the last bits of exp's
// rounding (at x = 1e-14 one ulp of exp moves the difference by 1%).
template <typename A>
HEAD4D_HD A expm1_of(A x) {
#ifdef __CUDA_ARCH__
  return expm1(x);
#else
  return std::expm1(x);
#endif
}

template <typename A>
HEAD4D_HD A log1p_of(A x) {
#ifdef __CUDA_ARCH__
  return log1p(x);
#else
  return std::log1p(x);
#endif
}

template <typename A>
HEAD4D_HD A tanh_of(A x) {
#ifdef __CUDA_ARCH__
  return tanh(x);
#else
  return std::tanh(x);
#endif
}

// 1 / (1 + exp(-x)), as torch.sigmoid's definition reads.
template <typename A>
HEAD4D_HD A sigmoid_of(A x) {
  return A(1) / (A(1) + exp_of(-x));
}

// x is neither NaN nor infinite (x - x is NaN for both; no <cmath> call, so the same
// test on the host and the device).
template <typename A>
HEAD4D_HD bool is_finite_of(A x) {
  return x - x == A(0);
}

// Correctly rounded +, -, *, / that nvcc may not fuse into an FMA (on the device the
// intrinsics forbid contraction; on the host, x86-64 without -mfma has no fused
// multiply-add to contract into). For math that must round op by op as the
// reference's tensor ops do.
HEAD4D_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
HEAD4D_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
HEAD4D_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
HEAD4D_HD double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
HEAD4D_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
HEAD4D_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
HEAD4D_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
HEAD4D_HD double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace head4d
