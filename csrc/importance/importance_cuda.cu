// CUDA kernel of importance sampling. The per-ray math is importance_math.h, the same
// functions the CPU kernel calls; this file owns the parallel layout and the memory.
//
// A warp takes 32 consecutive rays, whose weights are one contiguous block of memory:
//   1. the warp copies the block into shared memory, coalesced, one row of
//      `row_stride` (S - 1 rounded up to odd: no bank conflicts in step 2) values per
//      ray, widened to the accumulation type;
//   2. each lane turns its own ray's row into that ray's CDF with ray_cdf: the sequential
//      smoothing, sum and cumsum of the CPU kernel, in the same order (so both backends
//      give the same bits), 32 rays side by side;
//   3. the warp walks its rays one by one, the lanes splitting the ray's n fine samples
//      (coalesced reads of u, coalesced writes of the output): a binary search in the
//      ray's CDF row and an interpolation between two bin midpoints read from the depths.
// The rows live in shared memory, or in a global scratch buffer (one block of rows per
// warp) when even one warp's rows would not fit in 48 KB (S beyond ~380 in float32,
// ~190 in float64). A warp only synchronizes with itself (__syncwarp), so warps past
// the last ray simply return.

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../cuda_launch.cuh"
#include "../cuda_storage.cuh"
#include "importance.h"
#include "importance_math.h"

namespace head4d {
namespace importance {
namespace {

constexpr const char* kOp = "sample_importance";

constexpr int kWarpSize = 32;                 // also the rays per warp
constexpr int kMaxWarps = 4;                  // warps per block
constexpr size_t kSharedBytes = 48 * 1024;    // without opting in to more
constexpr unsigned kFullMask = 0xffffffffu;

// Values per ray row: S - 1, rounded up to odd.
int64_t row_stride_of(int64_t S) { return (S - 1) | 1; }

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * kWarpSize)
sample_kernel(const T* __restrict__ depths, const T* __restrict__ weights,
              const typename Storage<T>::acc* __restrict__ u, T* __restrict__ out,
              typename Storage<T>::acc* __restrict__ scratch, int64_t rays, int64_t S, int64_t n,
              int64_t u_stride, int64_t row_stride) {
  using A = typename Storage<T>::acc;
  HEAD4D_DYNAMIC_SHARED(unsigned char, shared_raw);
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const int64_t global_warp = static_cast<int64_t>(blockIdx.x) * warps + warp;
  const int64_t first = global_warp * kWarpSize;  // this warp's first ray
  if (first >= rays) return;                      // uniform across the warp
  const int count = rays - first < kWarpSize ? static_cast<int>(rays - first) : kWarpSize;
  const int64_t K = S - 3, W = S - 1;
  A* rows = scratch != nullptr ? scratch + global_warp * kWarpSize * row_stride
                               : reinterpret_cast<A*>(shared_raw) + static_cast<int64_t>(warp) * kWarpSize * row_stride;

  // 1. the weights of the warp's rays, one row per ray
  const T* w = weights + first * W;
  for (int rr = 0; rr < count; ++rr) {
    for (int64_t c = lane; c < W; c += kWarpSize) rows[rr * row_stride + c] = ld(w + rr * W + c);
  }
  __syncwarp();
  // 2. each lane: its ray's CDF
  int sorted = 0;
  if (lane < count) sorted = ray_cdf(rows + lane * row_stride, K) ? 1 : 0;
  __syncwarp();
  // 3. the rays one by one, the lanes splitting the samples
  for (int rr = 0; rr < count; ++rr) {
    const bool ray_sorted = __shfl_sync(kFullMask, sorted, rr) != 0;
    const int64_t r = first + rr;
    const A* cdf = rows + rr * row_stride;
    const T* z = depths + r * S;
    const A* ur = u + r * u_stride;
    T* o = out + r * n;
    for (int64_t j = lane; j < n; j += kWarpSize) {
      const A uj = __ldg(ur + j);
      int64_t below, above;
      locate(cdf, K, uj, ray_sorted, below, above);
      const A bin_below = bin_mid(ld(z + below), ld(z + below + 1));
      const A bin_above = bin_mid(ld(z + above), ld(z + above + 1));
      o[j] = Storage<T>::store(interpolate(uj, cdf[below], cdf[above], bin_below, bin_above));
    }
  }
}

// Bytes of one warp's rows.
size_t warp_bytes(int64_t S, size_t acc_size) {
  return static_cast<size_t>(kWarpSize) * static_cast<size_t>(row_stride_of(S)) * acc_size;
}

// Warps per block whose rows fit in shared memory; 0 when not even one warp's do.
int warps_per_block(int64_t S, size_t acc_size) {
  const size_t fit = kSharedBytes / warp_bytes(S, acc_size);
  return static_cast<int>(fit < static_cast<size_t>(kMaxWarps) ? fit : kMaxWarps);
}

size_t acc_size_of(Dtype dtype) { return dtype == Dtype::kFloat64 ? sizeof(double) : sizeof(float); }

int64_t warps_for(int64_t rays) { return (rays + kWarpSize - 1) / kWarpSize; }

template <typename T>
void launch(const Args& a, cudaStream_t stream) {
  using A = typename Storage<T>::acc;
  const int fit = warps_per_block(a.S, sizeof(A));
  const bool use_scratch = fit == 0;
  if (use_scratch && a.scratch == nullptr) {
    throw std::runtime_error("sample_importance: the CUDA kernel needs a scratch buffer for S = " +
                             std::to_string(a.S));
  }
  const int warps = use_scratch ? kMaxWarps : fit;
  const size_t shared = use_scratch ? 0 : static_cast<size_t>(warps) * warp_bytes(a.S, sizeof(A));
  const int64_t blocks = (warps_for(a.rays) + warps - 1) / warps;
  HEAD4D_LAUNCH(checked_grid(blocks, kOp), warps * kWarpSize, shared, stream, sample_kernel<T>)(
      static_cast<const T*>(a.depths), static_cast<const T*>(a.weights), static_cast<const A*>(a.u),
      static_cast<T*>(a.out), use_scratch ? static_cast<A*>(a.scratch) : nullptr, a.rays, a.S, a.n,
      a.u_ray_stride, row_stride_of(a.S));
  check_launch(kOp, "sample");
}

}  // namespace

int64_t cuda_scratch_elements(const Args& args) {
  if (args.S < 4 || warps_per_block(args.S, acc_size_of(args.dtype)) > 0) return 0;
  return warps_for(args.rays) * kWarpSize * row_stride_of(args.S);
}

void sample_cuda(const Args& args, void* stream) {
  if (args.rays == 0 || args.n == 0) return;
  if (args.S < 4) throw std::invalid_argument("sample_importance: needs S >= 4 samples per ray");
  with_storage_type(args.dtype, kOp, [&](auto tag) { launch<decltype(tag)>(args, static_cast<cudaStream_t>(stream)); });
}

}  // namespace importance
}  // namespace head4d
