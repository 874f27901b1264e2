// Host side of bias_act: checks, contiguous inputs, allocation, dispatch.
#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/ATen.h>

#include "../host_utils.h"
#include "../ops.h"
#include "bias_act.h"
#include "bias_act_math.h"

namespace head4d {

at::Tensor bias_act_run(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& grad, int64_t dim, int64_t act, int64_t order,
                        double alpha, double gain, double clamp) {
  constexpr const char* kOp = "bias_act";
  const Dtype dtype = kernel_dtype(x, kOp, "x");
  check_kernel_device(x, kOp);
  TORCH_CHECK_VALUE(x.dim() >= 1, "bias_act: x must have at least one dimension, got ", x.sizes());
  TORCH_CHECK_VALUE(dim >= 0 && dim < x.dim(), "bias_act: dim must be in [0, ", x.dim(), "), got ", dim);
  TORCH_CHECK_VALUE(act >= bias_act::kLinear && act <= bias_act::kSwish, "bias_act: unknown activation code ", act);
  TORCH_CHECK_VALUE(order >= 0 && order <= 2, "bias_act: order must be 0, 1 or 2, got ", order);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && std::isfinite(gain) && !std::isnan(clamp),
                    "bias_act: alpha, gain and clamp must be numbers");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == x.size(dim), "bias_act: b must have shape [", x.size(dim),
                      "] (x.shape[dim]), got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == x.scalar_type(), "bias_act: b has dtype ", b.scalar_type(), " but x has ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(b.device() == x.device(), "bias_act: b on ", b.device(), " but x on ", x.device());
  }
  at::Tensor g;
  if (order > 0) {
    TORCH_CHECK_VALUE(grad.has_value() && grad->defined(), "bias_act: order ", order, " needs grad");
    TORCH_CHECK_VALUE(grad->sizes() == x.sizes(), "bias_act: grad has shape ", grad->sizes(), " but x has ",
                      x.sizes());
    TORCH_CHECK_VALUE(grad->device() == x.device(), "bias_act: grad on ", grad->device(), " but x on ", x.device());
    g = grad->to(x.scalar_type()).contiguous();
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), xc.options());
  if (out.numel() == 0) return out;
  int64_t C = 1, inner = 1;
  if (b.defined()) {
    C = x.size(dim);
    for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  } else {
    inner = x.numel();
  }
  const int64_t outer = x.numel() / (C * inner);
  bias_act::Args args{xc.data_ptr(), b.defined() ? b.data_ptr() : nullptr, g.defined() ? g.data_ptr() : nullptr,
                      out.data_ptr(), outer, C, inner, static_cast<int>(act), static_cast<int>(order),
                      alpha, gain, clamp, dtype};
  if (uses_cuda_kernels(x)) {
    HEAD4D_ON_CUDA(x, kOp, bias_act::run_cuda(args, stream));
  } else {
    HEAD4D_ON_CPU(x, kOp, bias_act::run_cpu(args, host_parallel_for()));
  }
  return out;
}

}  // namespace head4d
