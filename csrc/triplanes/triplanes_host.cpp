// Host side of sample_triplanes: checks, layout conversion, allocation, dispatch.
#include <cstdint>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../host_utils.h"
#include "../ops.h"
#include "triplanes.h"

namespace head4d {
namespace {

void check_inputs(const at::Tensor& planes, const at::Tensor& points, int64_t layout, int64_t reduce) {
  TORCH_CHECK_VALUE(planes.dim() == 5 && planes.size(1) == 3,
                    "sample_triplanes: planes must have shape [N, 3, C, H, W], got ", planes.sizes());
  TORCH_CHECK_VALUE(points.dim() == 3 && points.size(2) == 3,
                    "sample_triplanes: points must have shape [N, M, 3], got ", points.sizes());
  TORCH_CHECK_VALUE(points.size(0) == planes.size(0), "sample_triplanes: points batch ", points.size(0),
                    " does not match planes batch ", planes.size(0));
  TORCH_CHECK_TYPE(at::isFloatingType(points.scalar_type()), "sample_triplanes: points must be floating point, got ",
                   points.scalar_type());
  TORCH_CHECK_VALUE(planes.device() == points.device(), "sample_triplanes: planes on ", planes.device(),
                    " but points on ", points.device());
  TORCH_CHECK_VALUE(layout == triplanes::kPortrait4D || layout == triplanes::kEG3D,
                    "sample_triplanes: unknown layout ", layout);
  TORCH_CHECK_VALUE(reduce >= triplanes::kMean && reduce <= triplanes::kNone, "sample_triplanes: unknown reduce ",
                    reduce);
  TORCH_CHECK_VALUE(planes.size(2) <= INT32_MAX && planes.size(3) <= INT32_MAX && planes.size(4) <= INT32_MAX,
                    "sample_triplanes: plane sizes must fit in 32 bits");
}

// [N, 3, C, H, W] -> a contiguous [N, 3, H, W, C]; free when planes are channels-last
// already. Contiguous CPU planes go through a blocked, parallel transpose (about twice
// as fast as a generic strided copy on the CPU).
at::Tensor channels_last(const at::Tensor& planes) {
  const at::Tensor permuted = planes.permute({0, 1, 3, 4, 2});
  if (permuted.is_contiguous()) return permuted;
  if (planes.is_cpu() && planes.is_contiguous()) {
    const int64_t N = planes.size(0), C = planes.size(2), H = planes.size(3), W = planes.size(4);
    at::Tensor out = at::empty({N, 3, H, W, C}, planes.options());
    triplanes::to_channels_last_cpu(planes.data_ptr(), out.data_ptr(), N * 3, C, H, W,
                                    static_cast<int>(planes.element_size()), host_parallel_for());
    return out;
  }
  return permuted.contiguous();
}


}  // namespace

at::Tensor sample_triplanes_forward(const at::Tensor& planes, const at::Tensor& points, double scale,
                                    int64_t layout, int64_t reduce) {
  check_inputs(planes, points, layout, reduce);
  const int64_t N = planes.size(0), C = planes.size(2), H = planes.size(3), W = planes.size(4);
  const int64_t M = points.size(1);
  const at::Tensor planes_cl = channels_last(planes);
  const at::Tensor pts = points.to(accumulate_type(planes)).contiguous();
  at::Tensor out = reduce == triplanes::kNone ? at::empty({N, 3, M, C}, planes.options())
                                               : at::empty({N, M, C}, planes.options());
  if (out.numel() == 0) return out;

  triplanes::ForwardArgs args{planes_cl.data_ptr(), pts.data_ptr(), out.data_ptr(), N, M, C, H, W,
                              scale, static_cast<int>(layout), static_cast<int>(reduce), kernel_dtype(planes, "sample_triplanes", "planes")};
  if (uses_cuda_kernels(planes)) {
    const bool vec = (C * planes.element_size()) % 16 == 0 && is_aligned16(args.planes) && is_aligned16(args.out);
    HEAD4D_ON_CUDA(planes, "sample_triplanes", triplanes::forward_cuda(args, stream, vec));
  } else {
    HEAD4D_ON_CPU(planes, "sample_triplanes", triplanes::forward_cpu(args, host_parallel_for(), at::get_num_threads()));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> sample_triplanes_backward(const at::Tensor& grad_out,
                                                             const at::Tensor& planes,
                                                             const at::Tensor& points, double scale,
                                                             int64_t layout, int64_t reduce,
                                                             bool need_grad_planes,
                                                             bool need_grad_points) {
  check_inputs(planes, points, layout, reduce);
  const int64_t N = planes.size(0), C = planes.size(2), H = planes.size(3), W = planes.size(4);
  const int64_t M = points.size(1);
  const auto acc = accumulate_type(planes);
  const at::Tensor planes_cl = channels_last(planes);
  const at::Tensor pts = points.to(acc).contiguous();
  const at::Tensor go = grad_out.to(planes.scalar_type()).contiguous();
  const int64_t expected = reduce == triplanes::kNone ? N * 3 * M * C : N * M * C;
  TORCH_CHECK_VALUE(go.numel() == expected, "sample_triplanes: grad_out has ", go.numel(),
                    " elements, expected ", expected);

  at::Tensor grad_planes_cl, grad_points_acc;
  if (need_grad_planes) grad_planes_cl = at::zeros({N, 3, H, W, C}, planes.options().dtype(acc));
  if (need_grad_points) grad_points_acc = at::zeros({N, M, 3}, points.options().dtype(acc));

  if ((need_grad_planes || need_grad_points) && N * M > 0) {
    triplanes::BackwardArgs args{go.data_ptr(),
                                 planes_cl.data_ptr(),
                                 pts.data_ptr(),
                                 need_grad_planes ? grad_planes_cl.data_ptr() : nullptr,
                                 need_grad_points ? grad_points_acc.data_ptr() : nullptr,
                                 N, M, C, H, W, scale, static_cast<int>(layout), static_cast<int>(reduce),
                                 kernel_dtype(planes, "sample_triplanes", "planes")};
    if (uses_cuda_kernels(planes)) {
      const bool vec =
          (C * planes.element_size()) % 16 == 0 && is_aligned16(args.planes) && is_aligned16(args.grad_out);
      HEAD4D_ON_CUDA(planes, "sample_triplanes", triplanes::backward_cuda(args, stream, vec));
    } else {
      HEAD4D_ON_CPU(planes, "sample_triplanes",
          triplanes::backward_cpu(args, host_parallel_for(), at::get_num_threads()));
    }
  }

  at::Tensor grad_planes, grad_points;
  if (need_grad_planes) grad_planes = grad_planes_cl.permute({0, 1, 4, 2, 3}).to(planes.scalar_type());
  if (need_grad_points) grad_points = grad_points_acc.to(points.scalar_type());
  return {grad_planes, grad_points};
}

bool with_cuda() {
#ifdef HEAD4D_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool cuda_emulated() {
#ifdef HEAD4D_CUDA_EMULATION
  return true;
#else
  return false;
#endif
}

}  // namespace head4d
