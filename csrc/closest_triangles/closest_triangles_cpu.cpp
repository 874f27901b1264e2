// CPU kernels of the closest-triangle search. The per-(point, triangle) math is
// closest_triangles_math.h, the same functions the CUDA kernels call.
//
// One task per block of query points (4 x 4 x 4 grid points, or 64 consecutive
// points): the tiles (kTileCpu faces each, spatially sorted) are ordered by the lower
// bound of their distance to the block's bounding box; then, per point, the tiles in
// that order until the next one's bound exceeds the point's reach (every later tile is
// farther still), a per-point box test per tile and a bounding-sphere test per face,
// and the exact distance for the faces that pass. The bounds carry a relative slack far
// above rounding, so the result is the brute force's, ties included.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "closest_triangles.h"
#include "closest_triangles_math.h"

namespace head4d {
namespace closest_triangles {

size_t record_bytes(Dtype dtype) {
  return dtype == Dtype::kFloat64 ? sizeof(TriRecord<double>) : sizeof(TriRecord<float>);
}
size_t sphere_bytes(Dtype dtype) {
  return dtype == Dtype::kFloat64 ? sizeof(Sphere<double>) : sizeof(Sphere<float>);
}
size_t tile_bytes(Dtype dtype) {
  return dtype == Dtype::kFloat64 ? sizeof(TileBox<double>) : sizeof(TileBox<float>);
}

namespace {

constexpr int kBlockSide = 4;                                   // grid blocks: 4 x 4 x 4 points
constexpr int kBlockPoints = kBlockSide * kBlockSide * kBlockSide;  // explicit points: 64 per block

template <typename A>
void keys_impl(const KeysArgs& a) {
  const A* verts = static_cast<const A*>(a.verts);
  const float inf = std::numeric_limits<float>::infinity();
  float lo[3] = {inf, inf, inf}, hi[3] = {-inf, -inf, -inf};
  std::vector<float> cent(static_cast<size_t>(a.F) * 3);
  std::vector<char> ok(static_cast<size_t>(a.F));
  for (int64_t f = 0; f < a.F; ++f) {
    float* c = cent.data() + f * 3;
    ok[f] = centroid(verts, a.faces, f, a.V, c);
    if (!ok[f]) continue;
    for (int i = 0; i < 3; ++i) {
      lo[i] = std::min(lo[i], c[i]);
      hi[i] = std::max(hi[i], c[i]);
    }
  }
  float inv[3];
  for (int i = 0; i < 3; ++i) inv[i] = hi[i] > lo[i] ? 1.0f / (hi[i] - lo[i]) : 0.0f;
  for (int64_t f = 0; f < a.F; ++f) {
    const uint32_t code = ok[f] ? morton_code(cent.data() + f * 3, lo, inv) : 0u;
    a.keys[f] = (static_cast<int64_t>(code) << 32) | f;
  }
}

template <typename A>
void prepare_impl(const PrepareArgs& a, const ParallelFor& parallel_for) {
  const A* verts = static_cast<const A*>(a.verts);
  auto* records = static_cast<TriRecord<A>*>(a.records);
  auto* spheres = static_cast<Sphere<A>*>(a.spheres);
  auto* tiles = static_cast<TileBox<A>*>(a.tiles);
  const int64_t F = a.F, V = a.V, T = a.T, tile = a.tile;
  parallel_for(a.N * T, 16, [&](int64_t begin, int64_t end) {
    const A inf = std::numeric_limits<A>::infinity();
    const A nan = std::numeric_limits<A>::quiet_NaN();
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / T, t = it % T;
      const A* vn = verts + n * V * 3;
      A lo[3] = {inf, inf, inf}, hi[3] = {-inf, -inf, -inf};
      bool finite = true;
      const int64_t s1 = std::min(F, (t + 1) * tile);
      for (int64_t s = t * tile; s < s1; ++s) {
        const int32_t f = a.order[s];
        int32_t idx[3];
        A corner[3][3];
        for (int k = 0; k < 3; ++k) {
          idx[k] = a.faces[static_cast<int64_t>(f) * 3 + k];
          for (int i = 0; i < 3; ++i)
            corner[k][i] = is_vertex(idx[k], V) ? vn[static_cast<int64_t>(idx[k]) * 3 + i] : nan;
          if (!finite3(corner[k])) finite = false;
          for (int i = 0; i < 3; ++i) {
            lo[i] = std::min(lo[i], corner[k][i]);
            hi[i] = std::max(hi[i], corner[k][i]);
          }
        }
        make_record(corner[0], corner[1], corner[2], idx[0], idx[1], idx[2], f, records[n * F + s],
                    spheres[n * F + s]);
      }
      TileBox<A>& box = tiles[it];
      if (!finite) {
        for (int i = 0; i < 3; ++i) {
          lo[i] = -inf;
          hi[i] = inf;
        }
      }
      A diag[3];
      for (int i = 0; i < 3; ++i) {
        box.lo[i] = lo[i];
        box.hi[i] = hi[i];
        diag[i] = hi[i] - lo[i];
      }
      box.slack = std::sqrt(diag[0] * diag[0] + diag[1] * diag[1] + diag[2] * diag[2]) * A(kSlack);
      box.pad = A(0);
    }
  });
}

// The closest face to p among the faces of batch element n, visiting the tiles in
// `order` (ascending block lower bound `lb`).
template <typename A>
struct Found {
  A best;
  int32_t face;
  int64_t slot;
};

template <typename A>
Found<A> search_point(const A p[3], const TriRecord<A>* rec, const Sphere<A>* sph, const TileBox<A>* tiles,
                      const A* lb, const int32_t* order, int64_t T, int64_t F, int64_t tile) {
  Found<A> r{std::numeric_limits<A>::infinity(), std::numeric_limits<int32_t>::max(), -1};
  A reach = std::numeric_limits<A>::infinity(), reach_s = reach;
  for (int64_t k = 0; k < T; ++k) {
    const int32_t t = order[k];
    if (lb[t] > reach) break;  // sorted: every later tile is at least as far
    if (box_lower_bound(p, p, tiles[t]) > reach) continue;
    const int64_t s1 = std::min(F, (static_cast<int64_t>(t) + 1) * tile);
    for (int64_t s = static_cast<int64_t>(t) * tile; s < s1; ++s) {
      if (sphere_excludes(p, sph[s], reach_s)) continue;
      const A d = pair_sq_dist(p, rec[s]);
      if (better(d, rec[s].face, r.best, r.face)) {
        r.best = d;
        r.face = rec[s].face;
        r.slot = s;
        reach = reach_of(d);
        reach_s = sphere_reach(d);
      }
    }
  }
  return r;
}

template <typename A, bool kGrid>
void search_impl(const SearchArgs& a, const ParallelFor& parallel_for) {
  const A* points = static_cast<const A*>(a.points);
  const A* grid = static_cast<const A*>(a.grid);
  const auto* records = static_cast<const TriRecord<A>*>(a.records);
  const auto* spheres = static_cast<const Sphere<A>*>(a.spheres);
  const auto* tiles = static_cast<const TileBox<A>*>(a.tiles);
  const A* verts_canon = static_cast<const A*>(a.verts_canon);
  A* squared = static_cast<A*>(a.squared);
  A* bary_out = static_cast<A*>(a.barycentric);
  A* signed_out = static_cast<A*>(a.signed_distance);
  A* disp_out = static_cast<A*>(a.displacement);
  const int64_t M = a.M, R = a.R, F = a.F, T = a.T, V = a.V, tile = a.tile;
  const int64_t nb = kGrid ? (R + kBlockSide - 1) / kBlockSide : 0;
  const int64_t per_item = kGrid ? nb * nb * nb : (M + kBlockPoints - 1) / kBlockPoints;
  const bool values = bary_out != nullptr || signed_out != nullptr || disp_out != nullptr;

  parallel_for(a.N * per_item, 1, [&](int64_t begin, int64_t end) {
    const A inf = std::numeric_limits<A>::infinity();
    const A nan = std::numeric_limits<A>::quiet_NaN();
    std::vector<A> lb(static_cast<size_t>(T));
    std::vector<int32_t> order(static_cast<size_t>(T));
    int64_t index[kBlockPoints];
    A pts[kBlockPoints][3];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n = blk / per_item, local = blk % per_item;
      // the block's points
      int count = 0;
      if (kGrid) {
        const int64_t d0 = (local / (nb * nb)) * kBlockSide, h0 = (local / nb % nb) * kBlockSide,
                      w0 = (local % nb) * kBlockSide;
        for (int64_t d = d0; d < std::min(R, d0 + kBlockSide); ++d)
          for (int64_t h = h0; h < std::min(R, h0 + kBlockSide); ++h)
            for (int64_t w = w0; w < std::min(R, w0 + kBlockSide); ++w) {
              index[count] = (d * R + h) * R + w;
              pts[count][0] = grid[w];
              pts[count][1] = grid[h];
              pts[count][2] = grid[d];
              ++count;
            }
      } else {
        for (int64_t m = local * kBlockPoints; m < std::min(M, (local + 1) * kBlockPoints); ++m) {
          index[count] = m;
          for (int i = 0; i < 3; ++i) pts[count][i] = points[(n * M + m) * 3 + i];
          ++count;
        }
      }
      // its box (NaN coordinates left out: their points exclude nothing by their reach)
      A lo[3] = {inf, inf, inf}, hi[3] = {-inf, -inf, -inf};
      for (int j = 0; j < count; ++j)
        for (int i = 0; i < 3; ++i) {
          if (pts[j][i] < lo[i]) lo[i] = pts[j][i];
          if (pts[j][i] > hi[i]) hi[i] = pts[j][i];
        }
      const TileBox<A>* tn = tiles + n * T;
      for (int64_t t = 0; t < T; ++t) {
        const A b = box_lower_bound(lo, hi, tn[t]);
        lb[t] = is_nan(b) ? -inf : b;
      }
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return lb[x] < lb[y] || (lb[x] == lb[y] && x < y); });

      const TriRecord<A>* rec = records + n * F;
      const Sphere<A>* sph = spheres + n * F;
      for (int j = 0; j < count; ++j) {
        const A* p = pts[j];
        const Found<A> r = search_point(p, rec, sph, tn, lb.data(), order.data(), T, F, tile);
        const int64_t i = n * M + index[j];
        a.face_index[i] = r.slot >= 0 ? r.face : -1;
        squared[i] = r.best;
        if (!values) continue;
        A bary[3] = {nan, nan, nan}, sd = nan;
        if (r.slot >= 0) face_values(p, rec[r.slot].a, rec[r.slot].b, rec[r.slot].c, bary, sd);
        if (bary_out != nullptr)
          for (int k = 0; k < 3; ++k) bary_out[i * 3 + k] = bary[k];
        if (signed_out != nullptr) signed_out[i] = sd;
        if (disp_out != nullptr) {
          A out[3] = {nan, nan, nan};
          if (r.slot >= 0) {
            A corner[3][3];
            for (int k = 0; k < 3; ++k) {
              const int32_t v = a.faces[static_cast<int64_t>(r.face) * 3 + k];
              for (int c = 0; c < 3; ++c)
                corner[k][c] = is_vertex(v, V) ? verts_canon[(n * V + v) * 3 + c] : nan;
            }
            field_value(p, bary, sd, corner[0], corner[1], corner[2], out);
          }
          for (int c = 0; c < 3; ++c) disp_out[(n * 3 + c) * M + index[j]] = out[c];
        }
      }
    }
  });
}

void check_dtype(Dtype dtype) {
  if (dtype != Dtype::kFloat32 && dtype != Dtype::kFloat64)
    throw std::invalid_argument("closest_triangles: the kernels compute in float32 or float64");
}

}  // namespace

void keys_cpu(const KeysArgs& args) {
  check_dtype(args.dtype);
  if (args.F == 0) return;
  if (args.dtype == Dtype::kFloat64) keys_impl<double>(args);
  else keys_impl<float>(args);
}

void prepare_cpu(const PrepareArgs& args, const ParallelFor& parallel_for) {
  check_dtype(args.dtype);
  if (args.N * args.F == 0) return;
  if (args.dtype == Dtype::kFloat64) prepare_impl<double>(args, parallel_for);
  else prepare_impl<float>(args, parallel_for);
}

void search_cpu(const SearchArgs& args, const ParallelFor& parallel_for) {
  check_dtype(args.dtype);
  if (args.N * args.M == 0 || args.F == 0) return;
  const bool grid = args.points == nullptr;
  if (args.dtype == Dtype::kFloat64) {
    if (grid) search_impl<double, true>(args, parallel_for);
    else search_impl<double, false>(args, parallel_for);
  } else {
    if (grid) search_impl<float, true>(args, parallel_for);
    else search_impl<float, false>(args, parallel_for);
  }
}

}  // namespace closest_triangles
}  // namespace head4d
