// Per-point math of the one-ring deformation, shared by the CPU and the CUDA kernels.
//
// Semantics (head4d/reference/deformation.py, one_ring_deform): for a point x,
//   1. the nearest candidate vertex by d = ((x0 - v0)^2 + (x1 - v1)^2) + (x2 - v2)^2,
//      each operation rounded on its own (no fused multiply-add), which is how the
//      reference's elementwise tensor ops compute it, so the same vertex wins even in
//      near-ties; a tie in d goes to the lowest vertex index, and a NaN d wins over any
//      number (torch.argmin), again the lowest index among NaNs;
//   2. over that vertex's row of the one-ring table (padding skipped):
//      u_i = 1 / (|x - vo_i|^2 + 1e-10), out = x + sum_i u_i (vc_i - vo_i) / sum_i u_i
//      (the reference normalizes w_i = u_i / sum u first: equal up to rounding).
// Backward, with g = dL/dout, w_i = u_i / U, U = sum u, a_i = g . (vc_i - vo_i),
// abar = sum_i w_i a_i, c_i = (a_i - abar) w_i u_i (= -dL/d|x - vo_i|^2):
//   dL/dx    = g - sum_i 2 c_i (x - vo_i)
//   dL/dvo_i = 2 c_i (x - vo_i) - w_i g
//   dL/dvc_i = w_i g
// (c_i is formed as (a_i - abar) w_i u_i rather than (a_i - abar) u_i^2 / U so that it
// cannot overflow when x sits on a vertex: u_i = 1e10 there.)
#pragma once

#include <cstdint>

#include "../common.h"
#include "../scalar_math.h"

namespace head4d {
namespace onering {

// Portrait4D's term added to the squared distances of the weights.
constexpr double kEps = 1e-10;

// The search distance, bit for bit as the reference computes it. (On the host, x86-64
// without -mfma has no fused multiply-add to contract into.)
template <typename A>
HEAD4D_HD A search_distance(A px, A py, A pz, A vx, A vy, A vz) {
  const A dx = px - vx, dy = py - vy, dz = pz - vz;
  return add_rn(add_rn(mul_rn(dx, dx), mul_rn(dy, dy)), mul_rn(dz, dz));
}

// Whether candidate (d, v) beats the best so far (best_d, best_v) under argmin's rule:
// NaN is smallest, ties go to the lowest vertex index.
template <typename A>
HEAD4D_HD bool nearer(A d, int32_t v, A best_d, int32_t best_v) {
  if (best_d != best_d) return d != d && v < best_v;
  if (d != d) return true;
  return d < best_d || (d == best_d && v < best_v);
}

// Whether a one-ring table entry names a vertex (-1 is padding; anything outside [0, V)
// is treated as padding too, so that bad input cannot read out of bounds).
HEAD4D_HD bool is_vertex(int32_t j, int64_t V) {
  return j >= 0 && static_cast<int64_t>(j) < V;
}

template <typename A>
HEAD4D_HD A inverse_weight(const A p[3], const A* o) {
  const A dx = p[0] - o[0], dy = p[1] - o[1], dz = p[2] - o[2];
  return A(1) / ((dx * dx + dy * dy + dz * dz) + A(kEps));
}

// The forward over one ring: out = p + sum_i u_i (vc_i - vo_i) / sum_i u_i.
// vo, vc: this batch element's [V, 3] vertices; row: the nearest vertex's K entries.
template <typename A>
HEAD4D_HD void ring_forward(const A p[3], const A* vo, const A* vc, const int32_t* row, int64_t K, int64_t V,
                            A out[3]) {
  A usum = A(0), acc[3] = {A(0), A(0), A(0)};
  for (int64_t k = 0; k < K; ++k) {
    const int32_t j = row[k];
    if (!is_vertex(j, V)) continue;
    const A* o = vo + static_cast<int64_t>(j) * 3;
    const A* c = vc + static_cast<int64_t>(j) * 3;
    const A u = inverse_weight(p, o);
    usum += u;
    acc[0] += u * (c[0] - o[0]);
    acc[1] += u * (c[1] - o[1]);
    acc[2] += u * (c[2] - o[2]);
  }
  out[0] = p[0] + acc[0] / usum;
  out[1] = p[1] + acc[1] / usum;
  out[2] = p[2] + acc[2] / usum;
}

// The backward's first pass over the ring: U = sum u_i and abar = sum_i w_i a_i.
template <typename A>
HEAD4D_HD void ring_stats(const A p[3], const A g[3], const A* vo, const A* vc, const int32_t* row, int64_t K,
                          int64_t V, A& usum, A& abar) {
  A us = A(0), ua = A(0);
  for (int64_t k = 0; k < K; ++k) {
    const int32_t j = row[k];
    if (!is_vertex(j, V)) continue;
    const A* o = vo + static_cast<int64_t>(j) * 3;
    const A* c = vc + static_cast<int64_t>(j) * 3;
    const A u = inverse_weight(p, o);
    const A a = g[0] * (c[0] - o[0]) + g[1] * (c[1] - o[1]) + g[2] * (c[2] - o[2]);
    us += u;
    ua += u * a;
  }
  usum = us;
  abar = ua / us;
}

// The gradients of one ring entry (vertices o, c) given the first pass's U and abar:
// adds its share to grad_p and returns dL/dvo and dL/dvc of this entry.
template <typename A>
HEAD4D_HD void ring_entry_grads(const A p[3], const A g[3], const A* o, const A* c, A usum, A abar, A grad_p[3],
                                A g_obs[3], A g_canon[3]) {
  const A u = inverse_weight(p, o);
  const A w = u / usum;
  const A a = g[0] * (c[0] - o[0]) + g[1] * (c[1] - o[1]) + g[2] * (c[2] - o[2]);
  const A coef = A(2) * ((a - abar) * w * u);
  for (int d = 0; d < 3; ++d) {
    const A t = coef * (p[d] - o[d]);
    grad_p[d] -= t;
    g_obs[d] = t - w * g[d];
    g_canon[d] = w * g[d];
  }
}

}  // namespace onering
}  // namespace head4d
