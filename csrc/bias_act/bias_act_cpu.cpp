// CPU kernel of bias_act: one pass over the elements, split into ranges of rows of
// `inner` elements that share one bias value. The math is bias_act_math.h; the
// activation, the derivative order and whether there is a clamp are template
// arguments, so each inner loop is branch-free straight-line code the compiler can
// vectorize.
#include <cstdint>
#include <stdexcept>


#include "bias_act.h"
#include "bias_act_math.h"
#include "../cpu_dispatch.h"

namespace head4d {
namespace bias_act {
namespace {

constexpr int64_t kGrainElements = 1 << 15;

// One row of `n` elements sharing the bias value `b`. Everything the loop reads is a
// local value or a restrict pointer, so the compiler knows the stores to `out` change
// none of it and vectorizes the loop.
template <typename scalar_t, typename acc_t, int ACT, int ORDER, bool HAS_CLAMP>
void run_row(const scalar_t* __restrict x, const scalar_t* __restrict grad, scalar_t* __restrict out, int64_t n,
             acc_t b, acc_t alpha, acc_t gain, acc_t clamp) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t z = static_cast<acc_t>(x[k]) + b;
    const acc_t g = ORDER > 0 ? static_cast<acc_t>(grad[k]) : acc_t(0);
    out[k] = static_cast<scalar_t>(element<acc_t>(ACT, ORDER, HAS_CLAMP, z, g, alpha, gain, clamp));
  }
}

template <typename scalar_t, typename acc_t, int ACT, int ORDER, bool HAS_CLAMP>
void run_impl(const Args& a, const ParallelFor& parallel_for) {
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* bias = static_cast<const scalar_t*>(a.bias);
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t rows = a.outer * a.C, inner = a.inner, C = a.C;
  const acc_t alpha = static_cast<acc_t>(a.alpha), gain = static_cast<acc_t>(a.gain);
  const acc_t clamp = static_cast<acc_t>(a.clamp);
  const int64_t grain = inner >= kGrainElements ? 1 : kGrainElements / inner;
  parallel_for(rows, grain, [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[row % C]) : acc_t(0);
      const int64_t base = row * inner;
      run_row<scalar_t, acc_t, ACT, ORDER, HAS_CLAMP>(x + base, ORDER > 0 ? grad + base : nullptr, out + base, inner,
                                                      b, alpha, gain, clamp);
    }
  });
}

template <typename scalar_t, typename acc_t, int ACT, int ORDER>
void with_clamp(const Args& a, const ParallelFor& parallel_for) {
  if (a.clamp >= 0) return run_impl<scalar_t, acc_t, ACT, ORDER, true>(a, parallel_for);
  run_impl<scalar_t, acc_t, ACT, ORDER, false>(a, parallel_for);
}

template <typename scalar_t, typename acc_t, int ACT>
void with_order(const Args& a, const ParallelFor& parallel_for) {
  switch (a.order) {
    case 0: return with_clamp<scalar_t, acc_t, ACT, 0>(a, parallel_for);
    case 1: return with_clamp<scalar_t, acc_t, ACT, 1>(a, parallel_for);
    case 2: return with_clamp<scalar_t, acc_t, ACT, 2>(a, parallel_for);
  }
  throw std::invalid_argument("bias_act: order must be 0, 1 or 2");
}

template <typename scalar_t, typename acc_t>
void with_activation(const Args& a, const ParallelFor& parallel_for) {
  switch (a.act) {
    case kLinear: return with_order<scalar_t, acc_t, kLinear>(a, parallel_for);
    case kRelu: return with_order<scalar_t, acc_t, kRelu>(a, parallel_for);
    case kLrelu: return with_order<scalar_t, acc_t, kLrelu>(a, parallel_for);
    case kTanh: return with_order<scalar_t, acc_t, kTanh>(a, parallel_for);
    case kSigmoid: return with_order<scalar_t, acc_t, kSigmoid>(a, parallel_for);
    case kElu: return with_order<scalar_t, acc_t, kElu>(a, parallel_for);
    case kSelu: return with_order<scalar_t, acc_t, kSelu>(a, parallel_for);
    case kSoftplus: return with_order<scalar_t, acc_t, kSoftplus>(a, parallel_for);
    case kSwish: return with_order<scalar_t, acc_t, kSwish>(a, parallel_for);
  }
  throw std::invalid_argument("bias_act: unknown activation");
}

}  // namespace

void run_cpu(const Args& args, const ParallelFor& parallel_for) {
  if (args.outer * args.C * args.inner == 0) return;
  with_cpu_storage_type(args.dtype, "bias_act", [&](auto s, auto acc) {
    with_activation<decltype(s), decltype(acc)>(args, parallel_for);
  });
}

}  // namespace bias_act
}  // namespace head4d
