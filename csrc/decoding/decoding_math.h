// Per-point math of the fused triplane decoder, shared by the CPU and the CUDA kernels.
//
// Semantics (head4d/reference/decoding.py, the truth): the mean triplane feature f [C]
// goes through z = W1 f + b1, h = softplus(z) (torch's: z itself above 20),
// o = W2 h + b2; sigma = o[0] raw, rgb = sigmoid(o[1:]) * (1 + 2 * 0.001) - 0.001.
//
// The weights are read from one packed array that both kernels build the same way
// (CPU: a vector; CUDA: shared memory), padded so that the per-point arrays have
// compile-time sizes KC >= C and KO >= O (multiples of 4) and stay in registers:
//   w1p [Hd][KC]   row j = W1[j, 0..C-1], zeros after
//   b1  [Hd]
//   w2t [Hd][KO]   row j = W2[0..O-1, j] (transposed), zeros after
//   b2p [KO]       b2, zeros after
// each segment starting at a multiple of 4 elements (16-byte aligned for float).
// Padded features and outputs are zero and stay zero through every function here.
//
// Nothing here touches the planes or the outputs: the launchers own those loads and
// stores, these functions own the arithmetic, so the CPU tests exercise the GPU's math.
// One exception: in float32 the CPU evaluates softplus and sigmoid four lanes at a time
// with its own exp / log1p polynomials (cpu_vec, within a few ulp of libm) where the
// GPU calls CUDA's exp / log1p; the summation orders are the same on both.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common.h"
#include "../triplanes/triplanes_math.h"
#include "../scalar_math.h"
#include "decoding.h"

// Full unrolling of the fixed-size loops below (nvcc's pragma; host compilers unroll
// such short constant loops at -O3 on their own).
#if defined(__CUDACC__)
#define HEAD4D_DECODING_UNROLL _Pragma("unroll")
#else
#define HEAD4D_DECODING_UNROLL
#endif

namespace head4d {
namespace decoding {

// torch.nn.Softplus() (beta 1, threshold 20) and its slope, sharing exp(z).
template <typename A>
HEAD4D_HD void softplus_and_slope(A z, A& value, A& slope) {
  if (z > A(20)) {
    value = z;
    slope = A(1);
  } else {
    const A e = exp_of(z);
    value = log1p_of(e);
    slope = e / (e + A(1));  // torch's softplus_backward: g * e / (e + 1)
  }
}

template <typename A>
HEAD4D_HD A softplus(A z) {
  return z > A(20) ? z : log1p_of(exp_of(z));
}

// rgb = sigmoid(x) * (1 + 2 * 0.001) - 0.001 (the constants as Python computes them).
template <typename A>
HEAD4D_HD A rgb_scale() {
  return static_cast<A>(1.0 + 2.0 * 0.001);
}

template <typename A>
HEAD4D_HD A rgb_of_logit(A x) {
  return sigmoid_of(x) * rgb_scale<A>() - A(0.001);
}

// d rgb / d x times g, in autograd's order: (g * scale) * (1 - s) * s.
template <typename A>
HEAD4D_HD A rgb_logit_grad(A g, A x) {
  const A s = sigmoid_of(x);
  return (g * rgb_scale<A>()) * (A(1) - s) * s;
}

// ----------------------------------------------------------------------------------
// The packed weights
// ----------------------------------------------------------------------------------

HEAD4D_HD int64_t round_up4(int64_t x) { return (x + 3) / 4 * 4; }

template <int KC, int KO>
struct Packing {
  static_assert(KC % 4 == 0 && KO % 4 == 0, "KC and KO must be multiples of 4");
  int hidden;
  HEAD4D_HD int64_t w1() const { return 0; }
  HEAD4D_HD int64_t b1() const { return static_cast<int64_t>(hidden) * KC; }
  HEAD4D_HD int64_t w2t() const { return round_up4(b1() + hidden); }
  HEAD4D_HD int64_t b2() const { return w2t() + static_cast<int64_t>(hidden) * KO; }
  HEAD4D_HD int64_t size() const { return b2() + KO; }
};

// Element `idx` of the packed array, from the plain weights w1 [Hd, C], b1 [Hd],
// w2 [O, Hd], b2 [O] (contiguous, accumulation type).
template <int KC, int KO, typename A>
HEAD4D_HD A packed_value(const A* w1, const A* b1, const A* w2, const A* b2, int64_t idx, int C, int hidden,
                         int outputs) {
  const Packing<KC, KO> pk{hidden};
  if (idx < pk.b1()) {
    const int64_t j = idx / KC, c = idx % KC;
    return c < C ? w1[j * C + c] : A(0);
  }
  if (idx < pk.b1() + hidden) return b1[idx - pk.b1()];
  if (idx < pk.w2t()) return A(0);
  if (idx < pk.b2()) {
    const int64_t r = idx - pk.w2t();
    const int64_t j = r / KO, k = r % KO;
    return k < outputs ? w2[k * hidden + j] : A(0);
  }
  const int64_t k = idx - pk.b2();
  return k < outputs ? b2[k] : A(0);
}

// Four consecutive weights. The CUDA kernels keep the packed array in shared memory
// with 16-byte aligned rows: one 16-byte load (broadcast to the warp) per four FMAs.
template <typename A>
HEAD4D_HD void load4(const A* p, A& a, A& b, A& c, A& d) {
  a = p[0];
  b = p[1];
  c = p[2];
  d = p[3];
}

HEAD4D_HD void load4(const float* p, float& a, float& b, float& c, float& d) {
#ifdef __CUDA_ARCH__
  const float4 v = *reinterpret_cast<const float4*>(p);
  a = v.x;
  b = v.y;
  c = v.z;
  d = v.w;
#else
  a = p[0];
  b = p[1];
  c = p[2];
  d = p[3];
#endif
}

HEAD4D_HD void load4(const double* p, double& a, double& b, double& c, double& d) {
#ifdef __CUDA_ARCH__
  const double2 v0 = *reinterpret_cast<const double2*>(p);
  const double2 v1 = *reinterpret_cast<const double2*>(p + 2);
  a = v0.x;
  b = v0.y;
  c = v1.x;
  d = v1.y;
#else
  a = p[0];
  b = p[1];
  c = p[2];
  d = p[3];
#endif
}

#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
// The CPU's 4-lane float32 vectors (GCC / Clang vector extensions: SSE on any x86-64,
// NEON on arm64), so that the compiler need not discover the vectorization itself.
// float64 keeps the plain code. Not in CUDA files (nvcc's passes take the plain code).
#define HEAD4D_DECODING_CPU_VECTORS 1
namespace cpu_vec {
typedef float f4 __attribute__((vector_size(16)));
typedef int i4 __attribute__((vector_size(16)));

inline f4 load(const float* p) {
  f4 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, f4 v) { __builtin_memcpy(p, &v, sizeof(v)); }
}  // namespace cpu_vec
#endif

// row . x over K entries, four interleaved partial sums (the same order on both sides:
// lane q of the CPU's vector sum is partial sum q of the GPU's).
template <int K, typename A>
HEAD4D_HD A dot_row(const A* row, const A (&x)[K]) {
#ifdef HEAD4D_DECODING_CPU_VECTORS
  if constexpr (std::is_same<A, float>::value) {
    cpu_vec::f4 s = cpu_vec::load(row) * cpu_vec::load(x);
    for (int c = 4; c < K; c += 4) s += cpu_vec::load(row + c) * cpu_vec::load(x + c);
    return (s[0] + s[1]) + (s[2] + s[3]);
  }
#endif
  A s0 = A(0), s1 = A(0), s2 = A(0), s3 = A(0);
HEAD4D_DECODING_UNROLL
  for (int c = 0; c < K; c += 4) {
    A r0, r1, r2, r3;
    load4(row + c, r0, r1, r2, r3);
    s0 += r0 * x[c + 0];
    s1 += r1 * x[c + 1];
    s2 += r2 * x[c + 2];
    s3 += r3 * x[c + 3];
  }
  return (s0 + s1) + (s2 + s3);
}

// y += a * row over K entries.
template <int K, typename A>
HEAD4D_HD void axpy_row(A (&y)[K], const A* row, A a) {
#ifdef HEAD4D_DECODING_CPU_VECTORS
  if constexpr (std::is_same<A, float>::value) {
    for (int c = 0; c < K; c += 4) cpu_vec::store(y + c, cpu_vec::load(y + c) + cpu_vec::load(row + c) * a);
    return;
  }
#endif
HEAD4D_DECODING_UNROLL
  for (int c = 0; c < K; c += 4) {
    A r0, r1, r2, r3;
    load4(row + c, r0, r1, r2, r3);
    y[c + 0] += r0 * a;
    y[c + 1] += r1 * a;
    y[c + 2] += r2 * a;
    y[c + 3] += r3 * a;
  }
}

// ----------------------------------------------------------------------------------
// Softplus of a group of hidden units
// ----------------------------------------------------------------------------------

// Hidden units are taken kGroup at a time: their pre-activations first, then their
// softplus, then their contributions: the same arithmetic in the same order as one unit
// at a time, but the CPU evaluates the group's softplus with vector instructions
// (below) instead of a libm call per unit, each of which would also force the
// per-point arrays out of the vector registers.
constexpr int kGroup = 8;

template <typename A>
HEAD4D_HD void softplus_group(A (&z)[kGroup]) {
HEAD4D_DECODING_UNROLL
  for (int u = 0; u < kGroup; ++u) z[u] = softplus(z[u]);
}

// z -> softplus(z) in place, and the slope softplus'(z) = sigmoid(z).
template <typename A>
HEAD4D_HD void softplus_and_slope_group(A (&z)[kGroup], A (&slope)[kGroup]) {
HEAD4D_DECODING_UNROLL
  for (int u = 0; u < kGroup; ++u) softplus_and_slope(z[u], z[u], slope[u]);
}

#ifdef HEAD4D_DECODING_CPU_VECTORS
// float32 on the CPU: softplus(z) = max(z, 0) + log1p(exp(-|z|)) (z itself above 20, as
// torch), four lanes at a time, within a few ulp of log1pf(expf(z)):
//   exp(x), x <= 0: x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two for an exact
//     n ln2), exp(r) by its Taylor polynomial to degree 7 (truncation < 6e-9), times 2^n;
//     x is clamped at -87 (exp(-87) = 1.6e-38: below that softplus is 0 to float32);
//   log1p(t), 0 <= t <= 1: 2 atanh(s) with s = t / (2 + t) <= 1/3, the odd series of
//     atanh to s^15 (truncation < 2e-9 relative, and no cancellation as t -> 0).
namespace cpu_vec {
inline f4 exp_nonpositive(f4 x) {
  x = x < -87.0f ? f4{-87.0f, -87.0f, -87.0f, -87.0f} : x;
  const i4 n = -__builtin_convertvector(0.5f - x * 1.44269504088896341f, i4);  // round(x / ln 2)
  const f4 fn = __builtin_convertvector(n, f4);
  const f4 r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  f4 p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i4 bits = (n + 127) << 23;
  f4 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline f4 log1p_unit(f4 t) {
  const f4 s = t / (2.0f + t);
  const f4 s2 = s * s;
  f4 p = s2 * (1.0f / 15.0f) + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

inline void softplus4(f4 z, f4& value, f4& slope) {
  const f4 az = z < 0.0f ? -z : z;
  const f4 t = exp_nonpositive(-az);
  const f4 positive = z > 0.0f ? z : f4{0.0f, 0.0f, 0.0f, 0.0f};
  const f4 big = f4{20.0f, 20.0f, 20.0f, 20.0f};
  value = z > big ? z : positive + log1p_unit(t);
  const f4 inv = 1.0f / (1.0f + t);  // sigmoid(|z|)
  slope = z > big ? f4{1.0f, 1.0f, 1.0f, 1.0f} : (z >= 0.0f ? inv : t * inv);
}
}  // namespace cpu_vec

inline void softplus_group(float (&z)[kGroup]) {
  static_assert(kGroup % 4 == 0, "groups of whole vectors");
  for (int u = 0; u < kGroup; u += 4) {
    cpu_vec::f4 v, value, slope;
    __builtin_memcpy(&v, z + u, sizeof(v));
    cpu_vec::softplus4(v, value, slope);
    __builtin_memcpy(z + u, &value, sizeof(value));
  }
}

inline void softplus_and_slope_group(float (&z)[kGroup], float (&slope)[kGroup]) {
  for (int u = 0; u < kGroup; u += 4) {
    cpu_vec::f4 v, value, dv;
    __builtin_memcpy(&v, z + u, sizeof(v));
    cpu_vec::softplus4(v, value, dv);
    __builtin_memcpy(z + u, &value, sizeof(value));
    __builtin_memcpy(slope + u, &dv, sizeof(dv));
  }
}
#endif

// ----------------------------------------------------------------------------------
// The MLP of one point
// ----------------------------------------------------------------------------------


// o = W2 softplus(W1 f + b1) + b2, streaming over the hidden units (only f, o and a
// group of pre-activations live).
template <int KC, int KO, typename A>
HEAD4D_HD void mlp_forward(const A* packed, int hidden, const A (&f)[KC], A (&o)[KO]) {
  const Packing<KC, KO> pk{hidden};
  const A* w1p = packed + pk.w1();
  const A* b1 = packed + pk.b1();
  const A* w2t = packed + pk.w2t();
  const A* b2p = packed + pk.b2();
HEAD4D_DECODING_UNROLL
  for (int k = 0; k < KO; ++k) o[k] = A(0);
  for (int j0 = 0; j0 < hidden; j0 += kGroup) {
    A h[kGroup];
HEAD4D_DECODING_UNROLL
    for (int u = 0; u < kGroup; ++u) {
      const int j = j0 + u < hidden ? j0 + u : hidden - 1;  // past the end: a repeat, unused
      h[u] = b1[j] + dot_row<KC>(w1p + static_cast<int64_t>(j) * KC, f);
    }
    softplus_group(h);
HEAD4D_DECODING_UNROLL
    for (int u = 0; u < kGroup; ++u) {
      if (j0 + u < hidden) axpy_row<KO>(o, w2t + static_cast<int64_t>(j0 + u) * KO, h[u]);
    }
  }
HEAD4D_DECODING_UNROLL
  for (int k = 0; k < KO; ++k) o[k] += b2p[k];
}

// The output activations, in place: o[0] stays the raw density, o[k >= 1] becomes
// rgb[k - 1] = sigmoid(o[k]) * (1 + 2 * 0.001) - 0.001.
template <int KO, typename A>
HEAD4D_HD void outputs_to_rgb(A (&o)[KO]) {
HEAD4D_DECODING_UNROLL
  for (int k = 1; k < KO; ++k) o[k] = rgb_of_logit(o[k]);
}

// The output activations' backward, in place: on entry g[0] = dL/dsigma and
// g[k] = dL/drgb[k - 1] (zero past the outputs), on exit g = dL/do; o = the logits.
template <int KO, typename A>
HEAD4D_HD void output_grads(const A (&o)[KO], A (&g)[KO]) {
HEAD4D_DECODING_UNROLL
  for (int k = 1; k < KO; ++k) g[k] = rgb_logit_grad(g[k], o[k]);
}

#ifdef HEAD4D_DECODING_CPU_VECTORS
// float32 on the CPU, four outputs at a time: sigmoid(x) = 1 / (1 + t) for x >= 0 and
// t / (1 + t) below, t = exp(-|x|) (cpu_vec::exp_nonpositive).
namespace cpu_vec {
inline f4 sigmoid4(f4 x) {
  const f4 t = exp_nonpositive(x < 0.0f ? x : -x);
  const f4 inv = 1.0f / (1.0f + t);
  return x >= 0.0f ? inv : t * inv;
}
}  // namespace cpu_vec

template <int KO>
inline void outputs_to_rgb(float (&o)[KO]) {
  static_assert(KO % 4 == 0, "whole vectors");
  const float sigma = o[0];
  for (int k = 0; k < KO; k += 4)
    cpu_vec::store(o + k, cpu_vec::sigmoid4(cpu_vec::load(o + k)) * rgb_scale<float>() - 0.001f);
  o[0] = sigma;
}

// sigmoid'(x) = s (1 - s) = t / (1 + t)^2 (no cancellation in 1 - s for large x).
template <int KO>
inline void output_grads(const float (&o)[KO], float (&g)[KO]) {
  const float grad_sigma = g[0];
  for (int k = 0; k < KO; k += 4) {
    const cpu_vec::f4 x = cpu_vec::load(o + k);
    const cpu_vec::f4 t = cpu_vec::exp_nonpositive(x < 0.0f ? x : -x);
    const cpu_vec::f4 inv = 1.0f / (1.0f + t);
    cpu_vec::store(g + k, (cpu_vec::load(g + k) * rgb_scale<float>()) * (t * inv * inv));
  }
  g[0] = grad_sigma;
}
#endif

// The MLP's backward from g = dL/do, recomputing z and h per hidden unit:
//   dL/dh_j = sum_k W2[k, j] g_k,  dL/dz_j = dL/dh_j * softplus'(z_j),
//   dL/df = W1^T dL/dz (into gf when want_gf).
// h_j and dL/dz_j are stored at h_out[j * stride] and gz_out[j * stride] when those are
// not null (what the weight gradients are made of: grad W1 = sum gz f^T, grad b1 = sum gz,
// grad W2 = sum g h^T, grad b2 = sum g).
template <int KC, int KO, typename A>
HEAD4D_HD void mlp_backward(const A* packed, int hidden, const A (&f)[KC], const A (&g)[KO], bool want_gf,
                            A (&gf)[KC], A* h_out, A* gz_out, int64_t stride) {
  const Packing<KC, KO> pk{hidden};
  const A* w1p = packed + pk.w1();
  const A* b1 = packed + pk.b1();
  const A* w2t = packed + pk.w2t();
HEAD4D_DECODING_UNROLL
  for (int c = 0; c < KC; ++c) gf[c] = A(0);
  for (int j0 = 0; j0 < hidden; j0 += kGroup) {  // grouped as in mlp_forward
    A h[kGroup], slope[kGroup];
HEAD4D_DECODING_UNROLL
    for (int u = 0; u < kGroup; ++u) {
      const int j = j0 + u < hidden ? j0 + u : hidden - 1;
      h[u] = b1[j] + dot_row<KC>(w1p + static_cast<int64_t>(j) * KC, f);
    }
    softplus_and_slope_group(h, slope);
HEAD4D_DECODING_UNROLL
    for (int u = 0; u < kGroup; ++u) {
      const int j = j0 + u;
      if (j < hidden) {
        const A gz = dot_row<KO>(w2t + static_cast<int64_t>(j) * KO, g) * slope[u];
        if (h_out != nullptr) h_out[j * stride] = h[u];
        if (gz_out != nullptr) gz_out[j * stride] = gz;
        if (want_gf) axpy_row<KC>(gf, w1p + static_cast<int64_t>(j) * KC, gz);
      }
    }
  }
}

}  // namespace decoding
}  // namespace head4d
