// CPU kernel of importance sampling. The per-ray math is importance_math.h, the same
// functions the CUDA kernel calls.
//
// One task per ray: the ray's weights are widened into a per-task row, ray_cdf turns
// the row into the CDF in place, then each of the n fine samples is a binary search in
// it and an interpolation between two bin midpoints (computed from the depths on the fly).
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>


#include "importance.h"
#include "importance_math.h"
#include "../cpu_dispatch.h"

namespace head4d {
namespace importance {
namespace {

template <typename scalar_t, typename A>
void sample_impl(const Args& a, const ParallelFor& parallel_for) {
  const auto* depths = static_cast<const scalar_t*>(a.depths);
  const auto* weights = static_cast<const scalar_t*>(a.weights);
  const auto* u = static_cast<const A*>(a.u);
  auto* out = static_cast<scalar_t*>(a.out);
  const int64_t S = a.S, K = S - 3, n = a.n, u_stride = a.u_ray_stride;
  // about 16k elementary steps per chunk: S for the CDF, ~log2(S) + 5 per sample
  const int64_t grain = std::max<int64_t>(1, 16384 / (2 * S + 12 * n));

  parallel_for(a.rays, grain, [&](int64_t begin, int64_t end) {
    std::vector<A> row(static_cast<size_t>(S - 1));  // the ray's weights, then its CDF
    A* cdf = row.data();
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* w = weights + r * (S - 1);
      const scalar_t* z = depths + r * S;
      for (int64_t i = 0; i < S - 1; ++i) cdf[i] = static_cast<A>(w[i]);
      const bool sorted = ray_cdf(cdf, K);

      const A* ur = u + r * u_stride;
      scalar_t* o = out + r * n;
      for (int64_t j = 0; j < n; ++j) {
        const A uj = ur[j];
        int64_t below, above;
        locate(cdf, K, uj, sorted, below, above);
        const A bin_below = bin_mid(static_cast<A>(z[below]), static_cast<A>(z[below + 1]));
        const A bin_above = bin_mid(static_cast<A>(z[above]), static_cast<A>(z[above + 1]));
        o[j] = static_cast<scalar_t>(interpolate(uj, cdf[below], cdf[above], bin_below, bin_above));
      }
    }
  });
}

}  // namespace

void sample_cpu(const Args& args, const ParallelFor& parallel_for) {
  if (args.rays == 0 || args.n == 0) return;
  if (args.S < 4) throw std::invalid_argument("sample_importance: needs S >= 4 samples per ray");
  with_cpu_storage_type(args.dtype, "sample_importance", [&](auto s, auto acc) {
    sample_impl<decltype(s), decltype(acc)>(args, parallel_for);
  });
}

}  // namespace importance
}  // namespace head4d
