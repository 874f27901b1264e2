// CPU kernels of triplane sampling. The per-point math is triplanes_math.h,
// the same functions the CUDA kernels call.
//
// Forward: one task per point, walking all channels of the 12 texels it touches.
// Backward: grad_points one task per point (reads only); grad_planes is split by
// (batch, plane, band of rows) so that no two tasks write the same texel and no
// atomics are needed.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>


#include "triplanes.h"
#include "triplanes_math.h"
#include "../cpu_dispatch.h"

namespace head4d {
namespace triplanes {
namespace {

constexpr int64_t kChunk = 64;  // channels kept in registers / on the stack at once

template <typename scalar_t, typename acc_t>
void forward_impl(const ForwardArgs& a, const ParallelFor& parallel_for) {
  const auto* planes = static_cast<const scalar_t*>(a.planes);
  const auto* points = static_cast<const acc_t*>(a.points);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t N = a.N, M = a.M, C = a.C, H = a.H, W = a.W;
  const int64_t plane_size = H * W * C;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t divisor = reduce_divisor<acc_t>(a.reduce);

  parallel_for(N * M, 256, [&](int64_t begin, int64_t end) {
    acc_t total[kChunk];
    acc_t plane_value[kChunk];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / M, m = i % M;
      const acc_t p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
      Stencil<acc_t> st[3];
      bool hit[3];
      acc_t miss[3];  // a plane's sample where no corner is inside
      for (int k = 0; k < 3; ++k) {
        acc_t u, v;
        project(p, scale, a.layout, k, u, v);
        hit[k] = make_stencil(u, v, static_cast<int>(W), static_cast<int>(H), st[k]);
        miss[k] = hit[k] ? acc_t(0) : value_without_corners(u, v);
      }
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t cn = std::min(kChunk, C - c0);
        std::fill(total, total + cn, acc_t(0));
        for (int k = 0; k < 3; ++k) {
          std::fill(plane_value, plane_value + cn, miss[k]);
          if (hit[k]) {
            const scalar_t* base = planes + (n * 3 + k) * plane_size + c0;
            for (int corner = 0; corner < 4; ++corner) {
              if (!st[k].in[corner]) continue;
              const scalar_t* texel = base + corner_texel(st[k], corner, static_cast<int>(W)) * C;
              const acc_t w = st[k].w[corner];
              for (int64_t c = 0; c < cn; ++c) plane_value[c] += w * static_cast<acc_t>(texel[c]);
            }
          }
          if (a.reduce == kNone) {
            scalar_t* dst = out + ((n * 3 + k) * M + m) * C + c0;
            for (int64_t c = 0; c < cn; ++c) dst[c] = static_cast<scalar_t>(plane_value[c]);
          } else {
            for (int64_t c = 0; c < cn; ++c) total[c] += plane_value[c];
          }
        }
        if (a.reduce != kNone) {
          scalar_t* dst = out + i * C + c0;
          for (int64_t c = 0; c < cn; ++c) dst[c] = static_cast<scalar_t>(total[c] / divisor);
        }
      }
    }
  });
}

// The incoming gradient of plane k's feature at point (n, m), channel c.
template <typename scalar_t, typename acc_t>
inline acc_t grad_of(const scalar_t* grad_out, int reduce, int64_t n, int k, int64_t m, int64_t M,
                     int64_t C, int64_t c, acc_t divisor) {
  if (reduce == kNone) return static_cast<acc_t>(grad_out[((n * 3 + k) * M + m) * C + c]);
  return static_cast<acc_t>(grad_out[(n * M + m) * C + c]) / divisor;
}

template <typename scalar_t, typename acc_t>
void backward_points_impl(const BackwardArgs& a, const ParallelFor& parallel_for) {
  const auto* planes = static_cast<const scalar_t*>(a.planes);
  const auto* points = static_cast<const acc_t*>(a.points);
  const auto* grad_out = static_cast<const scalar_t*>(a.grad_out);
  auto* grad_points = static_cast<acc_t*>(a.grad_points);
  const int64_t M = a.M, C = a.C, H = a.H, W = a.W;
  const int64_t plane_size = H * W * C;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t divisor = reduce_divisor<acc_t>(a.reduce);

  parallel_for(a.N * M, 256, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(C);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / M, m = i % M;
      const acc_t p[3] = {points[i * 3 + 0], points[i * 3 + 1], points[i * 3 + 2]};
      acc_t grad_p[3] = {acc_t(0), acc_t(0), acc_t(0)};
      for (int k = 0; k < 3; ++k) {
        acc_t u, v;
        project(p, scale, a.layout, k, u, v);
        Stencil<acc_t> st;
        if (!make_stencil(u, v, static_cast<int>(W), static_cast<int>(H), st)) continue;
        acc_t dw_dix[4], dw_diy[4];
        stencil_weight_grads(st, dw_dix, dw_diy);
        const scalar_t* base = planes + (n * 3 + k) * plane_size;
        for (int64_t c = 0; c < C; ++c)
          g[c] = grad_of<scalar_t, acc_t>(grad_out, a.reduce, n, k, m, M, C, c, divisor);
        acc_t g_ix = acc_t(0), g_iy = acc_t(0);
        for (int corner = 0; corner < 4; ++corner) {
          if (!st.in[corner]) continue;
          const scalar_t* texel = base + corner_texel(st, corner, static_cast<int>(W)) * C;
          acc_t dot = acc_t(0);
          for (int64_t c = 0; c < C; ++c) dot += g[c] * static_cast<acc_t>(texel[c]);
          g_ix += dot * dw_dix[corner];
          g_iy += dot * dw_diy[corner];
        }
        accumulate_point_grad(g_ix, g_iy, static_cast<int>(W), static_cast<int>(H), scale, a.layout,
                              k, grad_p);
      }
      for (int d = 0; d < 3; ++d) grad_points[i * 3 + d] = grad_p[d];
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_planes_impl(const BackwardArgs& a, const ParallelFor& parallel_for, int num_threads) {
  const auto* points = static_cast<const acc_t*>(a.points);
  const auto* grad_out = static_cast<const scalar_t*>(a.grad_out);
  auto* grad_planes = static_cast<acc_t*>(a.grad_planes);
  const int64_t N = a.N, M = a.M, C = a.C, H = a.H, W = a.W;
  const int64_t plane_size = H * W * C;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t divisor = reduce_divisor<acc_t>(a.reduce);

  // Enough row bands that every thread has work; each task re-derives the stencils
  // of all points of its batch element (cheap) but writes only its own rows.
  const int64_t planes_total = N * 3;
  const int64_t bands = std::max<int64_t>(
      1, std::min<int64_t>(H, (2 * static_cast<int64_t>(std::max(num_threads, 1)) + planes_total - 1) /
                                  planes_total));
  const int64_t rows_per_band = (H + bands - 1) / bands;

  parallel_for(planes_total * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nk = task / bands;
      const int64_t band = task % bands;
      const int64_t n = nk / 3;
      const int k = static_cast<int>(nk % 3);
      const int64_t row_lo = band * rows_per_band;
      const int64_t row_hi = std::min(H, row_lo + rows_per_band);
      acc_t* base = grad_planes + nk * plane_size;
      for (int64_t m = 0; m < M; ++m) {
        const acc_t* pp = points + (n * M + m) * 3;
        const acc_t p[3] = {pp[0], pp[1], pp[2]};
        acc_t u, v;
        project(p, scale, a.layout, k, u, v);
        Stencil<acc_t> st;
        if (!make_stencil(u, v, static_cast<int>(W), static_cast<int>(H), st)) continue;
        if (st.y0 + 1 < row_lo || st.y0 >= row_hi) continue;
        bool loaded = false;
        for (int corner = 0; corner < 4; ++corner) {
          const int64_t row = st.y0 + (corner >> 1);
          if (!st.in[corner] || row < row_lo || row >= row_hi) continue;
          if (!loaded) {
            for (int64_t c = 0; c < C; ++c)
              g[c] = grad_of<scalar_t, acc_t>(grad_out, a.reduce, n, k, m, M, C, c, divisor);
            loaded = true;
          }
          acc_t* texel = base + corner_texel(st, corner, static_cast<int>(W)) * C;
          const acc_t w = st.w[corner];
          for (int64_t c = 0; c < C; ++c) texel[c] += w * g[c];
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_impl(const BackwardArgs& a, const ParallelFor& parallel_for, int num_threads) {
  if (a.grad_points != nullptr) backward_points_impl<scalar_t, acc_t>(a, parallel_for);
  if (a.grad_planes != nullptr) backward_planes_impl<scalar_t, acc_t>(a, parallel_for, num_threads);
}

template <typename E>
void transpose_impl(const E* src, E* dst, int64_t P, int64_t C, int64_t H, int64_t W,
                    const ParallelFor& parallel_for) {
  // One output row (W * C elements, a few tens of KB) at a time: each channel's input
  // row is read sequentially and scattered into the row, which stays in cache. (Walking
  // all channels per pixel instead strides by H * W, a power of two for usual planes,
  // and thrashes the cache sets.)
  parallel_for(P * H, 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t p = row / H, y = row % H;
      const E* s = src + p * C * H * W + y * W;
      E* d = dst + (p * H + y) * W * C;
      constexpr int64_t kGroup = 8;  // channels written together: 8 read streams, 8-element runs out
      int64_t c = 0;
      for (; c + kGroup <= C; c += kGroup) {
        const E* sc = s + c * H * W;
        for (int64_t x = 0; x < W; ++x) {
          E* dx = d + x * C + c;
          for (int64_t g = 0; g < kGroup; ++g) dx[g] = sc[g * H * W + x];
        }
      }
      for (; c < C; ++c) {
        const E* sc = s + c * H * W;
        for (int64_t x = 0; x < W; ++x) d[x * C + c] = sc[x];
      }
    }
  });
}

}  // namespace

void to_channels_last_cpu(const void* src, void* dst, int64_t P, int64_t C, int64_t H, int64_t W,
                          int element_size, const ParallelFor& parallel_for) {
  switch (element_size) {
    case 2:
      return transpose_impl(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), P, C, H, W, parallel_for);
    case 4:
      return transpose_impl(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), P, C, H, W, parallel_for);
    case 8:
      return transpose_impl(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), P, C, H, W, parallel_for);
  }
  throw std::invalid_argument("to_channels_last_cpu: unsupported element size");
}

void forward_cpu(const ForwardArgs& args, const ParallelFor& parallel_for, int) {
  if (args.N * args.M == 0) return;
  with_cpu_storage_type(args.dtype, "sample_triplanes", [&](auto s, auto acc) {
    forward_impl<decltype(s), decltype(acc)>(args, parallel_for);
  });
}

void backward_cpu(const BackwardArgs& args, const ParallelFor& parallel_for, int num_threads) {
  if (args.N * args.M == 0) return;
  with_cpu_storage_type(args.dtype, "sample_triplanes", [&](auto s, auto acc) {
    backward_impl<decltype(s), decltype(acc)>(args, parallel_for, num_threads);
  });
}

}  // namespace triplanes
}  // namespace head4d
