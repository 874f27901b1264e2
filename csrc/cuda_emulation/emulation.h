// head4d's CUDA execution model on the CPU: the part of CUDA C++ that head4d's kernels
// use, so that every *_cuda.cu file compiles a second time as host C++ and its kernels
// run, host launchers included, on CPU tensors (the `cuda_emulated` test backend).
//
// What is emulated:
//  - grid and block indices, blockDim / gridDim, launches with dynamic shared memory and
//    the launch limits (1024 threads per block, 48 KB of dynamic shared memory unless a
//    kernel opted in with cudaFuncSetAttribute, up to 227 KB); a bad configuration
//    fails the launch as on a GPU;
//  - the threads of a block as fibers (ucontext) on one CPU thread, switched at every
//    __syncthreads, __syncwarp, shuffle and vote: a thread runs until it reaches one,
//    then the next thread runs. A missing barrier therefore lets one thread read what
//    the others have not written yet, and gives a wrong answer instead of passing by
//    luck. The order in which threads run between two barriers is shuffled per block
//    and per phase by default (HEAD4D_EMULATION_ORDER=shuffle|forward|reverse,
//    HEAD4D_EMULATION_SEED), which flushes out order dependence;
//  - __shared__ memory, per block (`static thread_local`: one block runs at a time on
//    each CPU thread); dynamic shared memory is filled with 0xff bytes (NaN for
//    floats) before each block;
//  - warp shuffles (__shfl_sync, _xor_, _down_, _up_), votes (__ballot_sync, __any_sync,
//    __all_sync) and __syncwarp across the 32 lanes of a warp: a lane named in the mask
//    that has exited, or that waits at another operation, is reported as an error;
//    __syncthreads where some threads wait at a warp operation is a deadlock, reported;
//  - atomics (add, min, max, exchange, compare-and-swap; float4 adds as on sm_90) as
//    real atomic operations: blocks run in parallel on the host's threads;
//  - __half / __nv_bfloat16 with round-to-nearest-even conversions, vector types,
//    __ldg, and the bit-cast and rounding intrinsics the kernels use.
// Out-of-bounds accesses are found by building the emulated module with AddressSanitizer
// (setup.py does): the fibers tell ASan when they switch stacks.
//
// What it cannot see: the memory model (every write is visible at once, no caches, no
// reordering), timing, occupancy, register limits and spills, bank conflicts, and races
// that need true simultaneity (two threads of a block never run at the same instant;
// blocks do, but unsynchronized non-atomic accesses to one address across blocks are not
// detected). The device-only branches of __CUDA_ARCH__ code are not compiled here (the
// host branches are, so the math is the CPU kernels'). Those stay the real GPU's tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------
// keywords
// ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local

// ---------------------------------------------------------------------------------
// vector types
// ---------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
struct __align__(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(16) double2 { double x, y; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned int x, y; };
struct __align__(16) uint4 { unsigned int x, y, z, w; };

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

// ---------------------------------------------------------------------------------
// half precision storage types (conversions round to nearest even, as the device's)
// ---------------------------------------------------------------------------------
struct __align__(2) __half { uint16_t bits; };
struct __align__(2) __nv_bfloat16 { uint16_t bits; };

namespace head4d {
namespace emu {
uint16_t half_bits_from_float(float value);
float float_from_half_bits(uint16_t bits);
uint16_t bfloat16_bits_from_float(float value);
inline float float_from_bfloat16_bits(uint16_t bits) {
  const uint32_t f = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &f, sizeof(out));
  return out;
}
}  // namespace emu
}  // namespace head4d

inline float __half2float(__half h) { return head4d::emu::float_from_half_bits(h.bits); }
inline __half __float2half_rn(float f) { return __half{head4d::emu::half_bits_from_float(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return head4d::emu::float_from_bfloat16_bits(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{head4d::emu::bfloat16_bits_from_float(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---------------------------------------------------------------------------------
// the runtime API the launchers use
// ---------------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace head4d {
namespace emu {

// The emulated device: an H100's limits, with few multiprocessors (grids sized to
// "every block resident" stay small on the CPU).
constexpr int kMultiProcessors = 4;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxThreadsPerMultiProcessor = 2048;
constexpr int kMaxBlocksPerMultiProcessor = 32;
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kOptInSharedBytes = 227 * 1024;
constexpr size_t kSharedBytesPerMultiProcessor = 228 * 1024;
constexpr int kWarpSize = 32;

cudaError_t last_error(bool clear);
const char* error_string(cudaError_t err);
cudaError_t set_function_shared_limit(const void* kernel, int bytes);
cudaError_t occupancy(int* blocks, const void* kernel, int block_size, size_t shared_bytes);

// The calling thread's coordinates (valid inside a kernel).
const uint3& thread_index();
struct BlockCoords {
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
const BlockCoords& block_coords();
unsigned char* dynamic_shared();

// Synchronization points (each one switches to another thread of the block).
void sync_block();
void sync_warp(unsigned mask);
// Every lane in `mask` deposits `bytes` bytes of `value` and names a source lane; each
// gets the source lane's value in `out` (a shuffle). A source outside the mask is an error.
void warp_exchange(unsigned mask, const void* value, size_t bytes, int src_lane, void* out);
// The mask of the lanes in `mask` whose predicate is true (a ballot).
unsigned warp_ballot(unsigned mask, bool predicate);
int lane_id();

// Runs body() once per thread of the grid. Sets the last error and returns on a bad
// configuration or when a thread faults (deadlock, misuse of a warp operation).
void launch_grid(dim3 grid, dim3 block, size_t shared_bytes, const void* kernel, const std::function<void()>& body);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Each thread gets its own copies of the parameters, as on the device.
    const std::tuple<std::decay_t<P>...> packed(static_cast<std::decay_t<P>>(std::forward<Args>(args))...);
    void (*k)(P...) = kernel;
    launch_grid(grid, block, shared_bytes, reinterpret_cast<const void*>(k), [&packed, k]() {
      std::tuple<std::decay_t<P>...> mine = packed;
      std::apply(k, mine);
    });
  }
};

template <typename... P>
Launch<P...> launcher(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{kernel, grid, block, shared_bytes};
}

template <typename T>
T atomic_add_float(T* address, T value) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* word = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(word, __ATOMIC_RELAXED);
  for (;;) {
    T old;
    std::memcpy(&old, &expected, sizeof(T));
    const T updated = old + value;
    Bits desired;
    std::memcpy(&desired, &updated, sizeof(T));
    if (__atomic_compare_exchange_n(word, &expected, desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old;
  }
}

}  // namespace emu
}  // namespace head4d

inline cudaError_t cudaGetLastError() { return head4d::emu::last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return head4d::emu::last_error(false); }
inline const char* cudaGetErrorString(cudaError_t err) { return head4d::emu::error_string(err); }
inline cudaError_t cudaDeviceSynchronize() { return head4d::emu::last_error(false); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return head4d::emu::last_error(false); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = head4d::emu::kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(head4d::emu::kDefaultSharedBytes); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = head4d::emu::kMultiProcessors; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(head4d::emu::kOptInSharedBytes); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return head4d::emu::set_function_shared_limit(reinterpret_cast<const void*>(kernel), value);
}
template <typename... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P...), int block_size,
                                                          size_t shared_bytes) {
  return head4d::emu::occupancy(blocks, reinterpret_cast<const void*>(kernel), block_size, shared_bytes);
}

// ---------------------------------------------------------------------------------
// built-in variables and synchronization
// ---------------------------------------------------------------------------------
#define threadIdx (::head4d::emu::thread_index())
#define blockIdx (::head4d::emu::block_coords().block_idx)
#define blockDim (::head4d::emu::block_coords().block_dim)
#define gridDim (::head4d::emu::block_coords().grid_dim)
constexpr int warpSize = head4d::emu::kWarpSize;

inline void __syncthreads() { head4d::emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { head4d::emu::sync_warp(mask); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  static_assert(sizeof(T) <= 16, "shuffles of types wider than 16 bytes are not emulated");
  const int lane = head4d::emu::lane_id();
  const int base = lane & ~(width - 1);
  T out;
  head4d::emu::warp_exchange(mask, &value, sizeof(T), base + (src_lane & (width - 1)), &out);
  return out;
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  const int lane = head4d::emu::lane_id();
  const int base = lane & ~(width - 1);
  const int src = lane ^ lane_mask;
  T out;
  head4d::emu::warp_exchange(mask, &value, sizeof(T), src < base + width ? src : lane, &out);
  return out;
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  const int lane = head4d::emu::lane_id();
  const int within = lane & (width - 1);
  T out;
  head4d::emu::warp_exchange(mask, &value, sizeof(T), within + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane,
                             &out);
  return out;
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  const int lane = head4d::emu::lane_id();
  const int within = lane & (width - 1);
  T out;
  head4d::emu::warp_exchange(mask, &value, sizeof(T), within >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane,
                             &out);
  return out;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) { return head4d::emu::warp_ballot(mask, predicate != 0); }
inline int __any_sync(unsigned mask, int predicate) { return head4d::emu::warp_ballot(mask, predicate != 0) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return head4d::emu::warp_ballot(mask, predicate != 0) == head4d::emu::warp_ballot(mask, true);
}

// ---------------------------------------------------------------------------------
// atomics
// ---------------------------------------------------------------------------------
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* a, float v) { return head4d::emu::atomic_add_float(a, v); }
inline double atomicAdd(double* a, double v) { return head4d::emu::atomic_add_float(a, v); }
// sm_90's vector atomic: each component an atomic add of its own.
inline float4 atomicAdd(float4* a, float4 v) {
  float* f = reinterpret_cast<float*>(a);
  return float4{atomicAdd(f, v.x), atomicAdd(f + 1, v.y), atomicAdd(f + 2, v.z), atomicAdd(f + 3, v.w)};
}
inline float2 atomicAdd(float2* a, float2 v) {
  float* f = reinterpret_cast<float*>(a);
  return float2{atomicAdd(f, v.x), atomicAdd(f + 1, v.y)};
}
template <typename T>
T atomicMax(T* a, T v) {
  static_assert(std::is_integral<T>::value, "atomicMax: integer types only");
  T old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* a, T v) {
  static_assert(std::is_integral<T>::value, "atomicMin: integer types only");
  T old = __atomic_load_n(a, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicExch(T* a, T v) {
  return __atomic_exchange_n(a, v, __ATOMIC_RELAXED);
}
template <typename T>
T atomicCAS(T* a, T compare, T v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}

// ---------------------------------------------------------------------------------
// loads and intrinsics
// ---------------------------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline unsigned int __float_as_uint(float x) {
  unsigned int u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline int __float_as_int(float x) {
  int u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __int_as_float(int u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
namespace head4d {
namespace emu {
float double_to_float_down(double x);
float double_to_float_up(double x);
}  // namespace emu
}  // namespace head4d
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline float __double2float_rd(double x) { return head4d::emu::double_to_float_down(x); }
inline float __double2float_ru(double x) { return head4d::emu::double_to_float_up(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
