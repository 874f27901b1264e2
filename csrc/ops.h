// Host entry points of every op, as bound into head4d._C by bindings.cpp.
// Each checks its inputs, allocates outputs and calls the CPU or CUDA launcher.
#pragma once

#include <tuple>

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

bool with_cuda();

}  // namespace head4d
