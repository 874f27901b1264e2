// Host side of one_ring_deform: checks, conversion to the accumulation type and int32
// indices, allocation, dispatch.
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../host_utils.h"
#include "../ops.h"
#include "onering.h"

namespace head4d {
namespace {

constexpr const char* kOp = "one_ring_deform";

void check_inputs(const at::Tensor& points, const at::Tensor& verts_obs, const at::Tensor& verts_canon,
                  const at::Tensor& neighbours, const std::optional<at::Tensor>& subset) {
  TORCH_CHECK_VALUE(points.dim() == 3 && points.size(2) == 3, "one_ring_deform: points must have shape [N, M, 3], got ",
                    points.sizes());
  TORCH_CHECK_VALUE(verts_obs.dim() == 3 && verts_obs.size(2) == 3 && verts_obs.size(0) == points.size(0),
                    "one_ring_deform: verts_obs must have shape [N, V, 3] with N = ", points.size(0), ", got ",
                    verts_obs.sizes());
  TORCH_CHECK_VALUE(verts_canon.sizes() == verts_obs.sizes(), "one_ring_deform: verts_canon has shape ",
                    verts_canon.sizes(), " but verts_obs has ", verts_obs.sizes());
  const int64_t V = verts_obs.size(1);
  TORCH_CHECK_VALUE(V >= 1 && V < (int64_t(1) << 31) - 1, "one_ring_deform: needs 1 <= V < 2^31 - 1 vertices, got ", V);
  TORCH_CHECK_VALUE(neighbours.dim() == 2 && neighbours.size(0) == V && neighbours.size(1) >= 1,
                    "one_ring_deform: neighbours must have shape [V, K] with V = ", V, " and K >= 1, got ",
                    neighbours.sizes());
  TORCH_CHECK_TYPE(neighbours.scalar_type() == at::kInt || neighbours.scalar_type() == at::kLong,
                   "one_ring_deform: neighbours must be int32 or int64, got ", neighbours.scalar_type());
  TORCH_CHECK_TYPE(verts_obs.scalar_type() == points.scalar_type() && verts_canon.scalar_type() == points.scalar_type(),
                   "one_ring_deform: points, verts_obs and verts_canon must have one dtype");
  kernel_dtype(points, kOp, "points");
  std::vector<const at::Tensor*> all{&verts_obs, &verts_canon, &neighbours};
  if (subset.has_value()) {
    const at::Tensor& s = *subset;
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) >= 1, "one_ring_deform: vertex_subset must have shape [S], S >= 1, got ",
                      s.sizes());
    TORCH_CHECK_TYPE(s.scalar_type() == at::kInt || s.scalar_type() == at::kLong,
                     "one_ring_deform: vertex_subset must be int32 or int64, got ", s.scalar_type());
    all.push_back(&s);
  }
  for (const at::Tensor* t : all)
    TORCH_CHECK_VALUE(t->device() == points.device(), "one_ring_deform: all tensors must be on one device, got ",
                      points.device(), " and ", t->device());
}

at::Tensor int32_contiguous(const at::Tensor& t) { return t.to(at::kInt).contiguous(); }

}  // namespace

std::vector<at::Tensor> one_ring_deform_forward(const at::Tensor& points, const at::Tensor& verts_obs,
                                                const at::Tensor& verts_canon, const at::Tensor& neighbours,
                                                const std::optional<at::Tensor>& vertex_subset) {
  check_inputs(points, verts_obs, verts_canon, neighbours, vertex_subset);
  const int64_t N = points.size(0), M = points.size(1), V = verts_obs.size(1), K = neighbours.size(1);
  const auto acc = accumulate_type(points);
  at::Tensor out = at::empty({N, M, 3}, points.options().dtype(acc));
  at::Tensor nearest = at::empty({N, M}, points.options().dtype(at::kInt));
  if (N * M == 0) return {out.to(points.scalar_type()), nearest};

  const at::Tensor pts = points.to(acc).contiguous();
  const at::Tensor vo = verts_obs.to(acc).contiguous();
  const at::Tensor vc = verts_canon.to(acc).contiguous();
  const at::Tensor nb = int32_contiguous(neighbours);
  at::Tensor subset;
  if (vertex_subset.has_value()) subset = int32_contiguous(*vertex_subset);
  const int64_t S = subset.defined() ? subset.size(0) : V;

  onering::ForwardArgs args{pts.data_ptr(),  vo.data_ptr(),
                            vc.data_ptr(),   nb.data_ptr<int32_t>(),
                            subset.defined() ? subset.data_ptr<int32_t>() : nullptr,
                            out.data_ptr(),  nearest.data_ptr<int32_t>(),
                            N, M, V, K, S,   kernel_dtype(pts, kOp, "points")};
  if (uses_cuda_kernels(points)) {
    HEAD4D_ON_CUDA(points, "one_ring_deform", onering::forward_cuda(args, stream));
  } else {
    HEAD4D_ON_CPU(points, "one_ring_deform", onering::forward_cpu(args, host_parallel_for()));
  }
  return {out.to(points.scalar_type()), nearest};
}

std::vector<at::Tensor> one_ring_deform_backward(const at::Tensor& grad_out, const at::Tensor& points,
                                                 const at::Tensor& verts_obs, const at::Tensor& verts_canon,
                                                 const at::Tensor& neighbours, const at::Tensor& nearest,
                                                 bool need_points, bool need_verts_obs, bool need_verts_canon) {
  check_inputs(points, verts_obs, verts_canon, neighbours, std::nullopt);
  const int64_t N = points.size(0), M = points.size(1), V = verts_obs.size(1), K = neighbours.size(1);
  TORCH_CHECK_VALUE(grad_out.numel() == N * M * 3, "one_ring_deform: grad_out has ", grad_out.numel(),
                    " elements, expected ", N * M * 3);
  TORCH_CHECK_VALUE(nearest.numel() == N * M && nearest.scalar_type() == at::kInt &&
                        nearest.device() == points.device(),
                    "one_ring_deform: nearest does not match the points (the forward's int32 [N, M])");
  const auto acc = accumulate_type(points);
  const auto acc_opts = points.options().dtype(acc);
  at::Tensor grad_points, grad_obs, grad_canon;
  if (need_points) grad_points = at::empty({N, M, 3}, acc_opts);  // every element written
  if (need_verts_obs) grad_obs = at::zeros({N, V, 3}, acc_opts);
  if (need_verts_canon) grad_canon = at::zeros({N, V, 3}, acc_opts);

  if ((need_points || need_verts_obs || need_verts_canon) && N * M > 0) {
    const at::Tensor go = grad_out.to(acc).contiguous();
    const at::Tensor pts = points.to(acc).contiguous();
    const at::Tensor vo = verts_obs.to(acc).contiguous();
    const at::Tensor vc = verts_canon.to(acc).contiguous();
    const at::Tensor nb = int32_contiguous(neighbours);
    const at::Tensor near = nearest.contiguous();
    onering::BackwardArgs args{go.data_ptr(),
                               pts.data_ptr(),
                               vo.data_ptr(),
                               vc.data_ptr(),
                               nb.data_ptr<int32_t>(),
                               near.data_ptr<int32_t>(),
                               need_points ? grad_points.data_ptr() : nullptr,
                               need_verts_obs ? grad_obs.data_ptr() : nullptr,
                               need_verts_canon ? grad_canon.data_ptr() : nullptr,
                               N, M, V, K, kernel_dtype(pts, kOp, "points")};
    if (uses_cuda_kernels(points)) {
      HEAD4D_ON_CUDA(points, "one_ring_deform", onering::backward_cuda(args, stream));
    } else {
      HEAD4D_ON_CPU(points, "one_ring_deform", onering::backward_cpu(args, host_parallel_for(), at::get_num_threads()));
    }
  }

  const auto dtype = points.scalar_type();
  return {need_points ? grad_points.to(dtype) : at::Tensor(), need_verts_obs ? grad_obs.to(dtype) : at::Tensor(),
          need_verts_canon ? grad_canon.to(dtype) : at::Tensor()};
}

}  // namespace head4d
