// Host side of decode_triplanes: checks, planes relayout, conversions, allocation,
// dispatch, and (CUDA) the weight gradients as matrix products over chunks of points.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../host_utils.h"
#include "../ops.h"
#include "../triplanes/triplanes.h"
#include "decoding.h"

namespace head4d {
namespace {

constexpr const char* kOp = "decode_triplanes";

// Points per CUDA backward chunk: bounds the buffers of per-point vectors (f, h, dL/dz,
// dL/do: 193 floats per point at C 32, Hd 64, O 33, so about 50 MB).
constexpr int64_t kChunkPoints = int64_t(1) << 16;

struct Sizes {
  int64_t N, M, C, H, W, hidden, outputs;
};

Sizes check_inputs(const at::Tensor& planes, const at::Tensor& points, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, int64_t layout) {
  TORCH_CHECK_VALUE(planes.dim() == 5 && planes.size(1) == 3, kOp, ": planes must have shape [N, 3, C, H, W], got ",
                    planes.sizes());
  TORCH_CHECK_VALUE(points.dim() == 3 && points.size(2) == 3, kOp, ": points must have shape [N, M, 3], got ",
                    points.sizes());
  TORCH_CHECK_VALUE(points.size(0) == planes.size(0), kOp, ": points batch ", points.size(0),
                    " does not match planes batch ", planes.size(0));
  const int64_t C = planes.size(2);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == C, kOp, ": weight1 must have shape [hidden, C] with C = ", C,
                    ", got ", w1.sizes());
  const int64_t hidden = w1.size(0);
  TORCH_CHECK_VALUE(b1.dim() == 1 && b1.size(0) == hidden, kOp, ": bias1 must have shape [", hidden, "], got ",
                    b1.sizes());
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(1) == hidden && w2.size(0) >= 1, kOp,
                    ": weight2 must have shape [1 + Co, hidden] with hidden = ", hidden, ", got ", w2.sizes());
  const int64_t outputs = w2.size(0);
  TORCH_CHECK_VALUE(b2.dim() == 1 && b2.size(0) == outputs, kOp, ": bias2 must have shape [", outputs, "], got ",
                    b2.sizes());
  TORCH_CHECK_VALUE(C >= 1 && C <= decoding::kMaxFeatures, kOp, ": planes must have 1 to ",
                    decoding::kMaxFeatures, " channels, got ", C);
  TORCH_CHECK_VALUE(hidden >= 1 && hidden <= decoding::kMaxHidden, kOp, ": hidden size must be 1 to ",
                    decoding::kMaxHidden, ", got ", hidden);
  TORCH_CHECK_VALUE(outputs <= decoding::kMaxOutputs, kOp, ": weight2 must have at most ", decoding::kMaxOutputs,
                    " rows (1 + Co), got ", outputs);
  for (const at::Tensor* t : {&points, &w1, &b1, &w2, &b2}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), kOp, ": inputs must be floating point, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == planes.device(), kOp, ": planes on ", planes.device(), " but an input on ",
                      t->device());
  }
  TORCH_CHECK_VALUE(layout == triplanes::kPortrait4D || layout == triplanes::kEG3D, kOp, ": unknown layout ",
                    layout);
  TORCH_CHECK_VALUE(planes.size(3) >= 1 && planes.size(4) >= 1 && planes.size(3) <= INT32_MAX &&
                        planes.size(4) <= INT32_MAX,
                    kOp, ": plane sizes must be positive and fit in 32 bits");
  return {planes.size(0), points.size(1), C, planes.size(3), planes.size(4), hidden, outputs};
}


// [N, 3, C, H, W] -> a contiguous [N, 3, H, W, Cs] (channels Cs > C zero-filled);
// free when the planes are channels-last already (and, on CUDA, 16-byte aligned).
at::Tensor relayout(const at::Tensor& planes, int64_t Cs) {
  const int64_t N = planes.size(0), C = planes.size(2), H = planes.size(3), W = planes.size(4);
  const at::Tensor permuted = planes.permute({0, 1, 3, 4, 2});
  if (Cs == C) {
    if (permuted.is_contiguous()) {
      if (!uses_cuda_kernels(planes) || is_aligned16(permuted.data_ptr())) return permuted;
      return permuted.clone(at::MemoryFormat::Contiguous);
    }
    if (planes.is_cpu() && planes.is_contiguous()) {
      at::Tensor out = at::empty({N, 3, H, W, C}, planes.options());
      triplanes::to_channels_last_cpu(planes.data_ptr(), out.data_ptr(), N * 3, C, H, W,
                                      static_cast<int>(planes.element_size()), host_parallel_for());
      return out;
    }
    return permuted.contiguous();
  }
  at::Tensor out = at::zeros({N, 3, H, W, Cs}, planes.options());
  out.narrow(4, 0, C).copy_(permuted);
  return out;
}

struct Prepared {
  at::Tensor planes, points, w1, b1, w2, b2;
  int64_t Cs;
  Dtype dtype;
  decoding::Weights weights() const { return {w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr()}; }
};

Prepared prepare(const at::Tensor& planes, const at::Tensor& points, const at::Tensor& w1, const at::Tensor& b1,
                 const at::Tensor& w2, const at::Tensor& b2, const Sizes& s) {
  TORCH_CHECK_VALUE(planes.is_cpu() || planes.is_cuda(), kOp, ": unsupported device ", planes.device());
  Prepared p;
  p.dtype = kernel_dtype(planes, kOp, "planes");
  p.Cs = uses_cuda_kernels(planes) ? decoding::cuda_channel_stride(s.C, p.dtype) : s.C;
  const auto acc = accumulate_type(planes);
  p.planes = relayout(planes, p.Cs);
  p.points = points.to(acc).contiguous();
  p.w1 = w1.to(acc).contiguous();
  p.b1 = b1.to(acc).contiguous();
  p.w2 = w2.to(acc).contiguous();
  p.b2 = b2.to(acc).contiguous();
  return p;
}

#ifdef HEAD4D_WITH_CUDA
// The CUDA backward: the kernels write the planes' and points' gradients; the weight
// gradients (those of gw1, gb1, gw2, gb2 that are defined) are sums over points of
// per-point vectors, which the kernels write a chunk of points at a time for matrix
// products to reduce.
void backward_cuda_with_weight_grads(decoding::BackwardArgs args, int64_t total, const at::TensorOptions& acc_opts,
                                     at::Tensor& gw1, at::Tensor& gb1, at::Tensor& gw2, at::Tensor& gb2,
                                     void* stream) {
  const bool need_w1 = gw1.defined(), need_b1 = gb1.defined(), need_w2 = gw2.defined(), need_b2 = gb2.defined();
  args.grad_w1 = args.grad_b1 = args.grad_w2 = args.grad_b2 = nullptr;
  if (!(need_w1 || need_b1 || need_w2 || need_b2)) {
    decoding::backward_cuda(args, decoding::ChunkBuffers{nullptr, nullptr, nullptr, nullptr, 0}, 0, total, stream);
    return;
  }
  auto ptr = [](const at::Tensor& t) -> void* { return t.defined() ? t.data_ptr() : nullptr; };
  const int64_t P = std::min(total, kChunkPoints);
  at::Tensor buf_f, buf_h, buf_gz, buf_go;
  if (need_w1) buf_f = at::empty({gw1.size(1), P}, acc_opts);
  if (need_w2) buf_h = at::empty({gw2.size(1), P}, acc_opts);
  if (need_w1 || need_b1) buf_gz = at::empty({args.hidden, P}, acc_opts);
  if (need_w2 || need_b2) buf_go = at::empty({args.outputs, P}, acc_opts);
  const decoding::ChunkBuffers chunk{ptr(buf_f), ptr(buf_h), ptr(buf_gz), ptr(buf_go), P};
  for (int64_t begin = 0; begin < total; begin += P) {
    const int64_t len = std::min(P, total - begin);
    decoding::backward_cuda(args, chunk, begin, begin + len, stream);
    // sums over the chunk's points: grad W1 += dL/dz f^T, grad W2 += dL/do h^T
    if (need_w1) gw1.addmm_(buf_gz.narrow(1, 0, len), buf_f.narrow(1, 0, len).t());
    if (need_b1) gb1.add_(buf_gz.narrow(1, 0, len).sum(1));
    if (need_w2) gw2.addmm_(buf_go.narrow(1, 0, len), buf_h.narrow(1, 0, len).t());
    if (need_b2) gb2.add_(buf_go.narrow(1, 0, len).sum(1));
  }
}
#endif

}  // namespace

std::vector<at::Tensor> decode_triplanes_forward(const at::Tensor& planes, const at::Tensor& points,
                                                 const at::Tensor& weight1, const at::Tensor& bias1,
                                                 const at::Tensor& weight2, const at::Tensor& bias2, double scale,
                                                 int64_t layout) {
  const Sizes s = check_inputs(planes, points, weight1, bias1, weight2, bias2, layout);
  at::Tensor rgb = at::empty({s.N, s.M, s.outputs - 1}, planes.options());
  at::Tensor sigma = at::empty({s.N, s.M, 1}, planes.options());
  if (s.N * s.M == 0) return {rgb, sigma};
  const Prepared p = prepare(planes, points, weight1, bias1, weight2, bias2, s);
  decoding::ForwardArgs args{p.planes.data_ptr(), p.points.data_ptr(), p.weights(), rgb.data_ptr(),
                             sigma.data_ptr(), s.N, s.M, s.C, s.H, s.W, s.hidden, s.outputs,
                             scale, static_cast<int>(layout), p.dtype};
  if (uses_cuda_kernels(planes)) {
    HEAD4D_ON_CUDA(planes, kOp, decoding::forward_cuda(args, stream));
  } else {
    HEAD4D_ON_CPU(planes, kOp, decoding::forward_cpu(args, host_parallel_for()));
  }
  return {rgb, sigma};
}

std::vector<at::Tensor> decode_triplanes_backward(const std::optional<at::Tensor>& grad_rgb,
                                                  const std::optional<at::Tensor>& grad_sigma,
                                                  const at::Tensor& planes, const at::Tensor& points,
                                                  const at::Tensor& weight1, const at::Tensor& bias1,
                                                  const at::Tensor& weight2, const at::Tensor& bias2, double scale,
                                                  int64_t layout, bool need_planes, bool need_points, bool need_w1,
                                                  bool need_b1, bool need_w2, bool need_b2) {
  const Sizes s = check_inputs(planes, points, weight1, bias1, weight2, bias2, layout);
  const auto acc = accumulate_type(planes);
  const auto acc_opts = planes.options().dtype(acc);
  at::Tensor g_rgb, g_sigma;
  if (grad_rgb.has_value() && grad_rgb->defined()) {
    TORCH_CHECK_VALUE(grad_rgb->numel() == s.N * s.M * (s.outputs - 1), kOp, ": grad_rgb has ",
                      grad_rgb->numel(), " elements, expected ", s.N * s.M * (s.outputs - 1));
    g_rgb = grad_rgb->to(acc).contiguous();
  }
  if (grad_sigma.has_value() && grad_sigma->defined()) {
    TORCH_CHECK_VALUE(grad_sigma->numel() == s.N * s.M, kOp, ": grad_sigma has ", grad_sigma->numel(),
                      " elements, expected ", s.N * s.M);
    g_sigma = grad_sigma->to(acc).contiguous();
  }
  const bool need_any = need_planes || need_points || need_w1 || need_b1 || need_w2 || need_b2;
  const bool run = need_any && s.N * s.M > 0 && (g_rgb.defined() || g_sigma.defined());
  const int64_t Cs = uses_cuda_kernels(planes) ? decoding::cuda_channel_stride(s.C, kernel_dtype(planes, kOp, "planes"))
                                      : s.C;

  at::Tensor grad_planes_cl, grad_points, gw1, gb1, gw2, gb2;
  if (need_planes) grad_planes_cl = at::zeros({s.N, 3, s.H, s.W, Cs}, acc_opts);
  if (need_points) grad_points = at::zeros({s.N, s.M, 3}, acc_opts);
  if (need_w1) gw1 = at::zeros({s.hidden, s.C}, acc_opts);
  if (need_b1) gb1 = at::zeros({s.hidden}, acc_opts);
  if (need_w2) gw2 = at::zeros({s.outputs, s.hidden}, acc_opts);
  if (need_b2) gb2 = at::zeros({s.outputs}, acc_opts);

  if (run) {
    const Prepared p = prepare(planes, points, weight1, bias1, weight2, bias2, s);
    auto ptr = [](const at::Tensor& t) -> void* { return t.defined() ? t.data_ptr() : nullptr; };
    decoding::BackwardArgs args{ptr(g_rgb), ptr(g_sigma), p.planes.data_ptr(), p.points.data_ptr(), p.weights(),
                                ptr(grad_planes_cl), ptr(grad_points), ptr(gw1), ptr(gb1), ptr(gw2), ptr(gb2),
                                s.N, s.M, s.C, s.H, s.W, s.hidden, s.outputs, scale, static_cast<int>(layout),
                                p.dtype};
    if (uses_cuda_kernels(planes)) {
      HEAD4D_ON_CUDA(planes, kOp,
                     backward_cuda_with_weight_grads(args, s.N * s.M, acc_opts, gw1, gb1, gw2, gb2, stream));
    } else {
      HEAD4D_ON_CPU(planes, kOp, decoding::backward_cpu(args, host_parallel_for(), at::get_num_threads()));
    }
  }

  std::vector<at::Tensor> out(6);
  if (need_planes) out[0] = grad_planes_cl.narrow(4, 0, s.C).permute({0, 1, 4, 2, 3}).to(planes.scalar_type());
  if (need_points) out[1] = grad_points.to(points.scalar_type());
  if (need_w1) out[2] = gw1.to(weight1.scalar_type());
  if (need_b1) out[3] = gb1.to(bias1.scalar_type());
  if (need_w2) out[4] = gw2.to(weight2.scalar_type());
  if (need_b2) out[5] = gb2.to(bias2.scalar_type());
  return out;
}

}  // namespace head4d
