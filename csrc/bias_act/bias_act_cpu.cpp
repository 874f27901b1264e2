// CPU kernel of bias_act: one pass over the elements, split into ranges of rows of
// `inner` elements that share one bias value. The math is bias_act_math.h.
#include <cstdint>
#include <stdexcept>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "bias_act.h"
#include "bias_act_math.h"

namespace head4d {
namespace bias_act {
namespace {

constexpr int64_t kGrainElements = 1 << 15;

template <typename scalar_t, typename acc_t>
void run_impl(const Args& a, const ParallelFor& parallel_for) {
  const auto* x = static_cast<const scalar_t*>(a.x);
  const auto* bias = static_cast<const scalar_t*>(a.bias);
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t rows = a.outer * a.C, inner = a.inner, C = a.C;
  const acc_t alpha = static_cast<acc_t>(a.alpha), gain = static_cast<acc_t>(a.gain);
  const acc_t clamp = static_cast<acc_t>(a.clamp);
  const int act = a.act, order = a.order;
  const int64_t grain = inner >= kGrainElements ? 1 : kGrainElements / inner;
  parallel_for(rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[row % C]) : acc_t(0);
      const int64_t base = row * inner;
      for (int64_t k = base; k < base + inner; ++k) {
        const acc_t z = static_cast<acc_t>(x[k]) + b;
        const acc_t g = grad != nullptr ? static_cast<acc_t>(grad[k]) : acc_t(0);
        out[k] = static_cast<scalar_t>(element<acc_t>(act, order, z, g, alpha, gain, clamp));
      }
    }
  });
}

}  // namespace

void run_cpu(const Args& args, const ParallelFor& parallel_for) {
  if (args.outer * args.C * args.inner == 0) return;
  switch (args.dtype) {
    case Dtype::kFloat32: return run_impl<float, float>(args, parallel_for);
    case Dtype::kFloat64: return run_impl<double, double>(args, parallel_for);
    case Dtype::kFloat16: return run_impl<c10::Half, float>(args, parallel_for);
    case Dtype::kBFloat16: return run_impl<c10::BFloat16, float>(args, parallel_for);
  }
  throw std::invalid_argument("bias_act: unsupported dtype");
}

}  // namespace bias_act
}  // namespace head4d
