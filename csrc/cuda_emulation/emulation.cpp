// The CPU emulation of CUDA's execution model (see emulation.h for what it covers and
// what it cannot see).
//
// A launch runs the grid's blocks in parallel on the host's threads (OpenMP), one block
// at a time per host thread. A block's threads are fibers (ucontext) on that host
// thread. The scheduler runs each runnable fiber until it reaches a synchronization
// point (or exits), in an order that is shuffled per phase by default, then releases
// whatever can proceed: a warp whose lanes have all arrived at the same warp operation,
// or the whole block when every live thread waits at __syncthreads. When nothing can
// proceed and threads remain, the block is deadlocked: the launch fails with a message
// saying where the threads wait.
#include "emulation.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define HEAD4D_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HEAD4D_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#endif

namespace head4d {
namespace emu {

// ---------------------------------------------------------------------------------
// number conversions
// ---------------------------------------------------------------------------------

uint16_t half_bits_from_float(float value) {
  uint32_t f;
  std::memcpy(&f, &value, sizeof(f));
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t a = f & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 2^16: infinity
  if (a >= 0x38800000u) {                                              // a normal half (>= 2^-14)
    // re-bias the exponent (127 -> 15) and keep 10 of the 23 mantissa bits, rounding to
    // nearest even; a carry out of the mantissa correctly bumps the exponent (to inf).
    uint32_t h = (a - 0x38000000u) >> 13;
    const uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  if (a <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25: rounds to zero
  // a half subnormal, in units of 2^-24
  const uint32_t e = a >> 23;
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - e;
  uint32_t h = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float float_from_half_bits(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t e = (bits >> 10) & 0x1fu;
  const uint32_t m = bits & 0x3ffu;
  uint32_t f;
  if (e == 0x1fu) {
    f = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    f = sign | ((e + 112u) << 23) | (m << 13);
  } else {
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  float out;
  std::memcpy(&out, &f, sizeof(out));
  return out;
}

uint16_t bfloat16_bits_from_float(float value) {
  uint32_t f;
  std::memcpy(&f, &value, sizeof(f));
  if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((f >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((f >> 16) & 1u);
  return static_cast<uint16_t>((f + rounding) >> 16);
}

float double_to_float_down(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) > x) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

float double_to_float_up(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// ---------------------------------------------------------------------------------
// errors (per host thread, like the runtime's per-thread last error)
// ---------------------------------------------------------------------------------
namespace {

thread_local cudaError_t tls_last_error = cudaSuccess;
thread_local std::string tls_error_text;

void set_error(cudaError_t err, const std::string& detail) {
  tls_last_error = err;
  const char* base = err == cudaErrorInvalidValue           ? "invalid argument"
                     : err == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                                            : "unspecified launch failure";
  tls_error_text = std::string(base) + " (CUDA emulation: " + detail + ")";
}

std::mutex g_attr_mutex;
std::map<const void*, int> g_shared_limits;  // kernel -> opted-in dynamic shared memory

size_t shared_limit(const void* kernel) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  const auto it = g_shared_limits.find(kernel);
  return it == g_shared_limits.end() ? kDefaultSharedBytes : static_cast<size_t>(it->second);
}

}  // namespace

cudaError_t last_error(bool clear) {
  const cudaError_t err = tls_last_error;
  if (clear) tls_last_error = cudaSuccess;
  return err;
}

const char* error_string(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  return tls_error_text.empty() ? "unknown error" : tls_error_text.c_str();
}

cudaError_t set_function_shared_limit(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > kOptInSharedBytes) {
    set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: " + std::to_string(bytes) +
                                         " bytes of dynamic shared memory exceed the device's " +
                                         std::to_string(kOptInSharedBytes));
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  g_shared_limits[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t occupancy(int* blocks, const void* kernel, int block_size, size_t shared_bytes) {
  if (block_size < 1 || block_size > kMaxThreadsPerBlock) return cudaErrorInvalidValue;
  if (shared_bytes > shared_limit(kernel)) {
    *blocks = 0;
    return cudaSuccess;
  }
  int by_threads = kMaxThreadsPerMultiProcessor / block_size;
  int by_shared = shared_bytes == 0 ? kMaxBlocksPerMultiProcessor
                                    : static_cast<int>(kSharedBytesPerMultiProcessor / shared_bytes);
  *blocks = std::min({by_threads, by_shared, kMaxBlocksPerMultiProcessor});
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------
// fibers and the block scheduler
// ---------------------------------------------------------------------------------
namespace {

enum class State { kRunnable, kAtBarrier, kAtWarpOp, kDone };
enum class WarpOp { kNone, kSync, kExchange, kBallot };

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kMaxExchangeBytes = 16;

struct Fiber {
  ucontext_t context;
  unsigned char* stack = nullptr;  // usable stack (above the guard page)
  uint3 index{0, 0, 0};
  int linear = 0;
  State state = State::kRunnable;
  // the warp operation this thread waits at
  WarpOp op = WarpOp::kNone;
  unsigned mask = 0;
  int src_lane = 0;
  size_t bytes = 0;
  bool predicate = false;
  unsigned char value[kMaxExchangeBytes];
  unsigned char result[kMaxExchangeBytes];
  unsigned ballot = 0;
};

enum class Order { kForward, kReverse, kShuffle };

Order order_from_env() {
  const char* v = std::getenv("HEAD4D_EMULATION_ORDER");
  if (v == nullptr || std::string(v) == "shuffle" || std::string(v).empty()) return Order::kShuffle;
  if (std::string(v) == "forward") return Order::kForward;
  if (std::string(v) == "reverse") return Order::kReverse;
  std::fprintf(stderr, "head4d CUDA emulation: unknown HEAD4D_EMULATION_ORDER=%s, using shuffle\n", v);
  return Order::kShuffle;
}

uint64_t seed_from_env() {
  const char* v = std::getenv("HEAD4D_EMULATION_SEED");
  return v == nullptr ? 0 : std::strtoull(v, nullptr, 10);
}

// One host thread's block runner: its fiber stacks are kept between blocks and launches.
class BlockRunner {
 public:
  ~BlockRunner() {
    for (unsigned char* base : mappings_) munmap(base, kStackBytes + kGuardBytes);
  }

  // Runs one block; returns an empty string, or what went wrong.
  std::string run(const BlockCoords& coords, size_t shared_bytes, const std::function<void()>& body, Order order,
                  uint64_t seed) {
    coords_ = coords;
    body_ = &body;
    error_.clear();
    const int n = static_cast<int>(coords.block_dim.x * coords.block_dim.y * coords.block_dim.z);
    ensure_stacks(n);
    shared_.assign(shared_bytes + 16, 0xff);  // + 16: room to align; 0xff bytes are NaN floats
    fibers_.resize(n);
    for (int t = 0; t < n; ++t) {
      Fiber& f = fibers_[t];
      f.linear = t;
      f.index = uint3{static_cast<unsigned>(t % coords.block_dim.x),
                      static_cast<unsigned>((t / coords.block_dim.x) % coords.block_dim.y),
                      static_cast<unsigned>(t / (coords.block_dim.x * coords.block_dim.y))};
      f.state = State::kRunnable;
      f.op = WarpOp::kNone;
      f.stack = mappings_[t] + kGuardBytes;
#ifdef HEAD4D_EMU_ASAN
      ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);  // frames left by an earlier block's fiber
#endif
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = nullptr;
      const uintptr_t self = reinterpret_cast<uintptr_t>(this);
      makecontext(&f.context, reinterpret_cast<void (*)()>(&BlockRunner::entry), 2,
                  static_cast<unsigned>(self & 0xffffffffu), static_cast<unsigned>(self >> 32));
    }
    std::vector<int> order_of(n);
    for (int t = 0; t < n; ++t) order_of[t] = t;
    std::mt19937_64 rng(seed);
    if (order == Order::kReverse) std::reverse(order_of.begin(), order_of.end());

    for (;;) {
      if (order == Order::kShuffle) std::shuffle(order_of.begin(), order_of.end(), rng);
      bool ran = false;
      for (int t : order_of) {
        if (fibers_[t].state != State::kRunnable) continue;
        ran = true;
        switch_into(t);
        if (!error_.empty()) return error_;
      }
      if (release_warps()) continue;
      if (!error_.empty()) return error_;
      if (ran) continue;  // some may now wait at __syncthreads with others still running
      int done = 0, at_barrier = 0, at_warp = 0;
      for (const Fiber& f : fibers_) {
        done += f.state == State::kDone;
        at_barrier += f.state == State::kAtBarrier;
        at_warp += f.state == State::kAtWarpOp;
      }
      if (done == n) return std::string();
      if (at_warp == 0) {  // every live thread is at __syncthreads: the barrier opens
        for (Fiber& f : fibers_)
          if (f.state == State::kAtBarrier) f.state = State::kRunnable;
        continue;
      }
      return deadlock_message(at_barrier, at_warp, done);
    }
  }

  const uint3& thread_index() const { return fibers_[current_].index; }
  const BlockCoords& coords() const { return coords_; }
  unsigned char* shared() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(shared_.data());
    return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
  }
  int lane() const { return fibers_[current_].linear % kWarpSize; }

  void wait_at_barrier() {
    fibers_[current_].state = State::kAtBarrier;
    yield();
  }

  Fiber& wait_at_warp(WarpOp op, unsigned mask) {
    Fiber& f = fibers_[current_];
    f.op = op;
    f.mask = mask;
    f.state = State::kAtWarpOp;
    yield();
    return fibers_[current_];
  }

  Fiber& current_fiber() { return fibers_[current_]; }

 private:
  static void entry(unsigned lo, unsigned hi) {
    BlockRunner* self = reinterpret_cast<BlockRunner*>(static_cast<uintptr_t>(lo) | (static_cast<uintptr_t>(hi) << 32));
#ifdef HEAD4D_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &self->host_stack_bottom_, &self->host_stack_size_);
#endif
    (*self->body_)();
    self->fibers_[self->current_].state = State::kDone;
    self->yield(/*exiting=*/true);
  }

  void ensure_stacks(int n) {
    while (static_cast<int>(mappings_.size()) < n) {
      void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot map a fiber stack");
      mprotect(p, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting
      mappings_.push_back(static_cast<unsigned char*>(p));
    }
  }

  void switch_into(int t) {
    current_ = t;
#ifdef HEAD4D_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, fibers_[t].stack, kStackBytes);
#endif
    swapcontext(&host_, &fibers_[t].context);
#ifdef HEAD4D_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }

  void yield(bool exiting = false) {
    Fiber& f = fibers_[current_];
#ifdef HEAD4D_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(exiting ? nullptr : &fake, host_stack_bottom_, host_stack_size_);
#else
    (void)exiting;
#endif
    swapcontext(&f.context, &host_);
#ifdef HEAD4D_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &host_stack_bottom_, &host_stack_size_);
#endif
  }

  std::string where(const Fiber& f) const {
    return "thread (" + std::to_string(f.index.x) + "," + std::to_string(f.index.y) + "," + std::to_string(f.index.z) +
           ") of block (" + std::to_string(coords_.block_idx.x) + "," + std::to_string(coords_.block_idx.y) + "," +
           std::to_string(coords_.block_idx.z) + ")";
  }

  // Releases every warp whose lanes have all arrived at one warp operation; returns
  // whether any was released. Misuse sets error_.
  bool release_warps() {
    bool released = false;
    const int n = static_cast<int>(fibers_.size());
    for (int base = 0; base < n; base += kWarpSize) {
      const int lanes = std::min(kWarpSize, n - base);
      int first = -1;
      for (int l = 0; l < lanes; ++l)
        if (fibers_[base + l].state == State::kAtWarpOp) {
          first = base + l;
          break;
        }
      if (first < 0) continue;
      const unsigned mask = fibers_[first].mask;
      const WarpOp op = fibers_[first].op;
      bool ready = true;
      for (int l = 0; l < kWarpSize && ready; ++l) {
        if (!(mask >> l & 1u)) continue;
        if (l >= lanes) {
          error_ = "lane " + std::to_string(l) + " is named in the mask of a warp operation at " +
                   where(fibers_[first]) + " but the block has no such thread";
          return false;
        }
        const Fiber& f = fibers_[base + l];
        if (f.state == State::kRunnable) ready = false;  // not there yet
        else if (f.state == State::kDone) {
          error_ = "a warp operation at " + where(fibers_[first]) + " names lane " + std::to_string(l) +
                   " in its mask, but that thread has exited";
          return false;
        } else if (f.state == State::kAtWarpOp && (f.op != op || f.mask != mask)) {
          error_ = "the lanes of a warp disagree: " + where(fibers_[first]) + " and " + where(f) +
                   " wait at different warp operations or masks";
          return false;
        } else if (f.state == State::kAtBarrier) {
          ready = false;  // may still be fine if it later arrives; deadlock is decided by the caller
        }
      }
      if (!ready) continue;
      if (!(mask >> (first - base) & 1u)) {
        error_ = where(fibers_[first]) + " calls a warp operation with a mask that does not include itself";
        return false;
      }
      unsigned ballot = 0;
      for (int l = 0; l < lanes; ++l)
        if ((mask >> l & 1u) && fibers_[base + l].predicate) ballot |= 1u << l;
      for (int l = 0; l < lanes; ++l) {
        if (!(mask >> l & 1u)) continue;
        Fiber& f = fibers_[base + l];
        if (op == WarpOp::kExchange) {
          const int src = f.src_lane;
          if (src < 0 || src >= kWarpSize || !(mask >> src & 1u)) {
            error_ = "a shuffle at " + where(f) + " reads lane " + std::to_string(src) + ", which is not in its mask";
            return false;
          }
          std::memcpy(f.result, fibers_[base + src].value, f.bytes);
        }
        f.ballot = ballot;
        f.state = State::kRunnable;
      }
      released = true;
    }
    return released;
  }

  std::string deadlock_message(int at_barrier, int at_warp, int done) const {
    std::string first_warp;
    for (const Fiber& f : fibers_)
      if (f.state == State::kAtWarpOp) {
        first_warp = where(f);
        break;
      }
    return "deadlock in block (" + std::to_string(coords_.block_idx.x) + "," + std::to_string(coords_.block_idx.y) +
           "," + std::to_string(coords_.block_idx.z) + "): " + std::to_string(at_barrier) + " threads wait at __syncthreads, " +
           std::to_string(at_warp) + " at a warp operation (first: " + first_warp + ") that can never complete, " +
           std::to_string(done) + " have exited";
  }

  BlockCoords coords_{};
  const std::function<void()>* body_ = nullptr;
  std::vector<Fiber> fibers_;
  std::vector<unsigned char*> mappings_;
  std::vector<unsigned char> shared_;
  ucontext_t host_;
  int current_ = 0;
  std::string error_;
  const void* host_stack_bottom_ = nullptr;
  size_t host_stack_size_ = 0;
};

thread_local BlockRunner* tls_runner = nullptr;

BlockRunner& runner() {
  if (tls_runner == nullptr) throw std::logic_error("CUDA emulation: a device function was called outside a kernel");
  return *tls_runner;
}

}  // namespace

const uint3& thread_index() { return runner().thread_index(); }
const BlockCoords& block_coords() { return runner().coords(); }
unsigned char* dynamic_shared() { return runner().shared(); }
int lane_id() { return runner().lane(); }
void sync_block() { runner().wait_at_barrier(); }
void sync_warp(unsigned mask) { runner().wait_at_warp(WarpOp::kSync, mask); }

void warp_exchange(unsigned mask, const void* value, size_t bytes, int src_lane, void* out) {
  if (bytes > kMaxExchangeBytes) {  // cannot throw across a fiber's stack
    std::fprintf(stderr, "head4d CUDA emulation: shuffle of a type wider than 16 bytes\n");
    std::abort();
  }
  BlockRunner& r = runner();
  Fiber& f = r.current_fiber();
  std::memcpy(f.value, value, bytes);
  f.bytes = bytes;
  f.src_lane = src_lane;
  Fiber& after = r.wait_at_warp(WarpOp::kExchange, mask);
  std::memcpy(out, after.result, bytes);
}

unsigned warp_ballot(unsigned mask, bool predicate) {
  BlockRunner& r = runner();
  r.current_fiber().predicate = predicate;
  return r.wait_at_warp(WarpOp::kBallot, mask).ballot;
}

void launch_grid(dim3 grid, dim3 block, size_t shared_bytes, const void* kernel, const std::function<void()>& body) {
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  if (threads < 1 || threads > kMaxThreadsPerBlock || block.z > 64) {
    set_error(cudaErrorInvalidConfiguration, "block of " + std::to_string(block.x) + "x" + std::to_string(block.y) +
                                                 "x" + std::to_string(block.z) + " threads");
    return;
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u) {
    set_error(cudaErrorInvalidConfiguration, "grid of " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
                                                 std::to_string(grid.z) + " blocks");
    return;
  }
  const size_t limit = shared_limit(kernel);
  if (shared_bytes > limit) {
    set_error(cudaErrorInvalidValue, std::to_string(shared_bytes) + " bytes of dynamic shared memory, more than the " +
                                         std::to_string(limit) + " this kernel may use" +
                                         (limit == kDefaultSharedBytes ? " without cudaFuncSetAttribute" : ""));
    return;
  }
  const Order order = order_from_env();
  const uint64_t seed = seed_from_env();
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  std::atomic<bool> failed{false};
  std::string failure;
  std::mutex failure_mutex;

#pragma omp parallel for schedule(dynamic, 1) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    if (failed.load(std::memory_order_relaxed)) continue;
    static thread_local BlockRunner block_runner;
    BlockRunner* previous = tls_runner;
    tls_runner = &block_runner;
    BlockCoords coords;
    coords.block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                             static_cast<unsigned>(b / (static_cast<int64_t>(grid.x) * grid.y))};
    coords.block_dim = block;
    coords.grid_dim = grid;
    std::string error;
    try {
      error = block_runner.run(coords, shared_bytes, body, order, seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(b));
    } catch (const std::exception& e) {
      error = e.what();
    }
    tls_runner = previous;
    if (!error.empty()) {
      std::lock_guard<std::mutex> lock(failure_mutex);
      if (!failed.exchange(true)) failure = error;
    }
  }
  if (failed) set_error(cudaErrorLaunchFailure, failure);
}

}  // namespace emu
}  // namespace head4d
