// Per-point math of voxel-grid sampling, shared by the CPU and the CUDA kernels.
//
// Semantics: torch.nn.functional.grid_sample on a 5-D input, mode="bilinear"
// (trilinear), align_corners=True, padding_mode "zeros" or "border", at points / bound
// (head4d/reference/deformation.py, sample_grid3d). x indexes W, y H, z D. The
// arithmetic follows ATen's CPU kernel (GridSampler.cpp) operation by operation, so the
// CPU backend gives the reference's values to the last bit in the forward:
//   pos = ((p / bound + 1) / 2) * (size - 1), clamped to [0, size - 1] for "border";
//   i0 = floor(pos), weights (i0 + 1 - pos) and (pos - i0) per axis;
//   corner weight = wx * wy * wz, corners in the order (z, y, x) = 000, 001, 010, ... 111
//   (ATen's tnw, tne, tsw, tse, bnw, bne, bsw, bse), each added as value * weight.
// Gradient with respect to the point: d pos / d p = (size - 1) / 2 / bound, and 0 where
// "border" clamps (ATen counts the border itself as clamped: pos <= 0 or pos >= size - 1).
// A point with a NaN or infinite coordinate samples NaN with either padding (the
// reference states this; grid_sample's own answer there depends on the device and the
// padding), and the kernels send no gradient through it.
//
// Nothing here touches memory: the launchers own the loads and stores.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common.h"
#include "../scalar_math.h"
#include "grid3d.h"

namespace head4d {
namespace grid3d {

// floor(x) as an integer, for x in [-1, 2^62) (make_axis checks the range first). On the
// host this avoids a libm call (x86-64 without SSE4.1 has no rounding instruction).
template <typename T>
HEAD4D_HD int64_t floor_index(T x) {
#ifdef __CUDA_ARCH__
  return static_cast<int64_t>(floor(x));
#else
  int64_t i = static_cast<int64_t>(x);  // truncation toward zero
  if (static_cast<T>(i) > x) --i;
  return i;
#endif
}

// One axis of the trilinear stencil.
template <typename T>
struct Axis {
  int64_t i0;  // the lower corner's index; may be -1
  T w[2];      // weights of i0 and i0 + 1
  bool in[2];  // whether i0 and i0 + 1 lie on the grid (zero padding outside)
  T dpos;      // d pos / d point coordinate
};

// Fills `a` for one point coordinate on an axis of `size` grid points. Returns false
// when neither corner lies on the grid (the sample and its gradients are exactly 0),
// which also covers coordinates too large for an index, and when the coordinate is NaN
// or infinite (the sample is then NaN: value_without_corners).
template <typename T>
HEAD4D_HD bool make_axis(T coord, T bound, int64_t size, int padding, Axis<T>& a) {
  if (!is_finite_of(coord)) return false;
  const T c = coord / bound;
  T pos = ((c + T(1)) / T(2)) * T(size - 1);
  T dpos = T(size - 1) / T(2) / bound;
  if (padding == kBorder) {
    if (pos <= T(0)) {
      pos = T(0);
      dpos = T(0);
    } else if (pos >= T(size - 1)) {
      pos = T(size - 1);
      dpos = T(0);
    }
  }
  // Some corner is on the grid iff floor(pos) lies in [-1, size - 1].
  if (!(pos >= T(-1) && pos < T(size))) return false;
  a.i0 = floor_index(pos);
  const T f0 = static_cast<T>(a.i0);
  a.w[0] = (f0 + T(1)) - pos;
  a.w[1] = pos - f0;
  a.in[0] = a.i0 >= 0;
  a.in[1] = a.i0 + 1 <= size - 1;
  a.dpos = dpos;
  return true;
}

// The trilinear footprint of one point: axes x (W), y (H), z (D).
template <typename T>
struct Stencil {
  Axis<T> ax[3];
};

template <typename T>
HEAD4D_HD bool make_stencil(const T p[3], T bound, int64_t W, int64_t H, int64_t D, int padding, Stencil<T>& s) {
  return make_axis(p[0], bound, W, padding, s.ax[0]) && make_axis(p[1], bound, H, padding, s.ax[1]) &&
         make_axis(p[2], bound, D, padding, s.ax[2]);
}

// The sample of a point for which make_stencil returned false: 0 (every corner is zero
// padding), or NaN where a coordinate is NaN or infinite.
template <typename T>
HEAD4D_HD T value_without_corners(const T p[3]) {
  return is_finite_of(p[0]) && is_finite_of(p[1]) && is_finite_of(p[2]) ? T(0) : T(NAN);
}

// Corner k in 0..7: x offset k & 1, y offset (k >> 1) & 1, z offset k >> 2.
template <typename T>
HEAD4D_HD bool corner_in(const Stencil<T>& s, int k) {
  return s.ax[0].in[k & 1] && s.ax[1].in[(k >> 1) & 1] && s.ax[2].in[k >> 2];
}

template <typename T>
HEAD4D_HD T corner_weight(const Stencil<T>& s, int k) {
  return s.ax[0].w[k & 1] * s.ax[1].w[(k >> 1) & 1] * s.ax[2].w[k >> 2];
}

// The z index of corner k (to keep a task to its band of depth slices).
template <typename T>
HEAD4D_HD int64_t corner_z(const Stencil<T>& s, int k) {
  return s.ax[2].i0 + (k >> 2);
}

// Voxel index ((z * H) + y) * W + x of corner k in a [D, H, W] grid.
template <typename T>
HEAD4D_HD int64_t corner_voxel(const Stencil<T>& s, int k, int64_t W, int64_t H) {
  const int64_t x = s.ax[0].i0 + (k & 1);
  const int64_t y = s.ax[1].i0 + ((k >> 1) & 1);
  const int64_t z = s.ax[2].i0 + (k >> 2);
  return (z * H + y) * W + x;
}

// Derivatives of corner k's weight with respect to the three grid positions.
template <typename T>
HEAD4D_HD void corner_weight_grads(const Stencil<T>& s, int k, T& dx, T& dy, T& dz) {
  const int bx = k & 1, by = (k >> 1) & 1, bz = k >> 2;
  const T sx = bx ? T(1) : T(-1);
  const T sy = by ? T(1) : T(-1);
  const T sz = bz ? T(1) : T(-1);
  const T wx = s.ax[0].w[bx], wy = s.ax[1].w[by], wz = s.ax[2].w[bz];
  dx = sx * wy * wz;
  dy = wx * sy * wz;
  dz = wx * wy * sz;
}

// The point gradient from the gradients with respect to the three grid positions.
template <typename T>
HEAD4D_HD void point_grad(const Stencil<T>& s, const T g_pos[3], T grad_p[3]) {
  grad_p[0] = g_pos[0] * s.ax[0].dpos;
  grad_p[1] = g_pos[1] * s.ax[1].dpos;
  grad_p[2] = g_pos[2] * s.ax[2].dpos;
}

}  // namespace grid3d
}  // namespace head4d
