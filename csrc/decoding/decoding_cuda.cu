// CUDA kernels of the fused triplane decoder. The per-point math is decoding_math.h
// (the MLP) and triplanes_math.h (the bilinear stencils), the functions the CPU
// kernels call; this file owns the memory traffic.
//
// One thread per point, a grid-stride loop over the points with as many blocks as are
// resident at once, so each block stages the packed weights (decoding_math.h; 17 KB
// for C 32, Hd 64, O 33 in fp32) into shared memory once. The per-point arrays (mean
// feature, outputs, their gradients) have compile-time sizes and live in registers;
// the MLP streams over the hidden units, reading each weight row with 16-byte shared
// loads that the whole warp shares (every thread is at the same hidden unit).
//
// Planes are channels-last [N, 3, H, W, Cs] with the channel stride Cs a multiple of
// 16 bytes (the host pads C when needed) and a 16-byte aligned base, so every texel
// read is a run of 16-byte loads.
//
// Forward: gather the 12 texels, mean, MLP, write rgb and sigma. Nothing else.
// Backward: recompute the features and the MLP, backpropagate (the hidden layer is
// recomputed a second time rather than kept), then
//  - grad_points: dot products of dL/df with the texels (no atomics);
//  - grad_planes: atomics into a float32 (float64) channels-last buffer, 16-byte vector
//    atomics on sm_90, as sample_triplanes' backward does;
//  - the weight gradients: the per-point vectors f, h, dL/dz and dL/do of a chunk of
//    points are written feature-major to small buffers (coalesced: consecutive threads,
//    consecutive points), and the host sums them over points with matrix products.
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "decoding_kernels.cuh"

namespace head4d {
namespace decoding {
namespace kernels {

unsigned int grid_for(const void* kernel, int64_t work, size_t shared_bytes, const std::function<int()>& resident) {
  // The multiprocessor count and the occupancy are host work of a few microseconds per
  // query: cached per device, kernel and shared-memory size.
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, size_t>, int64_t> cache;
  int device = 0;
  check_cuda(cudaGetDevice(&device), kOp, "cudaGetDevice");
  const auto key = std::make_tuple(device, kernel, shared_bytes);
  int64_t resident_total = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) resident_total = it->second;
  }
  if (resident_total == 0) {
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), kOp, "cudaDeviceGetAttribute");
    const int per_sm = resident();
    if (per_sm < 1)
      throw std::runtime_error("decode_triplanes: the weights (" + std::to_string(shared_bytes) +
                               " bytes) do not fit in this GPU's shared memory");
    resident_total = static_cast<int64_t>(sms) * per_sm;
    std::lock_guard<std::mutex> lock(mutex);
    cache[key] = resident_total;
  }
  const int64_t needed = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(needed < resident_total ? needed : resident_total);
}

// Compiled in decoding_cuda_<dtype>.cu.
HEAD4D_DECODING_INSTANTIATE(extern, float)
HEAD4D_DECODING_INSTANTIATE_GENERAL(extern, double)
HEAD4D_DECODING_INSTANTIATE(extern, __half)
HEAD4D_DECODING_INSTANTIATE(extern, __nv_bfloat16)

}  // namespace kernels

namespace {

using kernels::kOp;

// Picks the compiled bounds: (32, 36) when they hold and are compiled for T, else the
// general (64, 64).
template <typename T, typename Fn>
void with_bounds(int64_t Cs, int64_t O, Fn&& fn) {
  if constexpr (kernels::kHasSmallBounds<T>) {
    if (Cs <= 32 && O <= 36) return fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 36>{});
  }
  return fn(std::integral_constant<int, kMaxFeatures>{}, std::integral_constant<int, kMaxOutputs>{});
}

void check_sizes(int64_t C, int64_t hidden, int64_t outputs) {
  if (C < 1 || C > kMaxFeatures || hidden < 1 || hidden > kMaxHidden || outputs < 1 || outputs > kMaxOutputs)
    throw std::invalid_argument("decode_triplanes: unsupported sizes");
}

}  // namespace

void forward_cuda(const ForwardArgs& args, void* stream) {
  check_sizes(args.C, args.hidden, args.outputs);
  if (args.N * args.M == 0) return;
  with_storage_type(args.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    const int Cs = static_cast<int>(cuda_channel_stride(args.C, args.dtype));
    with_bounds<T>(Cs, args.outputs, [&](auto kc, auto ko) {
      kernels::launch_forward<T, decltype(kc)::value, decltype(ko)::value>(args, Cs, static_cast<cudaStream_t>(stream));
    });
  });
}

void backward_cuda(const BackwardArgs& args, const ChunkBuffers& chunk, int64_t begin, int64_t end, void* stream) {
  check_sizes(args.C, args.hidden, args.outputs);
  if (end <= begin) return;
  with_storage_type(args.dtype, kOp, [&](auto tag) {
    using T = decltype(tag);
    const int Cs = static_cast<int>(cuda_channel_stride(args.C, args.dtype));
    with_bounds<T>(Cs, args.outputs, [&](auto kc, auto ko) {
      kernels::launch_backward<T, decltype(kc)::value, decltype(ko)::value>(args, chunk, Cs, begin, end,
                                                                      static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace decoding
}  // namespace head4d
