// Per-point math of triplane sampling, shared by the CPU and the CUDA kernels.
//
// Semantics (EG3D's sample_from_planes; head4d/reference/triplanes.py): a point p is
// scaled by 2 / box_warp, projected onto three planes, and each plane is sampled like
// torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros",
// align_corners=False) with the first 2D coordinate indexing the width. A plane
// coordinate that is NaN or infinite samples NaN on every channel of that plane.
//
// Nothing here touches memory: the launchers own the loads and stores, these
// functions own the arithmetic, so the CPU tests exercise the GPU's math.
#pragma once

#include <cmath>

#include "../common.h"
#include "../scalar_math.h"
#include "triplanes.h"

namespace head4d {
namespace triplanes {

// The two point axes that give plane `plane`'s (u, v): u indexes the width, v the height.
HEAD4D_HD void plane_axes(int layout, int plane, int& u_axis, int& v_axis) {
  if (plane == 0) {
    u_axis = 0;
    v_axis = 1;
  } else if (plane == 1) {
    u_axis = (layout == kEG3D) ? 0 : 1;
    v_axis = 2;
  } else {
    u_axis = 2;
    v_axis = 0;
  }
}

// grid_sample's unnormalization for align_corners=False: [-1, 1] -> pixel index
// space, where pixel centre j sits at 2 (j + 0.5) / size - 1.
template <typename T>
HEAD4D_HD T unnormalize(T coord, int size) {
  return ((coord + T(1)) * T(size) - T(1)) / T(2);
}

template <typename T>
HEAD4D_HD T floor_of(T x) {
#ifdef __CUDA_ARCH__
  return floor(x);
#else
  return std::floor(x);
#endif
}

// The bilinear footprint of one point on one plane.
// Corners are ordered nw (x0, y0), ne (x0 + 1, y0), sw (x0, y0 + 1), se (x0 + 1, y0 + 1).
template <typename T>
struct Stencil {
  int x0, y0;     // the north-west corner; may be -1
  T w[4];         // bilinear weights
  bool in[4];     // corner inside the plane (zero padding outside)
  T ix, iy;       // the unnormalized sample position
};

// Fills `s` for the plane coordinates (u, v) in [-1, 1] units on a W x H plane.
// Returns false when no corner lies inside the plane, which also covers NaN and
// infinite coordinates: the sample is then value_without_corners(u, v) and the
// kernels send no gradient through it.
template <typename T>
HEAD4D_HD bool make_stencil(T u, T v, int W, int H, Stencil<T>& s) {
  const T ix = unnormalize(u, W);
  const T iy = unnormalize(v, H);
  // Some corner is inside iff floor(ix) in [-1, W - 1] and floor(iy) in [-1, H - 1].
  if (!(ix >= T(-1) && ix < T(W) && iy >= T(-1) && iy < T(H))) return false;
  const T fx0 = floor_of(ix);
  const T fy0 = floor_of(iy);
  const int x0 = static_cast<int>(fx0);
  const int y0 = static_cast<int>(fy0);
  const T fx1 = fx0 + T(1);
  const T fy1 = fy0 + T(1);
  // The same products as grid_sample, so results agree to rounding.
  s.w[0] = (fx1 - ix) * (fy1 - iy);
  s.w[1] = (ix - fx0) * (fy1 - iy);
  s.w[2] = (fx1 - ix) * (iy - fy0);
  s.w[3] = (ix - fx0) * (iy - fy0);
  const bool x0_in = x0 >= 0;
  const bool x1_in = x0 + 1 <= W - 1;
  const bool y0_in = y0 >= 0;
  const bool y1_in = y0 + 1 <= H - 1;
  s.in[0] = x0_in && y0_in;
  s.in[1] = x1_in && y0_in;
  s.in[2] = x0_in && y1_in;
  s.in[3] = x1_in && y1_in;
  s.x0 = x0;
  s.y0 = y0;
  s.ix = ix;
  s.iy = iy;
  return true;
}

// The sample of a plane where make_stencil finds no corner inside it: 0 for finite
// coordinates (every corner is zero padding), NaN where u or v is NaN or infinite
// (bilinear weights of an infinite position are inf - inf; grid_sample on the CPU
// gives NaN there too).
template <typename T>
HEAD4D_HD T value_without_corners(T u, T v) {
  return is_finite_of(u) && is_finite_of(v) ? T(0) : T(NAN);
}

// Texel (row-major, one texel per (y, x)) index of corner k.
template <typename T>
HEAD4D_HD long long corner_texel(const Stencil<T>& s, int k, int W) {
  const int x = s.x0 + (k & 1);
  const int y = s.y0 + (k >> 1);
  return static_cast<long long>(y) * W + x;
}

// Derivatives of the four weights with respect to ix and iy.
template <typename T>
HEAD4D_HD void stencil_weight_grads(const Stencil<T>& s, T dw_dix[4], T dw_diy[4]) {
  const T fx0 = T(s.x0), fy0 = T(s.y0);
  const T fx1 = fx0 + T(1), fy1 = fy0 + T(1);
  dw_dix[0] = -(fy1 - s.iy);
  dw_dix[1] = (fy1 - s.iy);
  dw_dix[2] = -(s.iy - fy0);
  dw_dix[3] = (s.iy - fy0);
  dw_diy[0] = -(fx1 - s.ix);
  dw_diy[1] = -(s.ix - fx0);
  dw_diy[2] = (fx1 - s.ix);
  dw_diy[3] = (s.ix - fx0);
}

// p[axis] and grad[axis] += value, written with selects so that a GPU keeps the
// three components in registers (a runtime index would put them in local memory).
template <typename T>
HEAD4D_HD T component(const T p[3], int axis) {
  return axis == 0 ? p[0] : (axis == 1 ? p[1] : p[2]);
}

template <typename T>
HEAD4D_HD void add_component(T grad[3], int axis, T value) {
  grad[0] += axis == 0 ? value : T(0);
  grad[1] += axis == 1 ? value : T(0);
  grad[2] += axis == 2 ? value : T(0);
}

// Plane coordinates of point p (already read from memory) for plane `plane`.
template <typename T>
HEAD4D_HD void project(const T p[3], T scale, int layout, int plane, T& u, T& v) {
  int ua, va;
  plane_axes(layout, plane, ua, va);
  u = component(p, ua) * scale;
  v = component(p, va) * scale;
}

// Adds one plane's gradient with respect to its pixel coordinates (g_ix, g_iy)
// to the point's gradient. d ix / d u = W / 2, d u / d p[u_axis] = scale.
template <typename T>
HEAD4D_HD void accumulate_point_grad(T g_ix, T g_iy, int W, int H, T scale, int layout, int plane,
                                     T grad_p[3]) {
  int ua, va;
  plane_axes(layout, plane, ua, va);
  add_component(grad_p, ua, g_ix * (T(W) / T(2)) * scale);
  add_component(grad_p, va, g_iy * (T(H) / T(2)) * scale);
}

// What the sum over the three planes is divided by (torch's mean divides by the count).
template <typename T>
HEAD4D_HD T reduce_divisor(int reduce) {
  return reduce == kMean ? T(3) : T(1);
}

}  // namespace triplanes
}  // namespace head4d
