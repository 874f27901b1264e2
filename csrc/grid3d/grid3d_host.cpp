// Host side of sample_grid3d: checks, the channels-last relayout, allocation, dispatch.
#include <cmath>
#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../host_utils.h"
#include "../ops.h"
#include "grid3d.h"

namespace head4d {
namespace {

constexpr const char* kOp = "sample_grid3d";

void check_inputs(const at::Tensor& grid, const at::Tensor& points, double bound, int64_t padding) {
  TORCH_CHECK_VALUE(grid.dim() == 5, "sample_grid3d: grid must have shape [N, C, D, H, W], got ", grid.sizes());
  TORCH_CHECK_VALUE(points.dim() == 3 && points.size(2) == 3,
                    "sample_grid3d: points must have shape [N, M, 3], got ", points.sizes());
  TORCH_CHECK_VALUE(points.size(0) == grid.size(0), "sample_grid3d: points batch ", points.size(0),
                    " does not match grid batch ", grid.size(0));
  TORCH_CHECK_VALUE(grid.size(2) >= 1 && grid.size(3) >= 1 && grid.size(4) >= 1,
                    "sample_grid3d: grid must have D, H, W >= 1, got ", grid.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(points.scalar_type()), "sample_grid3d: points must be floating point, got ",
                   points.scalar_type());
  TORCH_CHECK_VALUE(grid.device() == points.device(), "sample_grid3d: grid on ", grid.device(), " but points on ",
                    points.device());
  TORCH_CHECK_VALUE(std::isfinite(bound) && bound > 0, "sample_grid3d: bound must be finite and > 0, got ", bound);
  TORCH_CHECK_VALUE(padding == grid3d::kZeros || padding == grid3d::kBorder, "sample_grid3d: unknown padding ",
                    padding);
  kernel_dtype(grid, kOp, "grid");
}

// [N, C, D, H, W] -> a contiguous [N, D, H, W, C]; free for C = 1 and for grids that
// are channels-last (channels_last_3d) already.
at::Tensor channels_last(const at::Tensor& grid) {
  const at::Tensor permuted = grid.permute({0, 2, 3, 4, 1});
  if (permuted.is_contiguous()) return permuted;
  return permuted.contiguous();
}

}  // namespace

at::Tensor sample_grid3d_forward(const at::Tensor& grid, const at::Tensor& points, double bound, int64_t padding) {
  check_inputs(grid, points, bound, padding);
  const int64_t N = grid.size(0), C = grid.size(1), D = grid.size(2), H = grid.size(3), W = grid.size(4);
  const int64_t M = points.size(1);
  at::Tensor out = at::empty({N, M, C}, grid.options());
  if (out.numel() == 0) return out;
  const at::Tensor grid_cl = channels_last(grid);
  const at::Tensor pts = points.to(accumulate_type(grid)).contiguous();

  grid3d::ForwardArgs args{grid_cl.data_ptr(), pts.data_ptr(), out.data_ptr(), N, M, C, D, H, W, bound,
                           static_cast<int>(padding), kernel_dtype(grid, kOp, "grid")};
  if (uses_cuda_kernels(grid)) {
    HEAD4D_ON_CUDA(grid, "sample_grid3d", grid3d::forward_cuda(args, stream));
  } else {
    HEAD4D_ON_CPU(grid, "sample_grid3d", grid3d::forward_cpu(args, host_parallel_for()));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_grid3d_backward(const at::Tensor& grad_out, const at::Tensor& grid,
                                                          const at::Tensor& points, double bound, int64_t padding,
                                                          bool need_grad_grid, bool need_grad_points) {
  check_inputs(grid, points, bound, padding);
  const int64_t N = grid.size(0), C = grid.size(1), D = grid.size(2), H = grid.size(3), W = grid.size(4);
  const int64_t M = points.size(1);
  TORCH_CHECK_VALUE(grad_out.numel() == N * M * C, "sample_grid3d: grad_out has ", grad_out.numel(),
                    " elements, expected ", N * M * C);
  const auto acc = accumulate_type(grid);

  at::Tensor grad_grid_cl, grad_points_acc;
  if (need_grad_grid) grad_grid_cl = at::zeros({N, D, H, W, C}, grid.options().dtype(acc));
  if (need_grad_points) grad_points_acc = at::empty({N, M, 3}, points.options().dtype(acc));  // all written

  if ((need_grad_grid || need_grad_points) && N * M > 0) {
    const at::Tensor grid_cl = channels_last(grid);
    const at::Tensor pts = points.to(acc).contiguous();
    const at::Tensor go = grad_out.to(acc).contiguous();
    grid3d::BackwardArgs args{go.data_ptr(),
                              grid_cl.data_ptr(),
                              pts.data_ptr(),
                              need_grad_grid ? grad_grid_cl.data_ptr() : nullptr,
                              need_grad_points ? grad_points_acc.data_ptr() : nullptr,
                              N, M, C, D, H, W, bound, static_cast<int>(padding), kernel_dtype(grid, kOp, "grid")};
    if (uses_cuda_kernels(grid)) {
      HEAD4D_ON_CUDA(grid, "sample_grid3d", grid3d::backward_cuda(args, stream));
    } else {
      HEAD4D_ON_CPU(grid, "sample_grid3d", grid3d::backward_cpu(args, host_parallel_for(), at::get_num_threads()));
    }
  }

  at::Tensor grad_grid, grad_points;
  if (need_grad_grid) grad_grid = grad_grid_cl.permute({0, 4, 1, 2, 3}).to(grid.scalar_type());
  if (need_grad_points) grad_points = grad_points_acc.to(points.scalar_type());
  return {grad_grid, grad_points};
}

}  // namespace head4d
