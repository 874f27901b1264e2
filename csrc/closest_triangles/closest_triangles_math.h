// Per-(point, triangle) math of the closest-triangle search, shared by the CPU and the
// CUDA kernels.
//
// Semantics (head4d/reference/deformation.py, _triangle_data / _sq_dist / closest_triangles):
//   * the squared point-triangle distance is the minimum of the three corners
//     |p - v|^2, the three open edges (projection parameter strictly inside, edge of
//     length > 0) and, when the projection falls inside the triangle (three inward
//     edge-normal tests >= 0) and the triangle is not a sliver (|n|^2 > eps |ab|^2 |ac|^2),
//     the plane distance ((p - a) . n)^2 / |n|^2;
//   * each edge is parameterized from its lower-indexed vertex, so two faces sharing an
//     edge (or a vertex) compute bitwise-identical distances to it, and a tie goes to the
//     lower face index;
//   * every product, sum and quotient is rounded on its own, in the reference's order
//     (its elementwise tensor ops): no fused multiply-add, except in the cross products,
//     which are formed as torch's CPU kernel forms them (fma(x1, y2, -(x2 y1)), ...). So
//     on the CPU the distances are bit for bit the reference's, and the same face wins
//     even in near-ties; argmin's rule decides: the smallest distance, NaN smallest of
//     all, ties (and NaNs) to the lowest face index.
// The search skips faces and whole tiles by lower bounds (bounding spheres, boxes) with
// a relative slack kSlack far above the rounding of the distance, so a skipped face's
// computed distance is provably larger than the best one: the result is exact.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common.h"
#include "../scalar_math.h"

namespace head4d {
namespace closest_triangles {

// ---------------------------------------------------------------------------------
// correctly rounded arithmetic that nvcc may not fuse: mul_rn, add_rn, sub_rn, div_rn
// (scalar_math.h), and the cross product's rounding
// ---------------------------------------------------------------------------------

// x * y - z * w as torch's CPU cross-product kernel rounds it: fma(x, y, -(z * w)).
HEAD4D_HD float fms(float x, float y, float z, float w) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(x, y, -__fmul_rn(z, w));
#else
  return std::fma(x, y, -(z * w));
#endif
}
HEAD4D_HD double fms(double x, double y, double z, double w) {
#ifdef __CUDA_ARCH__
  return __fma_rn(x, y, -__dmul_rn(z, w));
#else
  return std::fma(x, y, -(z * w));
#endif
}
HEAD4D_HD float root(float x) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
HEAD4D_HD double root(double x) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

template <typename A>
HEAD4D_HD bool is_nan(A x) {
  return x != x;
}

// torch.minimum: NaN if either is NaN.
template <typename A>
HEAD4D_HD A min_nan(A x, A y) {
  if (is_nan(x)) return x;
  return (is_nan(y) || y < x) ? y : x;
}

template <typename A>
HEAD4D_HD A sq3(const A u[3]) {
  return add_rn(add_rn(mul_rn(u[0], u[0]), mul_rn(u[1], u[1])), mul_rn(u[2], u[2]));
}

template <typename A>
HEAD4D_HD A dot3(const A u[3], const A v[3]) {
  return add_rn(add_rn(mul_rn(u[0], v[0]), mul_rn(u[1], v[1])), mul_rn(u[2], v[2]));
}

template <typename A>
HEAD4D_HD void sub3(const A u[3], const A v[3], A out[3]) {
  out[0] = sub_rn(u[0], v[0]);
  out[1] = sub_rn(u[1], v[1]);
  out[2] = sub_rn(u[2], v[2]);
}

// torch.cross(u, v) as its CPU kernel rounds it.
template <typename A>
HEAD4D_HD void cross3(const A u[3], const A v[3], A out[3]) {
  out[0] = fms(u[1], v[2], u[2], v[1]);
  out[1] = fms(u[2], v[0], u[0], v[2]);
  out[2] = fms(u[0], v[1], u[1], v[0]);
}

template <typename A>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float eps = 1.1920928955078125e-07f;  // torch.finfo(float32).eps
};
template <>
struct Limits<double> {
  static constexpr double eps = 2.220446049250313e-16;  // torch.finfo(float64).eps
};

// Relative slack of every lower bound: far above the rounding of a computed distance
// (relative to the distances and triangle sizes involved: at most ~1e-3 in float32,
// for triangles at the sliver threshold sin^2 = eps, whose normal is known to
// eps / sin), so a skipped face's computed distance is larger than the best one.
constexpr double kSlack = 1.0 / 64.0;
constexpr double kSphereScale = (1.0 + kSlack) / (1.0 - kSlack);

// Reference's clamp of the barycentric determinant, and F.normalize's epsilon.
constexpr double kDetMin = 1e-12;
constexpr double kNormalizeEps = 1e-12;

// ---------------------------------------------------------------------------------
// per-triangle records
// ---------------------------------------------------------------------------------

enum Flags : int32_t {
  kEdgeOk = 1,      // << k: edge k has length > 0
  kInterior = 8,    // the plane distance counts (not a sliver)
  kEdgeSwap = 16,   // << k: edge k starts at its second corner (the lower vertex index)
};

// The quantities of _triangle_data, for one face. Edge k joins corners k and k + 1
// (mod 3) of (a, b, c).
template <typename A>
struct alignas(16) TriRecord {
  A a[3], b[3], c[3];
  A n[3];     // cross(b - a, c - a)
  A nn;       // |n|^2, or 1 when the interior does not count
  A m[3][3];  // inward edge normals: n x (b - a), n x (c - b), n x (a - c)
  A e[3][3];  // edge vectors from the lower-indexed corner
  A ee[3];    // |e|^2, or 1 for a zero-length edge
  int32_t face;
  int32_t flags;
};

// A bounding sphere: centre and radius times kSphereScale.
template <typename A>
struct alignas(16) Sphere {
  A x, y, z, rs;
};

// A tile's bounding box (-inf / +inf when a corner is not finite) and kSlack times its
// diagonal.
template <typename A>
struct alignas(16) TileBox {
  A lo[3], hi[3];
  A slack;
  A pad;
};

HEAD4D_HD bool is_vertex(int64_t j, int64_t V) {
  return j >= 0 && j < V;
}

template <typename A>
HEAD4D_HD bool finite3(const A u[3]) {
  // false for NaN and +-inf
  return u[0] - u[0] == A(0) && u[1] - u[1] == A(0) && u[2] - u[2] == A(0);
}

// The record and the bounding sphere of the face (ia, ib, ic) with corners a, b, c.
template <typename A>
HEAD4D_HD void make_record(const A a[3], const A b[3], const A c[3], int32_t ia, int32_t ib, int32_t ic,
                           int32_t face, TriRecord<A>& t, Sphere<A>& s) {
  for (int i = 0; i < 3; ++i) {
    t.a[i] = a[i];
    t.b[i] = b[i];
    t.c[i] = c[i];
  }
  A ab[3], ac[3], bc[3], ca[3];
  sub3(b, a, ab);
  sub3(c, a, ac);
  sub3(c, b, bc);
  sub3(a, c, ca);
  cross3(ab, ac, t.n);
  const A nn = sq3(t.n);
  const A scale = mul_rn(sq3(ab), sq3(ac));
  const bool interior = nn > mul_rn(Limits<A>::eps, scale);
  t.nn = interior ? nn : A(1);
  cross3(t.n, ab, t.m[0]);
  cross3(t.n, bc, t.m[1]);
  cross3(t.n, ca, t.m[2]);
  int32_t flags = interior ? kInterior : 0;
  const A* corner[3] = {a, b, c};
  const int32_t index[3] = {ia, ib, ic};
  for (int k = 0; k < 3; ++k) {
    const int k1 = k == 2 ? 0 : k + 1;
    const bool swap = index[k] > index[k1];
    const A* origin = swap ? corner[k1] : corner[k];
    const A* end = swap ? corner[k] : corner[k1];
    sub3(end, origin, t.e[k]);
    const A ee = sq3(t.e[k]);
    t.ee[k] = ee > A(0) ? ee : A(1);
    if (ee > A(0)) flags |= kEdgeOk << k;
    if (swap) flags |= kEdgeSwap << k;
  }
  t.face = face;
  t.flags = flags;

  // the sphere around the centroid (any centre works: the radius is measured from it)
  const A third = A(1) / A(3);
  const A ctr[3] = {(a[0] + b[0] + c[0]) * third, (a[1] + b[1] + c[1]) * third, (a[2] + b[2] + c[2]) * third};
  A r2 = A(0);
  for (int k = 0; k < 3; ++k) {
    A d[3];
    sub3(corner[k], ctr, d);
    const A q = sq3(d);
    if (is_nan(q) || q > r2) r2 = q;
  }
  s.x = ctr[0];
  s.y = ctr[1];
  s.z = ctr[2];
  s.rs = root(r2) * A(kSphereScale);
}

// One edge term of pair_sq_dist: edge k from `first` = p - corner k, or from `second` =
// p - corner k + 1 when the edge starts there (the same subtraction as p - origin, so the
// same bits). Component selects rather than a runtime array index keep q in registers.
template <typename A>
HEAD4D_HD A edge_term(A best, const TriRecord<A>& t, int k, const A first[3], const A second[3]) {
  if (!(t.flags & (kEdgeOk << k))) return best;
  const bool swap = (t.flags & (kEdgeSwap << k)) != 0;
  const A q[3] = {swap ? second[0] : first[0], swap ? second[1] : first[1], swap ? second[2] : first[2]};
  const A s = div_rn(dot3(q, t.e[k]), t.ee[k]);
  if (!(s > A(0) && s < A(1))) return best;
  const A r[3] = {sub_rn(q[0], mul_rn(s, t.e[k][0])), sub_rn(q[1], mul_rn(s, t.e[k][1])), sub_rn(q[2], mul_rn(s, t.e[k][2]))};
  return min_nan(best, sq3(r));
}

// The exact squared distance from p to the face of record t, as _sq_dist computes it.
template <typename A>
HEAD4D_HD A pair_sq_dist(const A p[3], const TriRecord<A>& t) {
  A qa[3], qb[3], qc[3];  // p - a, p - b, p - c
  sub3(p, t.a, qa);
  sub3(p, t.b, qb);
  sub3(p, t.c, qc);
  A best = min_nan(min_nan(sq3(qa), sq3(qb)), sq3(qc));
  best = edge_term(best, t, 0, qa, qb);
  best = edge_term(best, t, 1, qb, qc);
  best = edge_term(best, t, 2, qc, qa);
  if ((t.flags & kInterior) && dot3(qa, t.m[0]) >= A(0) && dot3(qb, t.m[1]) >= A(0) && dot3(qc, t.m[2]) >= A(0)) {
    const A h = dot3(qa, t.n);
    best = min_nan(best, div_rn(mul_rn(h, h), t.nn));
  }
  return best;
}

// Whether (d, f) beats the best so far under argmin's rule: NaN is smallest, ties go to
// the lowest face index.
template <typename A>
HEAD4D_HD bool better(A d, int32_t f, A best, int32_t best_f) {
  if (is_nan(best)) return is_nan(d) && f < best_f;
  if (is_nan(d)) return true;
  return d < best || (d == best && f < best_f);
}

// ---------------------------------------------------------------------------------
// lower bounds
// ---------------------------------------------------------------------------------

// How far a point whose best squared distance is `best` still looks: a lower bound
// above this excludes everything behind it. NaN (a NaN best) and +inf exclude nothing.
template <typename A>
HEAD4D_HD A reach_of(A best) {
  return root(best) * A(1.0 + kSlack);
}

// The sphere test's threshold term of a point: sqrt(best) * kSphereScale.
template <typename A>
HEAD4D_HD A sphere_reach(A best) {
  return root(best) * A(kSphereScale);
}

// Whether the sphere rules the face out for p: |p - centre| > (sqrt(best) + r) (1 + s) / (1 - s),
// where the face's computed distance is at least (1 - s) |p - centre| - (1 + s) r.
template <typename A>
HEAD4D_HD bool sphere_excludes(const A p[3], const Sphere<A>& s, A reach_s) {
  const A dx = p[0] - s.x, dy = p[1] - s.y, dz = p[2] - s.z;
  const A d2 = dx * dx + dy * dy + dz * dz;
  const A thr = reach_s + s.rs;
  return d2 > thr * thr;
}

// A lower bound of the computed distance (not squared) from any point of the box
// [lo, hi] to any face of the tile: dist(box, tile box) (1 - s) - s * diagonal. NaN
// comparisons make a NaN bound exclude nothing.
template <typename A>
HEAD4D_HD A box_lower_bound(const A lo[3], const A hi[3], const TileBox<A>& t) {
  A s2 = A(0);
  for (int i = 0; i < 3; ++i) {
    const A g0 = t.lo[i] - hi[i], g1 = lo[i] - t.hi[i];
    const A g = g0 > g1 ? g0 : g1;
    if (g > A(0)) s2 += g * g;
  }
  return root(s2) * A(1.0 - kSlack) - t.slack;
}

// ---------------------------------------------------------------------------------
// the values of the chosen face
// ---------------------------------------------------------------------------------

// Unit normal of cross(b - a, c - a) as F.normalize: n / max(|n|, 1e-12).
template <typename A>
HEAD4D_HD void unit_normal(const A a[3], const A b[3], const A c[3], A out[3]) {
  A ab[3], ac[3], n[3];
  sub3(b, a, ab);
  sub3(c, a, ac);
  cross3(ab, ac, n);
  A norm = root(sq3(n));
  if (norm < A(kNormalizeEps)) norm = A(kNormalizeEps);  // clamp_min (NaN stays NaN)
  out[0] = div_rn(n[0], norm);
  out[1] = div_rn(n[1], norm);
  out[2] = div_rn(n[2], norm);
}

// _barycentric: of p's orthogonal projection onto the plane of (a, b, c), determinant
// clamped to >= 1e-12.
template <typename A>
HEAD4D_HD void barycentric(const A p[3], const A a[3], const A b[3], const A c[3], A out[3]) {
  A v0[3], v1[3], v2[3];
  sub3(b, a, v0);
  sub3(c, a, v1);
  sub3(p, a, v2);
  const A d00 = sq3(v0), d01 = dot3(v0, v1), d11 = sq3(v1), d20 = dot3(v2, v0), d21 = dot3(v2, v1);
  A det = sub_rn(mul_rn(d00, d11), mul_rn(d01, d01));
  if (det < A(kDetMin)) det = A(kDetMin);  // clamp(min=...) (NaN stays NaN)
  const A v = div_rn(sub_rn(mul_rn(d11, d20), mul_rn(d01, d21)), det);
  const A w = div_rn(sub_rn(mul_rn(d00, d21), mul_rn(d01, d20)), det);
  out[0] = sub_rn(sub_rn(A(1), v), w);
  out[1] = v;
  out[2] = w;
}

// sum_i w_i v_i, per component ((w0 a + w1 b) + w2 c).
template <typename A>
HEAD4D_HD void combine(const A w[3], const A a[3], const A b[3], const A c[3], A out[3]) {
  for (int i = 0; i < 3; ++i) out[i] = add_rn(add_rn(mul_rn(w[0], a[i]), mul_rn(w[1], b[i])), mul_rn(w[2], c[i]));
}

// closest_triangles' barycentrics and signed distance <p - sum_i b_i v_i, n> of p for
// the face (a, b, c).
template <typename A>
HEAD4D_HD void face_values(const A p[3], const A a[3], const A b[3], const A c[3], A bary[3], A& signed_distance) {
  barycentric(p, a, b, c, bary);
  A proj[3], d[3], n[3];
  combine(bary, a, b, c, proj);
  sub3(p, proj, d);
  unit_normal(a, b, c, n);
  signed_distance = dot3(d, n);
}

// The surface field's value at p: sum_i b_i V_i + s N - p on the canonical face
// (A, B, C) with unit normal N, from the observed face's barycentrics b and signed
// distance s.
template <typename A>
HEAD4D_HD void field_value(const A p[3], const A bary[3], A signed_distance, const A ca[3], const A cb[3],
                           const A cc[3], A out[3]) {
  A x[3], n[3];
  combine(bary, ca, cb, cc, x);
  unit_normal(ca, cb, cc, n);
  for (int i = 0; i < 3; ++i) out[i] = sub_rn(add_rn(x[i], mul_rn(signed_distance, n[i])), p[i]);
}

// ---------------------------------------------------------------------------------
// the search order: Morton codes of the face centroids
// ---------------------------------------------------------------------------------

HEAD4D_HD uint32_t spread_bits(uint32_t x) {
  x &= 0x3ffu;
  x = (x | (x << 16)) & 0x030000ffu;
  x = (x | (x << 8)) & 0x0300f00fu;
  x = (x | (x << 4)) & 0x030c30c3u;
  x = (x | (x << 2)) & 0x09249249u;
  return x;
}

// 10 bits of (x - lo) * inv per axis (0 for NaN), interleaved.
HEAD4D_HD uint32_t morton_code(const float x[3], const float lo[3], const float inv[3]) {
  uint32_t code = 0;
  for (int i = 0; i < 3; ++i) {
    const float t = (x[i] - lo[i]) * inv[i] * 1024.0f;
    uint32_t q = 0;
    if (t >= 1023.0f) q = 1023u;
    else if (t > 0.0f) q = static_cast<uint32_t>(t);
    code |= spread_bits(q) << i;
  }
  return code;
}

// The centroid of face f (corners read with an index guard) in float; false if a
// corner is missing or not finite.
template <typename A>
HEAD4D_HD bool centroid(const A* verts, const int32_t* faces, int64_t f, int64_t V, float out[3]) {
  float s[3] = {0.0f, 0.0f, 0.0f};
  for (int k = 0; k < 3; ++k) {
    const int64_t j = faces[f * 3 + k];
    if (!is_vertex(j, V)) return false;
    for (int i = 0; i < 3; ++i) s[i] += static_cast<float>(verts[j * 3 + i]);
  }
  for (int i = 0; i < 3; ++i) out[i] = s[i] * (1.0f / 3.0f);
  return finite3(out);
}

}  // namespace closest_triangles
}  // namespace head4d
