// Host side of sample_importance: checks, contiguous copies, allocation, dispatch.
// The uniform numbers come from Python (drawn exactly as the reference draws them),
// so the kernels are deterministic functions of (depths, weights, u).
#include <cstdint>

#include <ATen/ATen.h>

#include "../host_utils.h"
#include "../ops.h"
#include "importance.h"

namespace head4d {
namespace {

#ifdef HEAD4D_WITH_CUDA
// The CUDA kernel keeps each warp's rays in shared memory, or in a global scratch
// buffer when they do not fit.
void sample_on_cuda(importance::Args args, const at::TensorOptions& scratch_options, void* stream) {
  at::Tensor scratch;
  const int64_t elements = importance::cuda_scratch_elements(args);
  if (elements > 0) {
    scratch = at::empty({elements}, scratch_options);
    args.scratch = scratch.data_ptr();
  }
  importance::sample_cuda(args, stream);
}
#endif

}  // namespace

at::Tensor sample_importance(const at::Tensor& depths, const at::Tensor& weights, const at::Tensor& u) {
  constexpr const char* op = "sample_importance";
  TORCH_CHECK_VALUE(depths.dim() == 4 && depths.size(3) == 1, op, ": depths must have shape [N, R, S, 1], got ",
                    depths.sizes());
  const int64_t N = depths.size(0), R = depths.size(1), S = depths.size(2);
  TORCH_CHECK_VALUE(S >= 4, op, ": depths must have S >= 4 samples per ray, got shape ", depths.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 4 && weights.size(0) == N && weights.size(1) == R &&
                        weights.size(2) == S - 1 && weights.size(3) == 1,
                    op, ": weights must have shape [N, R, S-1, 1] = [", N, ", ", R, ", ", S - 1, ", 1], got ",
                    weights.sizes());
  const Dtype dtype = kernel_dtype(depths, op, "depths");
  TORCH_CHECK_TYPE(weights.scalar_type() == depths.scalar_type(), op, ": weights has dtype ",
                   weights.scalar_type(), " but depths has ", depths.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(weights.device() == depths.device(), op, ": weights is on ", weights.device(),
                    " but depths is on ", depths.device());
  const auto acc = accumulate_type(depths);
  TORCH_CHECK_TYPE(u.scalar_type() == acc, op, ": u must have dtype ", acc, " (the compute type of ",
                   depths.scalar_type(), " inputs), got ", u.scalar_type());
  TORCH_CHECK_VALUE(u.device() == depths.device(), op, ": u is on ", u.device(), " but depths is on ",
                    depths.device());
  TORCH_CHECK_VALUE((u.dim() == 1) || (u.dim() == 2 && u.size(0) == N * R), op,
                    ": u must have shape [n] (shared by all rays) or [N*R, n] = [", N * R, ", n], got ",
                    u.sizes());
  const int64_t n = u.size(-1);
  TORCH_CHECK_VALUE(n >= 1, op, ": u must hold at least one number per ray, got shape ", u.sizes());

  const at::Tensor dep = depths.contiguous(), wts = weights.contiguous(), uc = u.contiguous();
  at::Tensor out = at::empty({N, R, n, 1}, depths.options());
  if (N * R == 0) return out;

  importance::Args args{dep.data_ptr(), wts.data_ptr(), uc.data_ptr(), out.data_ptr(), nullptr,
                        N * R, S, n, u.dim() == 1 ? 0 : n, dtype};
  if (uses_cuda_kernels(depths)) {
    HEAD4D_ON_CUDA(depths, "sample_importance", sample_on_cuda(args, depths.options().dtype(acc), stream));
  } else {
    HEAD4D_ON_CPU(depths, "sample_importance", importance::sample_cpu(args, host_parallel_for()));
  }
  return out;
}

}  // namespace head4d
