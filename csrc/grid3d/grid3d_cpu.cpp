// CPU kernels of voxel-grid sampling. The per-point math is grid3d_math.h, the same
// functions the CUDA kernels call.
//
// Grid layout: channels-last [N, D, H, W, C], so each of a point's 8 corners is one
// contiguous run of C values.
// Forward: one task per point, all channels.
// Backward: grad_points one task per point (reads only). grad_grid without atomics:
//  - when the grid is small next to the work (Portrait4D's 24^3 and 8^3 grids), each
//    of T tasks takes a contiguous range of the points and scatters into a private
//    copy of the gradient (task 0 into the output itself), then the copies are summed
//    in task order;
//  - otherwise each task owns a band of depth slices of one batch element, walks all of
//    that element's points and writes only the corners inside its band.
// Both give results that depend on the thread count only, not on scheduling.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <type_traits>


#include "grid3d.h"
#include "grid3d_math.h"
#include "../cpu_dispatch.h"

namespace head4d {
namespace grid3d {
namespace {

constexpr int64_t kChunk = 16;                  // channels kept on the stack at once (runtime C)
constexpr int64_t kMinPointsPerTask = 4096;     // below this a private gradient buffer does not pay
constexpr int64_t kMaxBufferElements = 1 << 24;  // cap of all private buffers together (64 MB in float32)

// CC: the channel count when known at compile time (1 and 3: Portrait4D's grids), else 0.
template <int CC>
inline int64_t channels(int64_t C) {
  return CC > 0 ? CC : C;
}

// fn(n, i) for the flat point indices i in [begin, end), n = i / M (without dividing per point).
template <typename Fn>
inline void for_points(int64_t M, int64_t begin, int64_t end, Fn&& fn) {
  int64_t n = begin / M, m = begin - n * M;
  for (int64_t i = begin; i < end; ++i, ++m) {
    if (m == M) {
      m = 0;
      ++n;
    }
    fn(n, i);
  }
}

template <typename scalar_t, typename acc_t, int CC>
void forward_impl(const ForwardArgs& a, const ParallelFor& parallel_for) {
  const auto* grid = static_cast<const scalar_t*>(a.grid);
  const auto* points = static_cast<const acc_t*>(a.points);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t M = a.M, C = channels<CC>(a.C), D = a.D, H = a.H, W = a.W;
  const int64_t grid_size = D * H * W * C;
  const acc_t bound = static_cast<acc_t>(a.bound);
  constexpr int64_t kStep = CC > 0 ? CC : kChunk;

  parallel_for(a.N * M, 512, [&](int64_t begin, int64_t end) {
    acc_t acc[kStep] = {};
    int64_t n = begin / M, m = begin - n * M;
    for (int64_t i = begin; i < end; ++i, ++m) {
      if (m == M) {
        m = 0;
        ++n;
      }
      const acc_t p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
      scalar_t* dst = out + i * C;
      Stencil<acc_t> st;
      if (!make_stencil(p, bound, W, H, D, a.padding, st)) {
        const acc_t miss = value_without_corners(p);
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(miss);
        continue;
      }
      const scalar_t* base = grid + n * grid_size;
      if constexpr (CC > 0) {
        for (int c = 0; c < CC; ++c) acc[c] = acc_t(0);
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          if (!corner_in(st, k)) continue;
          const acc_t w = corner_weight(st, k);
          const scalar_t* v = base + corner_voxel(st, k, W, H) * CC;
          for (int c = 0; c < CC; ++c) acc[c] += static_cast<acc_t>(v[c]) * w;
        }
        for (int c = 0; c < CC; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
      } else {
        for (int64_t c0 = 0; c0 < C; c0 += kStep) {
          const int64_t cn = std::min(kStep, C - c0);
          for (int64_t c = 0; c < cn; ++c) acc[c] = acc_t(0);
#pragma GCC unroll 8
          for (int k = 0; k < 8; ++k) {
            if (!corner_in(st, k)) continue;
            const acc_t w = corner_weight(st, k);
            const scalar_t* v = base + corner_voxel(st, k, W, H) * C + c0;
            for (int64_t c = 0; c < cn; ++c) acc[c] += static_cast<acc_t>(v[c]) * w;
          }
          for (int64_t c = 0; c < cn; ++c) dst[c0 + c] = static_cast<scalar_t>(acc[c]);
        }
      }
    }
  });
}

#if defined(__GNUC__)
#define HEAD4D_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HEAD4D_ALWAYS_INLINE inline
#endif

// The backward of one point (n = i / M). kPoints: writes its point gradient to
// grad_points. kGrid: adds its grid gradient to grad_grid (channels-last, batch element
// n at grad_grid + n * grid_size), only to the corners with z in [z_lo, z_hi) when kBand.
template <typename scalar_t, typename acc_t, int CC, bool kPoints, bool kGrid, bool kBand>
HEAD4D_ALWAYS_INLINE void backward_point(const BackwardArgs& a, int64_t n, int64_t i, acc_t* grad_grid,
                                         acc_t* grad_points, int64_t z_lo, int64_t z_hi) {
  const auto* grid = static_cast<const scalar_t*>(a.grid);
  const auto* points = static_cast<const acc_t*>(a.points);
  const auto* grad_out = static_cast<const acc_t*>(a.grad_out);
  const int64_t C = channels<CC>(a.C), D = a.D, H = a.H, W = a.W;
  const int64_t grid_size = D * H * W * C;
  const acc_t p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
  Stencil<acc_t> st;
  if (!make_stencil(p, static_cast<acc_t>(a.bound), W, H, D, a.padding, st)) {
    if (kPoints)
      for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = acc_t(0);
    return;
  }
  if (kBand && (corner_z(st, 7) < z_lo || corner_z(st, 0) >= z_hi)) return;
  const acc_t* g = grad_out + i * C;
  const scalar_t* base = grid + n * grid_size;
  acc_t* gbase = kGrid ? grad_grid + n * grid_size : nullptr;
  acc_t g_pos[3] = {acc_t(0), acc_t(0), acc_t(0)};
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    if (!corner_in(st, k)) continue;
    const int64_t offset = corner_voxel(st, k, W, H) * C;
    if (kPoints) {
      const scalar_t* v = base + offset;
      acc_t dot = acc_t(0);
      for (int64_t c = 0; c < C; ++c) dot += g[c] * static_cast<acc_t>(v[c]);
      acc_t dx, dy, dz;
      corner_weight_grads(st, k, dx, dy, dz);
      g_pos[0] += dot * dx;
      g_pos[1] += dot * dy;
      g_pos[2] += dot * dz;
    }
    if (kGrid) {
      if (kBand) {
        const int64_t z = corner_z(st, k);
        if (z < z_lo || z >= z_hi) continue;
      }
      const acc_t w = corner_weight(st, k);
      acc_t* dst = gbase + offset;
      for (int64_t c = 0; c < C; ++c) dst[c] += w * g[c];
    }
  }
  if (kPoints) {
    acc_t gp[3];
    point_grad(st, g_pos, gp);
    for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = gp[d];
  }
}

template <typename scalar_t, typename acc_t, int CC>
void backward_impl(const BackwardArgs& a, const ParallelFor& parallel_for, int num_threads) {
  auto* grad_grid = static_cast<acc_t*>(a.grad_grid);
  auto* grad_points = static_cast<acc_t*>(a.grad_points);
  const int64_t P = a.N * a.M;
  const int64_t C = channels<CC>(a.C);
  const int64_t D = a.D;
  const int64_t grid_numel = a.N * D * a.H * a.W * C;
  const int64_t threads = std::max(num_threads, 1);
  const auto points_pass = [&]() {
    parallel_for(P, 512, [&](int64_t begin, int64_t end) {
      for_points(a.M, begin, end, [&](int64_t n, int64_t i) {
        backward_point<scalar_t, acc_t, CC, true, false, false>(a, n, i, nullptr, grad_points, 0, D);
      });
    });
  };

  if (grad_grid == nullptr) {
    if (grad_points != nullptr) points_pass();
    return;
  }

  int64_t tasks = std::min(threads, std::max<int64_t>(1, P / kMinPointsPerTask));
  const int64_t budget = std::min<int64_t>(kMaxBufferElements, std::max<int64_t>(1 << 20, 4 * P * C));
  if (tasks == 1 || (tasks - 1) * grid_numel <= budget) {
    // private buffers: task t > 0 scatters into buffers[t - 1], task 0 into grad_grid
    std::unique_ptr<acc_t[]> buffers(tasks > 1 ? new acc_t[(tasks - 1) * grid_numel] : nullptr);
    parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        acc_t* dst = grad_grid;
        if (t > 0) {
          dst = buffers.get() + (t - 1) * grid_numel;
          std::fill(dst, dst + grid_numel, acc_t(0));
        }
        const int64_t lo = t * P / tasks, hi = (t + 1) * P / tasks;
        if (grad_points != nullptr) {
          for_points(a.M, lo, hi, [&](int64_t n, int64_t i) {
            backward_point<scalar_t, acc_t, CC, true, true, false>(a, n, i, dst, grad_points, 0, D);
          });
        } else {
          for_points(a.M, lo, hi, [&](int64_t n, int64_t i) {
            backward_point<scalar_t, acc_t, CC, false, true, false>(a, n, i, dst, nullptr, 0, D);
          });
        }
      }
    });
    if (tasks > 1) {
      parallel_for(grid_numel, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t t = 1; t < tasks; ++t) {
          const acc_t* src = buffers.get() + (t - 1) * grid_numel;
          for (int64_t j = begin; j < end; ++j) grad_grid[j] += src[j];
        }
      });
    }
    return;
  }

  // bands of depth slices: every task walks all points of its batch element
  if (grad_points != nullptr) points_pass();
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(D, (2 * threads + a.N - 1) / std::max<int64_t>(a.N, 1)));
  const int64_t slices = (D + bands - 1) / bands;
  parallel_for(a.N * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, band = task % bands;
      const int64_t z_lo = band * slices, z_hi = std::min(D, z_lo + slices);
      if (z_lo >= z_hi) continue;
      for (int64_t m = 0; m < a.M; ++m)
        backward_point<scalar_t, acc_t, CC, false, true, true>(a, n, n * a.M + m, grad_grid, nullptr, z_lo, z_hi);
    }
  });
}

template <typename Fn>
void with_channels(int64_t C, Fn&& fn) {
  if (C == 1) return fn(std::integral_constant<int, 1>{});
  if (C == 3) return fn(std::integral_constant<int, 3>{});
  return fn(std::integral_constant<int, 0>{});
}

}  // namespace

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for) {
  if (args.N * args.M * args.C == 0) return;
  with_cpu_storage_type(args.dtype, "sample_grid3d", [&](auto s, auto acc) {
    using scalar_t = decltype(s);
    using acc_t = decltype(acc);
    with_channels(args.C, [&](auto cc) {
      forward_impl<scalar_t, acc_t, decltype(cc)::value>(args, parallel_for);
    });
  });
}

void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for, int num_threads) {
  if (args.N * args.M == 0) return;
  with_cpu_storage_type(args.dtype, "sample_grid3d", [&](auto s, auto acc) {
    using scalar_t = decltype(s);
    using acc_t = decltype(acc);
    with_channels(args.C, [&](auto cc) {
      backward_impl<scalar_t, acc_t, decltype(cc)::value>(args, parallel_for, num_threads);
    });
  });
}

}  // namespace grid3d
}  // namespace head4d
