// Per-face and per-pixel math of the triangle rasterizer, shared by the CPU and CUDA
// kernels (and mirrored operation for operation by head4d/reference/rasterize.py), so
// that every backend picks the same face at every pixel and gives the same barycentrics.
//
// Conventions (the module docstring of head4d/ops/rasterize.py states them for users):
//   - vertices come in clip space (x, y, z, w); NDC = (x, y, z) / w;
//   - a face with a vertex at w <= 0 (or a non-finite w), or with a vertex index outside
//     [0, V), is dropped whole: no near-plane clipping, no other depth clipping;
//   - screen coordinates are in pixels with y down: sx = (x / w + 1) * (W / 2),
//     sy = (1 - y / w) * (H / 2), so pixel (row i, column j) has its centre at
//     (j + 0.5, i + 0.5), exact in floating point;
//   - edge function of vertex k: e_k = cross(v_b - v_a, p - v_a) over the edge (a, b)
//     opposite k, evaluated from the edge's first endpoint in (x, y) order so that
//     faces sharing the edge agree on it exactly (watertight); the pixel-space signed
//     area A is negative for a face that is counter-clockwise in NDC (y up), the front
//     face (as OpenGL);
//   - inclusive edge rule: a pixel centre is covered when it lies in the face's pixel
//     bounding box and every e_k has the sign of A or is zero; a zero-area face covers
//     nothing; a pixel where the e_k sum to zero, or whose depth is not finite, is not covered;
//   - depth = the NDC z interpolated with the screen-space weights e_k / sum(e);
//   - perspective-correct barycentrics: p_k = e_k * (1 / w_k), b_k = p_k / sum(p);
//   - depth test on the key (depth rounded to float32, face index): the smaller wins,
//     so equal depths go to the lower face index, whatever the order of evaluation.
//
// Every floating operation goes through add / sub / mul / div below: on the GPU they
// are the round-to-nearest intrinsics, which nvcc never contracts into FMAs, so the
// device computes the same bits as the host.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"

namespace head4d {
namespace rasterize {

// The key of an empty pixel: larger than every covered pixel's key.
constexpr uint64_t kEmptyKey = ~0ull;

#if defined(__CUDA_ARCH__)
HEAD4D_HD float add(float a, float b) { return __fadd_rn(a, b); }
HEAD4D_HD float sub(float a, float b) { return __fsub_rn(a, b); }
HEAD4D_HD float mul(float a, float b) { return __fmul_rn(a, b); }
HEAD4D_HD float div(float a, float b) { return __fdiv_rn(a, b); }
HEAD4D_HD double add(double a, double b) { return __dadd_rn(a, b); }
HEAD4D_HD double sub(double a, double b) { return __dsub_rn(a, b); }
HEAD4D_HD double mul(double a, double b) { return __dmul_rn(a, b); }
HEAD4D_HD double div(double a, double b) { return __ddiv_rn(a, b); }
#else
template <typename T>
HEAD4D_HD T add(T a, T b) { return a + b; }
template <typename T>
HEAD4D_HD T sub(T a, T b) { return a - b; }
template <typename T>
HEAD4D_HD T mul(T a, T b) { return a * b; }
template <typename T>
HEAD4D_HD T div(T a, T b) { return a / b; }
#endif

// One face of one mesh, ready for the pixel tests.
template <typename A>
struct FaceSetup {
  A sx[3], sy[3];   // screen position of each vertex (pixels, y down)
  A z[3];           // NDC z of each vertex
  A inv_w[3];       // 1 / w of each vertex
  int x0, x1;       // first and last column whose centre lies in the bounding box
  int y0, y1;       // first and last row likewise; x0 > x1 or y0 > y1: the face covers nothing
  bool front;       // counter-clockwise in NDC (negative pixel-space area)
};

// First pixel index whose centre (index + 0.5) is >= lo, clamped to [-1, size]: the
// clamp keeps huge and infinite coordinates representable; NaN gives an empty range.
template <typename A>
HEAD4D_HD int first_centre_at_or_after(A lo, int size) {
  A c = ceil(sub(lo, A(0.5)));
  if (!(c >= A(0))) c = (c < A(0)) ? A(-1) : A(size);  // negative -> -1, NaN -> size (empty)
  if (c > A(size)) c = A(size);
  return static_cast<int>(c);
}

// Last pixel index whose centre is <= hi, clamped to [-1, size].
template <typename A>
HEAD4D_HD int last_centre_at_or_before(A hi, int size) {
  A c = floor(sub(hi, A(0.5)));
  if (!(c < A(size))) c = (c >= A(size)) ? A(size) : A(-1);  // beyond -> size, NaN -> -1 (empty)
  if (c < A(-1)) c = A(-1);
  return static_cast<int>(c);
}

HEAD4D_HD int clamp_index(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// The setup of face (a, b, c) given its clip-space vertices (x, y, z, w each). Returns
// false when the face is dropped (a vertex at w <= 0, zero or non-finite area, culled);
// `setup` is then undefined.
template <typename A>
HEAD4D_HD bool setup_face(const A* va, const A* vb, const A* vc, int height, int width, bool cull_backfaces,
                          FaceSetup<A>& setup) {
  const A* v[3] = {va, vb, vc};
  const A half_w = mul(A(0.5), A(width)), half_h = mul(A(0.5), A(height));
  for (int k = 0; k < 3; ++k) {
    const A w = v[k][3];
    if (!(w > A(0))) return false;
    setup.sx[k] = mul(add(div(v[k][0], w), A(1)), half_w);
    setup.sy[k] = mul(sub(A(1), div(v[k][1], w)), half_h);
    setup.z[k] = div(v[k][2], w);
    setup.inv_w[k] = div(A(1), w);
  }
  const A area = sub(mul(sub(setup.sx[1], setup.sx[0]), sub(setup.sy[2], setup.sy[0])),
                     mul(sub(setup.sx[2], setup.sx[0]), sub(setup.sy[1], setup.sy[0])));
  if (!(area != A(0)) || !(area - area == A(0))) return false;  // zero, NaN or infinite
  setup.front = area < A(0);
  if (cull_backfaces && !setup.front) return false;
  const A min_x = fmin(fmin(setup.sx[0], setup.sx[1]), setup.sx[2]);
  const A max_x = fmax(fmax(setup.sx[0], setup.sx[1]), setup.sx[2]);
  const A min_y = fmin(fmin(setup.sy[0], setup.sy[1]), setup.sy[2]);
  const A max_y = fmax(fmax(setup.sy[0], setup.sy[1]), setup.sy[2]);
  setup.x0 = clamp_index(first_centre_at_or_after(min_x, width), 0, width);
  setup.x1 = clamp_index(last_centre_at_or_before(max_x, width), -1, width - 1);
  setup.y0 = clamp_index(first_centre_at_or_after(min_y, height), 0, height);
  setup.y1 = clamp_index(last_centre_at_or_before(max_y, height), -1, height - 1);
  return setup.x0 <= setup.x1 && setup.y0 <= setup.y1;
}

// The edge function cross(b - a, p - a) of point p and the edge from a to b, evaluated
// from the endpoint that comes first in (x, then y) order and negated when that is b:
// the two faces that share an edge compute the same magnitude with opposite signs, so a
// pixel centre near a shared edge belongs to one of them, never to neither (no cracks)
// nor, unless exactly on it, to both.
template <typename A>
HEAD4D_HD A edge_function(A ax, A ay, A bx, A by, A px, A py) {
  const bool swapped = bx < ax || (bx == ax && by < ay);
  if (swapped) {
    const A tx = ax, ty = ay;
    ax = bx;
    ay = by;
    bx = tx;
    by = ty;
  }
  const A e = sub(mul(sub(bx, ax), sub(py, ay)), mul(sub(by, ay), sub(px, ax)));
  return swapped ? -e : e;
}

// Edge functions of the centre of pixel (row, col): e[k] is the one of the edge from
// vertex k + 1 to vertex k + 2 (mod 3), opposite vertex k.
template <typename A>
HEAD4D_HD void edge_functions(const FaceSetup<A>& s, int row, int col, A e[3]) {
  const A px = add(A(col), A(0.5)), py = add(A(row), A(0.5));
  const int next[3] = {1, 2, 0}, prev[3] = {2, 0, 1};
  for (int k = 0; k < 3; ++k) {
    const int a = next[k], b = prev[k];
    e[k] = edge_function(s.sx[a], s.sy[a], s.sx[b], s.sy[b], px, py);
  }
}

// Whether the face covers the centre of pixel (row, col), and its NDC depth there.
template <typename A>
HEAD4D_HD bool covers(const FaceSetup<A>& s, int row, int col, A e[3], A& depth) {
  if (row < s.y0 || row > s.y1 || col < s.x0 || col > s.x1) return false;
  edge_functions(s, row, col, e);
  if (s.front) {
    if (e[0] > A(0) || e[1] > A(0) || e[2] > A(0)) return false;
  } else {
    if (e[0] < A(0) || e[1] < A(0) || e[2] < A(0)) return false;
  }
  const A sum = add(add(e[0], e[1]), e[2]);
  if (!(sum != A(0))) return false;
  depth = div(add(add(mul(e[0], s.z[0]), mul(e[1], s.z[1])), mul(e[2], s.z[2])), sum);
  return depth - depth == A(0);  // finite
}

// Perspective-correct barycentrics from the edge functions of a covered pixel.
template <typename A>
HEAD4D_HD void perspective_barycentrics(const FaceSetup<A>& s, const A e[3], A b[3]) {
  const A p0 = mul(e[0], s.inv_w[0]), p1 = mul(e[1], s.inv_w[1]), p2 = mul(e[2], s.inv_w[2]);
  const A sum = add(add(p0, p1), p2);
  b[0] = div(p0, sum);
  b[1] = div(p1, sum);
  b[2] = div(p2, sum);
}

// The depth-test key of a covered pixel: the depth rounded to float32 (-0 made +0) in
// the high word, in an order-preserving encoding, the face index in the low word.
template <typename A>
HEAD4D_HD uint64_t depth_key(A depth, int64_t face) {
  const float d = add(static_cast<float>(depth), 0.0f);  // -0 + 0 = +0
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(d);
#else
  std::memcpy(&bits, &d, sizeof(bits));
#endif
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint64_t>(static_cast<uint32_t>(face));
}

// The face index in a key (kEmptyKey: none).
HEAD4D_HD int64_t key_face(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffull); }

}  // namespace rasterize
}  // namespace head4d
