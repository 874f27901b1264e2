// Host side of composite_rays: checks, contiguous copies, allocation, the global
// depth min / max, dispatch, and the part of the depth gradient that the clamp
// sends to the global min / max (a reduction over all rays, done with ATen).
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../host_utils.h"
#include "../ops.h"
#include "compositing.h"

namespace head4d {
namespace {

void check_composite(const at::Tensor& colors, const at::Tensor& densities, const at::Tensor& depths,
                     const std::optional<at::Tensor>& background, bool white_back) {
  TORCH_CHECK_VALUE(colors.dim() == 4, "composite_rays: colors must have shape [N, R, S, C], got ", colors.sizes());
  const int64_t N = colors.size(0), R = colors.size(1), S = colors.size(2), C = colors.size(3);
  TORCH_CHECK_VALUE(S >= 2, "composite_rays: needs S >= 2 samples per ray, got ", colors.sizes());
  for (const at::Tensor* t : {&densities, &depths}) {
    TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == N && t->size(1) == R && t->size(2) == S && t->size(3) == 1,
                      "composite_rays: densities and depths must have shape [N, R, S, 1] = [", N, ", ", R, ", ",
                      S, ", 1], got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == colors.scalar_type(), "composite_rays: dtypes must match");
    TORCH_CHECK_VALUE(t->device() == colors.device(), "composite_rays: tensors must be on one device");
  }
  if (background.has_value()) {
    const at::Tensor& bg = *background;
    TORCH_CHECK_VALUE(!white_back, "composite_rays: give white_back or a background, not both");
    TORCH_CHECK_VALUE(bg.dim() == 3 && bg.size(0) == N && bg.size(1) == R && bg.size(2) == C,
                      "composite_rays: background must have shape [N, R, C], got ", bg.sizes());
    TORCH_CHECK_TYPE(bg.scalar_type() == colors.scalar_type(), "composite_rays: dtypes must match");
    TORCH_CHECK_VALUE(bg.device() == colors.device(), "composite_rays: tensors must be on one device");
  }
  kernel_dtype(colors, "composite_rays", "inputs");
}

int background_mode(const std::optional<at::Tensor>& background, bool white_back) {
  if (background.has_value()) return compositing::kTensor;
  return white_back ? compositing::kWhite : compositing::kNoBackground;
}

// min and max of all depths, in the accumulation type, as two 0-dim tensors
// (kept on the device: no synchronization).
std::tuple<at::Tensor, at::Tensor> depth_range(const at::Tensor& depths_acc) {
  auto mm = at::aminmax(depths_acc);
  return {std::get<0>(mm).contiguous(), std::get<1>(mm).contiguous()};
}

}  // namespace

std::vector<at::Tensor> composite_rays_forward(const at::Tensor& colors, const at::Tensor& densities,
                                               const at::Tensor& depths,
                                               const std::optional<at::Tensor>& background, bool white_back) {
  check_composite(colors, densities, depths, background, white_back);
  const int64_t N = colors.size(0), R = colors.size(1), S = colors.size(2), C = colors.size(3);
  const auto acc = accumulate_type(colors);
  const at::Tensor col = colors.contiguous(), dens = densities.contiguous(), dep = depths.contiguous();
  at::Tensor bg;
  if (background.has_value()) bg = background->contiguous();
  at::Tensor lo, hi;
  if (dep.numel() > 0) {
    std::tie(lo, hi) = depth_range(dep.to(acc));
  }
  at::Tensor rgb = at::empty({N, R, C}, colors.options());
  at::Tensor depth = at::empty({N, R, 1}, colors.options());
  at::Tensor weights = at::empty({N, R, S - 1, 1}, colors.options());
  at::Tensor aux = at::empty({N, R, compositing::kAux}, colors.options().dtype(acc));
  if (N * R == 0) return {rgb, depth, weights, aux};

  compositing::ForwardArgs args{col.data_ptr(), dens.data_ptr(), dep.data_ptr(),
                                bg.defined() ? bg.data_ptr() : nullptr, lo.data_ptr(), hi.data_ptr(),
                                rgb.data_ptr(), depth.data_ptr(), weights.data_ptr(), aux.data_ptr(),
                                N * R, S, C, background_mode(background, white_back), kernel_dtype(colors, "composite_rays", "inputs")};
  if (uses_cuda_kernels(colors)) {
    HEAD4D_ON_CUDA(colors, "composite_rays", compositing::forward_cuda(args, stream));
  } else {
    // the range was computed on the CPU: the kernel reads it directly
    HEAD4D_ON_CPU(colors, "composite_rays", compositing::forward_cpu(args, host_parallel_for()));
  }
  return {rgb, depth, weights, aux};
}

std::vector<at::Tensor> composite_rays_backward(const at::Tensor& grad_rgb,
                                                const std::optional<at::Tensor>& grad_depth,
                                                const std::optional<at::Tensor>& grad_weights,
                                                const at::Tensor& colors, const at::Tensor& densities,
                                                const at::Tensor& depths,
                                                const std::optional<at::Tensor>& background, bool white_back,
                                                const at::Tensor& aux) {
  check_composite(colors, densities, depths, background, white_back);
  const int64_t N = colors.size(0), R = colors.size(1), S = colors.size(2), C = colors.size(3);
  const auto acc = accumulate_type(colors);
  const auto acc_opts = colors.options().dtype(acc);
  TORCH_CHECK_VALUE(grad_rgb.numel() == N * R * C, "composite_rays: grad_rgb has ", grad_rgb.numel(),
                    " elements, expected ", N * R * C);
  TORCH_CHECK_VALUE(aux.numel() == N * R * compositing::kAux && aux.scalar_type() == acc,
                    "composite_rays: aux does not match the inputs");
  const at::Tensor col = colors.contiguous(), dens = densities.contiguous(), dep = depths.contiguous();
  const at::Tensor dep_acc = dep.to(acc);
  at::Tensor bg;
  if (background.has_value()) bg = background->contiguous();
  const at::Tensor g_rgb = grad_rgb.to(acc).contiguous();
  const at::Tensor ax = aux.contiguous();
  at::Tensor g_depth, g_weights;
  if (grad_depth.has_value() && grad_depth->defined()) {
    TORCH_CHECK_VALUE(grad_depth->numel() == N * R, "composite_rays: grad_depth has ", grad_depth->numel(),
                      " elements, expected ", N * R);
    g_depth = grad_depth->to(acc).contiguous();
  }
  if (grad_weights.has_value() && grad_weights->defined()) {
    TORCH_CHECK_VALUE(grad_weights->numel() == N * R * (S - 1), "composite_rays: grad_weights has ",
                      grad_weights->numel(), " elements, expected ", N * R * (S - 1));
    g_weights = grad_weights->to(acc).contiguous();
  }

  at::Tensor grad_colors = at::empty({N, R, S, C}, acc_opts);
  at::Tensor grad_densities = at::empty({N, R, S, 1}, acc_opts);
  at::Tensor grad_depths = at::empty({N, R, S, 1}, acc_opts);
  at::Tensor grad_background;
  if (bg.defined()) grad_background = at::empty({N, R, C}, acc_opts);

  if (N * R > 0) {
    at::Tensor lo, hi;
    std::tie(lo, hi) = depth_range(dep_acc);
    compositing::BackwardArgs args{g_rgb.data_ptr(),
                                   g_depth.defined() ? g_depth.data_ptr() : nullptr,
                                   g_weights.defined() ? g_weights.data_ptr() : nullptr,
                                   col.data_ptr(), dens.data_ptr(), dep.data_ptr(),
                                   bg.defined() ? bg.data_ptr() : nullptr,
                                   lo.data_ptr(), hi.data_ptr(), ax.data_ptr(),
                                   grad_colors.data_ptr(), grad_densities.data_ptr(), grad_depths.data_ptr(),
                                   bg.defined() ? grad_background.data_ptr() : nullptr,
                                   N * R, S, C, background_mode(background, white_back), kernel_dtype(colors, "composite_rays", "inputs")};
    if (uses_cuda_kernels(colors)) {
      HEAD4D_ON_CUDA(colors, "composite_rays", compositing::backward_cuda(args, stream));
    } else {
      HEAD4D_ON_CPU(colors, "composite_rays", compositing::backward_cpu(args, host_parallel_for()));
    }

    if (g_depth.defined()) {
      // The clamp to [min, max] of all depths: where a ray's depth (NaN -> +inf) fell
      // below the min or above the max, its gradient goes to the min or the max, which
      // autograd of amin / amax spreads evenly over the elements equal to it.
      const at::Tensor raw = ax.view({N * R, compositing::kAux}).select(1, 1);
      const at::Tensor d = at::where(at::isnan(raw), at::full({}, INFINITY, acc_opts), raw);
      const at::Tensor gd = g_depth.view({N * R});
      const at::Tensor to_lo = at::where(at::logical_and(d < lo, lo < hi), gd, at::zeros({}, acc_opts)).sum();
      const at::Tensor to_hi = at::where(at::logical_or(d > hi, hi < lo), gd, at::zeros({}, acc_opts)).sum();
      const at::Tensor at_lo = (dep_acc == lo);
      const at::Tensor at_hi = (dep_acc == hi);
      grad_depths.add_(at_lo.to(acc) * (to_lo / at_lo.sum().to(acc)));
      grad_depths.add_(at_hi.to(acc) * (to_hi / at_hi.sum().to(acc)));
    }
  } else {
    grad_colors.zero_();
    grad_densities.zero_();
    grad_depths.zero_();
    if (grad_background.defined()) grad_background.zero_();
  }

  const auto dtype = colors.scalar_type();
  std::vector<at::Tensor> out{grad_colors.to(dtype), grad_densities.to(dtype), grad_depths.to(dtype)};
  out.push_back(grad_background.defined() ? grad_background.to(dtype) : at::Tensor());
  return out;
}

}  // namespace head4d
