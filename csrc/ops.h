// Host entry points of every op, as bound into head4d._C by bindings.cpp.
// Each checks its inputs, allocates outputs and calls the CPU or CUDA launcher.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace head4d {

// planes [N, 3, C, H, W] (any strides), points [N, M, 3] (any floating dtype)
// -> [N, M, C] (reduce mean/sum) or [N, 3, M, C] (none), in planes' dtype.
at::Tensor sample_triplanes_forward(const at::Tensor& planes, const at::Tensor& points, double scale,
                                    int64_t layout, int64_t reduce);

// -> (grad_planes [N, 3, C, H, W] in planes' dtype, grad_points [N, M, 3] in points' dtype);
// an output that is not needed is returned undefined (None in Python).
std::tuple<at::Tensor, at::Tensor> sample_triplanes_backward(const at::Tensor& grad_out,
                                                             const at::Tensor& planes,
                                                             const at::Tensor& points, double scale,
                                                             int64_t layout, int64_t reduce,
                                                             bool need_grad_planes,
                                                             bool need_grad_points);

// colors [N, R, S, C], densities and depths [N, R, S, 1], background [N, R, C] or None
// (all one dtype and device) -> (rgb [N, R, C], depth [N, R, 1], weights [N, R, S-1, 1],
// aux [N, R, 4] in the accumulation type: per ray what the backward needs).
std::vector<at::Tensor> composite_rays_forward(const at::Tensor& colors, const at::Tensor& densities,
                                               const at::Tensor& depths,
                                               const std::optional<at::Tensor>& background, bool white_back);

// grad_depth / grad_weights may be None (that output got no gradient)
// -> (grad_colors, grad_densities, grad_depths, grad_background or None), in the inputs' dtype.
std::vector<at::Tensor> composite_rays_backward(const at::Tensor& grad_rgb,
                                                const std::optional<at::Tensor>& grad_depth,
                                                const std::optional<at::Tensor>& grad_weights,
                                                const at::Tensor& colors, const at::Tensor& densities,
                                                const at::Tensor& depths,
                                                const std::optional<at::Tensor>& background, bool white_back,
                                                const at::Tensor& aux);

bool with_cuda();

}  // namespace head4d
