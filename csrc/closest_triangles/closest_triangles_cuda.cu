// CUDA kernels of the closest-triangle search. The per-(point, triangle) math is
// closest_triangles_math.h, the same functions the CPU kernels call; this file owns the memory
// traffic and the block-level culling.
//
// keys:    one block; the box of the face centroids, then a Morton key per face.
// prepare: one block of kTileCuda threads per (batch element, tile): a thread per face
//          writes its TriRecord and Sphere, the block reduces the tile's bounding box.
// search:  one thread per query point, kThreads points per block (a 8 x 4 x 4 brick of
//          grid points, or consecutive points). The block
//          1. reduces its points' bounding box,
//          2. computes every tile's lower bound to it (shared memory) and ranks the
//             tiles by it (a counting rank, O(T^2 / kThreads) per thread),
//          3. walks the tiles in that order: stops when the next tile's bound exceeds
//             the largest reach of its points (every later tile is farther still);
//             otherwise stages the tile's records and spheres in shared memory
//             (coalesced 16-byte copies), and each thread scans them: a per-point box
//             test for the tile, a sphere test per face into a 64-bit candidate mask,
//             then the exact distance for its candidates (a warp diverges only over
//             its threads' own candidates); then the block's largest reach (a shared atomicMax on
//             the bits of a non-negative float) for the next bound test.
//          With more than kMaxSortedTiles tiles the tiles go in index order, each
//          tested against the block's reach, without the early stop.
// The skips are exact (closest_triangles_math.h): the result is the brute force's, ties included.

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "../cuda_launch.cuh"
#include "closest_triangles.h"
#include "closest_triangles_math.h"

namespace head4d {
namespace closest_triangles {
namespace {

constexpr const char* kOp = "closest_triangles";

constexpr int kThreads = 128;         // search: points per block (8 x 4 x 4 on a grid)
constexpr int kKeysThreads = 1024;    // keys: one block
constexpr int kMaxSortedTiles = 2048;  // search: tiles ranked in shared memory (16 KB)
static_assert(kTileCuda <= 64, "the search's candidate mask has 64 bits");

__device__ __forceinline__ float minv(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double minv(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float maxv(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double maxv(double a, double b) { return fmax(a, b); }

// A float no larger / no smaller than x (NaN stays NaN).
__device__ __forceinline__ float float_down(float x) { return x; }
__device__ __forceinline__ float float_down(double x) { return __double2float_rd(x); }
__device__ __forceinline__ float float_up(float x) { return x; }
__device__ __forceinline__ float float_up(double x) { return __double2float_ru(x); }

template <typename A>
__device__ __forceinline__ A warp_min(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = minv(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = maxv(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---------------------------------------------------------------------------------
// keys
// ---------------------------------------------------------------------------------

template <typename A>
__global__ void __launch_bounds__(kKeysThreads)
    keys_kernel(const A* __restrict__ verts, const int32_t* __restrict__ faces, int64_t* __restrict__ keys,
                int64_t V, int64_t F) {
  __shared__ float s_lo[3][kKeysThreads / 32], s_hi[3][kKeysThreads / 32];
  __shared__ float s_box[2][3];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float lo[3] = {INFINITY, INFINITY, INFINITY}, hi[3] = {-INFINITY, -INFINITY, -INFINITY};
  for (int64_t f = tid; f < F; f += kKeysThreads) {
    float c[3];
    if (!centroid(verts, faces, f, V, c)) continue;
    for (int i = 0; i < 3; ++i) {
      lo[i] = fminf(lo[i], c[i]);
      hi[i] = fmaxf(hi[i], c[i]);
    }
  }
  for (int i = 0; i < 3; ++i) {
    const float l = warp_min(lo[i]), h = warp_max(hi[i]);
    if (lane == 0) {
      s_lo[i][warp] = l;
      s_hi[i][warp] = h;
    }
  }
  __syncthreads();
  if (tid < 3) {
    float l = INFINITY, h = -INFINITY;
    for (int w = 0; w < kKeysThreads / 32; ++w) {
      l = fminf(l, s_lo[tid][w]);
      h = fmaxf(h, s_hi[tid][w]);
    }
    s_box[0][tid] = l;
    s_box[1][tid] = h;
  }
  __syncthreads();
  float box_lo[3], inv[3];
  for (int i = 0; i < 3; ++i) {
    box_lo[i] = s_box[0][i];
    inv[i] = s_box[1][i] > s_box[0][i] ? 1.0f / (s_box[1][i] - s_box[0][i]) : 0.0f;
  }
  for (int64_t f = tid; f < F; f += kKeysThreads) {
    float c[3];
    const uint32_t code = centroid(verts, faces, f, V, c) ? morton_code(c, box_lo, inv) : 0u;
    keys[f] = (static_cast<int64_t>(code) << 32) | f;
  }
}

// ---------------------------------------------------------------------------------
// prepare
// ---------------------------------------------------------------------------------

template <typename A>
__global__ void __launch_bounds__(kTileCuda)
    prepare_kernel(const A* __restrict__ verts, const int32_t* __restrict__ faces, const int32_t* __restrict__ order,
                   TriRecord<A>* __restrict__ records, Sphere<A>* __restrict__ spheres,
                   TileBox<A>* __restrict__ tiles, int64_t V, int64_t F, int64_t T) {
  __shared__ A s_lo[3][kTileCuda], s_hi[3][kTileCuda];
  __shared__ int s_bad[kTileCuda];
  const int64_t n = blockIdx.x / T, t = blockIdx.x % T;
  const int j = threadIdx.x;
  const int64_t s = t * kTileCuda + j;
  const A* vn = verts + n * V * 3;
  A lo[3] = {A(INFINITY), A(INFINITY), A(INFINITY)}, hi[3] = {-A(INFINITY), -A(INFINITY), -A(INFINITY)};
  int bad = 0;
  if (s < F) {
    const int32_t f = order[s];
    int32_t idx[3];
    A corner[3][3];
    for (int k = 0; k < 3; ++k) {
      idx[k] = faces[static_cast<int64_t>(f) * 3 + k];
      for (int i = 0; i < 3; ++i) corner[k][i] = is_vertex(idx[k], V) ? vn[static_cast<int64_t>(idx[k]) * 3 + i] : A(NAN);
      if (!finite3(corner[k])) bad = 1;
      for (int i = 0; i < 3; ++i) {
        lo[i] = minv(lo[i], corner[k][i]);
        hi[i] = maxv(hi[i], corner[k][i]);
      }
    }
    TriRecord<A> rec;
    Sphere<A> sph;
    make_record(corner[0], corner[1], corner[2], idx[0], idx[1], idx[2], f, rec, sph);
    records[n * F + s] = rec;
    spheres[n * F + s] = sph;
  }
  for (int i = 0; i < 3; ++i) {
    s_lo[i][j] = lo[i];
    s_hi[i][j] = hi[i];
  }
  s_bad[j] = bad;
  __syncthreads();
  for (int stride = kTileCuda / 2; stride > 0; stride >>= 1) {
    if (j < stride) {
      for (int i = 0; i < 3; ++i) {
        s_lo[i][j] = minv(s_lo[i][j], s_lo[i][j + stride]);
        s_hi[i][j] = maxv(s_hi[i][j], s_hi[i][j + stride]);
      }
      s_bad[j] |= s_bad[j + stride];
    }
    __syncthreads();
  }
  if (j == 0) {
    TileBox<A> box;
    A diag2 = A(0);
    for (int i = 0; i < 3; ++i) {
      box.lo[i] = s_bad[0] ? -A(INFINITY) : s_lo[i][0];
      box.hi[i] = s_bad[0] ? A(INFINITY) : s_hi[i][0];
      const A d = box.hi[i] - box.lo[i];
      diag2 += d * d;
    }
    box.slack = sqrt(diag2) * A(kSlack);
    box.pad = A(0);
    tiles[blockIdx.x] = box;
  }
}

// ---------------------------------------------------------------------------------
// search
// ---------------------------------------------------------------------------------

template <typename A>
struct SearchParams {
  const A* points;
  const A* grid;
  const TriRecord<A>* records;
  const Sphere<A>* spheres;
  const TileBox<A>* tiles;
  const A* verts_canon;
  const int32_t* faces;
  int64_t* face_index;
  A* squared;
  A* barycentric;
  A* signed_distance;
  A* displacement;
  int64_t M, R, V, F, T;
  int64_t per_item;  // blocks per batch element
  int64_t nb_w, nb_h;  // grid: bricks along W and H
};

// A block-wide copy of `words` 16-byte words.
__device__ __forceinline__ void copy16(void* dst, const void* src, int words) {
  int4* d = static_cast<int4*>(dst);
  const int4* s = static_cast<const int4*>(src);
  for (int w = threadIdx.x; w < words; w += kThreads) d[w] = s[w];
}

template <typename A, bool kGrid>
__global__ void __launch_bounds__(kThreads) search_kernel(const SearchParams<A> P) {
  HEAD4D_DYNAMIC_SHARED(float, s_dyn);  // ranked mode: lb [T] floats, then order [T] ints
  __shared__ TriRecord<A> s_rec[kTileCuda];
  __shared__ Sphere<A> s_sph[kTileCuda];
  __shared__ TileBox<A> s_tile;
  __shared__ A s_wlo[kThreads / 32][3], s_whi[kThreads / 32][3];
  __shared__ A s_blo[3], s_bhi[3];
  __shared__ unsigned int s_reach[2];

  const int tid = threadIdx.x;
  const int64_t n = blockIdx.x / P.per_item, local = blockIdx.x % P.per_item;
  const int64_t M = P.M, F = P.F, T = P.T;

  // this thread's point
  int64_t m;
  bool active;
  A p[3];
  if (kGrid) {
    const int64_t R = P.R;
    const int64_t bw = local % P.nb_w, bh = (local / P.nb_w) % P.nb_h, bd = local / (P.nb_w * P.nb_h);
    const int64_t w = bw * 8 + (tid & 7), h = bh * 4 + ((tid >> 3) & 3), d = bd * 4 + (tid >> 5);
    active = w < R && h < R && d < R;
    m = (d * R + h) * R + w;
    if (active) {
      p[0] = P.grid[w];
      p[1] = P.grid[h];
      p[2] = P.grid[d];
    }
  } else {
    m = local * kThreads + tid;
    active = m < M;
    if (active) {
      const A* q = P.points + (n * M + m) * 3;
      p[0] = q[0];
      p[1] = q[1];
      p[2] = q[2];
    }
  }
  if (!active) p[0] = p[1] = p[2] = A(0);  // never used for bounds

  // 1. the block's box (fmin / fmax leave NaN coordinates out: such a point's NaN
  //    reach keeps every tile in play)
  {
    const int lane = tid & 31, warp = tid >> 5;
    for (int i = 0; i < 3; ++i) {
      const A l = warp_min(active ? p[i] : A(INFINITY));
      const A h = warp_max(active ? p[i] : -A(INFINITY));
      if (lane == 0) {
        s_wlo[warp][i] = l;
        s_whi[warp][i] = h;
      }
    }
    __syncthreads();
    if (tid < 3) {
      A l = A(INFINITY), h = -A(INFINITY);
      for (int w = 0; w < kThreads / 32; ++w) {
        l = minv(l, s_wlo[w][tid]);
        h = maxv(h, s_whi[w][tid]);
      }
      s_blo[tid] = l;
      s_bhi[tid] = h;
    }
    __syncthreads();
  }
  A blo[3], bhi[3];
  for (int i = 0; i < 3; ++i) {
    blo[i] = s_blo[i];
    bhi[i] = s_bhi[i];
  }
  const TileBox<A>* tiles = P.tiles + n * T;

  // 2. the tiles' bounds, ranked
  const bool ranked = T <= kMaxSortedTiles;
  float* s_lb = s_dyn;
  int32_t* s_order = reinterpret_cast<int32_t*>(s_dyn + (ranked ? T : 0));
  if (ranked) {
    for (int64_t t = tid; t < T; t += kThreads) {
      const A b = box_lower_bound(blo, bhi, tiles[t]);
      s_lb[t] = is_nan(b) ? -INFINITY : float_down(b);
    }
    __syncthreads();
    for (int64_t t = tid; t < T; t += kThreads) {
      const float v = s_lb[t];
      int32_t rank = 0;
      for (int64_t u = 0; u < T; ++u) {
        const float x = s_lb[u];
        rank += (x < v || (x == v && u < t)) ? 1 : 0;
      }
      s_order[rank] = static_cast<int32_t>(t);
    }
    __syncthreads();
  }

  // 3. the walk
  A best = A(INFINITY), reach = A(INFINITY), reach_s = A(INFINITY);
  int32_t best_face = 0x7fffffff;
  int64_t best_slot = -1;
  float block_reach = INFINITY;
  int processed = 0;
  const TriRecord<A>* rec_n = P.records + n * F;
  const Sphere<A>* sph_n = P.spheres + n * F;
  for (int64_t k = 0; k < T; ++k) {
    int64_t t;
    float bound;
    if (ranked) {
      t = s_order[k];
      bound = s_lb[t];
    } else {
      t = k;
      const A b = box_lower_bound(blo, bhi, tiles[t]);
      bound = is_nan(b) ? -INFINITY : float_down(b);
    }
    if (bound > block_reach) {  // the same in every thread: uniform
      if (ranked) break;
      continue;
    }
    const int64_t s0 = t * kTileCuda;
    const int count = static_cast<int>(F - s0 < kTileCuda ? F - s0 : kTileCuda);
    const int slot = processed & 1;
    if (tid == 0) {
      s_reach[slot] = 0u;
      s_tile = tiles[t];
    }
    copy16(s_rec, rec_n + s0, static_cast<int>(count * sizeof(TriRecord<A>) / 16));
    copy16(s_sph, sph_n + s0, static_cast<int>(count * sizeof(Sphere<A>) / 16));
    __syncthreads();
    if (active && !(box_lower_bound(p, p, s_tile) > reach)) {
      // the sphere tests first (uniform code), then this thread's candidates alone: a
      // warp pays for the most candidates of one thread, not for their union
      unsigned long long mask = 0ull;
#pragma unroll 8
      for (int j = 0; j < count; ++j)
        if (!sphere_excludes(p, s_sph[j], reach_s)) mask |= 1ull << j;
      while (mask != 0ull) {
        const int j = __ffsll(static_cast<long long>(mask)) - 1;
        mask &= mask - 1ull;
        if (sphere_excludes(p, s_sph[j], reach_s)) continue;  // the reach may have shrunk since
        const A d = pair_sq_dist(p, s_rec[j]);
        const int32_t f = s_rec[j].face;
        if (better(d, f, best, best_face)) {
          best = d;
          best_face = f;
          best_slot = s0 + j;
          reach = reach_of(d);
          reach_s = sphere_reach(d);
        }
      }
    }
    if (active) atomicMax(&s_reach[slot], __float_as_uint(float_up(reach)));
    __syncthreads();
    block_reach = __uint_as_float(s_reach[slot]);
    ++processed;
  }

  if (!active) return;
  const int64_t i = n * M + m;
  P.face_index[i] = best_slot >= 0 ? best_face : -1;
  P.squared[i] = best;
  if (P.barycentric == nullptr && P.signed_distance == nullptr && P.displacement == nullptr) return;
  A bary[3] = {A(NAN), A(NAN), A(NAN)}, sd = A(NAN);
  if (best_slot >= 0) {
    const TriRecord<A>& r = rec_n[best_slot];
    face_values(p, r.a, r.b, r.c, bary, sd);
  }
  if (P.barycentric != nullptr)
    for (int k = 0; k < 3; ++k) P.barycentric[i * 3 + k] = bary[k];
  if (P.signed_distance != nullptr) P.signed_distance[i] = sd;
  if (P.displacement != nullptr) {
    A out[3] = {A(NAN), A(NAN), A(NAN)};
    if (best_slot >= 0) {
      A corner[3][3];
      for (int k = 0; k < 3; ++k) {
        const int32_t v = P.faces[static_cast<int64_t>(best_face) * 3 + k];
        for (int c = 0; c < 3; ++c)
          corner[k][c] = is_vertex(v, P.V) ? P.verts_canon[(n * P.V + v) * 3 + c] : A(NAN);
      }
      field_value(p, bary, sd, corner[0], corner[1], corner[2], out);
    }
    for (int c = 0; c < 3; ++c) P.displacement[(n * 3 + c) * M + m] = out[c];
  }
}

// ---------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------

void check_dtype(Dtype dtype) {
  if (dtype != Dtype::kFloat32 && dtype != Dtype::kFloat64)
    throw std::invalid_argument("closest_triangles: the kernels compute in float32 or float64");
}

template <typename A>
void launch_search(const SearchArgs& a, cudaStream_t stream) {
  SearchParams<A> P;
  P.points = static_cast<const A*>(a.points);
  P.grid = static_cast<const A*>(a.grid);
  P.records = static_cast<const TriRecord<A>*>(a.records);
  P.spheres = static_cast<const Sphere<A>*>(a.spheres);
  P.tiles = static_cast<const TileBox<A>*>(a.tiles);
  P.verts_canon = static_cast<const A*>(a.verts_canon);
  P.faces = a.faces;
  P.face_index = a.face_index;
  P.squared = static_cast<A*>(a.squared);
  P.barycentric = static_cast<A*>(a.barycentric);
  P.signed_distance = static_cast<A*>(a.signed_distance);
  P.displacement = static_cast<A*>(a.displacement);
  P.M = a.M;
  P.R = a.R;
  P.V = a.V;
  P.F = a.F;
  P.T = a.T;
  const size_t shared = a.T <= kMaxSortedTiles ? static_cast<size_t>(a.T) * (sizeof(float) + sizeof(int32_t)) : 0;
  if (a.points == nullptr) {
    P.nb_w = (a.R + 7) / 8;
    P.nb_h = (a.R + 3) / 4;
    P.per_item = P.nb_w * P.nb_h * ((a.R + 3) / 4);
    HEAD4D_LAUNCH(checked_grid(a.N * P.per_item, kOp), kThreads, shared, stream, search_kernel<A, true>)(P);
  } else {
    P.nb_w = P.nb_h = 0;
    P.per_item = (a.M + kThreads - 1) / kThreads;
    HEAD4D_LAUNCH(checked_grid(a.N * P.per_item, kOp), kThreads, shared, stream, search_kernel<A, false>)(P);
  }
  check_launch(kOp, "search");
}

}  // namespace

void keys_cuda(const KeysArgs& args, void* stream) {
  check_dtype(args.dtype);
  if (args.F == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (args.dtype == Dtype::kFloat64)
    HEAD4D_LAUNCH(1, kKeysThreads, 0, s, keys_kernel<double>)(static_cast<const double*>(args.verts), args.faces, args.keys,
                                                   args.V, args.F);
  else
    HEAD4D_LAUNCH(1, kKeysThreads, 0, s, keys_kernel<float>)(static_cast<const float*>(args.verts), args.faces, args.keys,
                                                  args.V, args.F);
  check_launch(kOp, "keys");
}

void prepare_cuda(const PrepareArgs& args, void* stream) {
  check_dtype(args.dtype);
  if (args.tile != kTileCuda) throw std::invalid_argument("closest_triangles: the CUDA tiles hold kTileCuda faces");
  if (args.N * args.F == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned int blocks = checked_grid(args.N * args.T, kOp);
  if (args.dtype == Dtype::kFloat64)
    HEAD4D_LAUNCH(blocks, kTileCuda, 0, s, prepare_kernel<double>)(
        static_cast<const double*>(args.verts), args.faces, args.order, static_cast<TriRecord<double>*>(args.records),
        static_cast<Sphere<double>*>(args.spheres), static_cast<TileBox<double>*>(args.tiles), args.V, args.F,
        args.T);
  else
    HEAD4D_LAUNCH(blocks, kTileCuda, 0, s, prepare_kernel<float>)(
        static_cast<const float*>(args.verts), args.faces, args.order, static_cast<TriRecord<float>*>(args.records),
        static_cast<Sphere<float>*>(args.spheres), static_cast<TileBox<float>*>(args.tiles), args.V, args.F, args.T);
  check_launch(kOp, "prepare");
}

void search_cuda(const SearchArgs& args, void* stream) {
  check_dtype(args.dtype);
  if (args.tile != kTileCuda) throw std::invalid_argument("closest_triangles: the CUDA tiles hold kTileCuda faces");
  if (args.N * args.M == 0 || args.F == 0) return;
  if (args.dtype == Dtype::kFloat64) launch_search<double>(args, static_cast<cudaStream_t>(stream));
  else launch_search<float>(args, static_cast<cudaStream_t>(stream));
}

}  // namespace closest_triangles
}  // namespace head4d
