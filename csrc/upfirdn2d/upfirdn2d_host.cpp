// Host side of upfirdn2d: checks, the filter prepared for the kernels, allocation,
// dispatch. The gradient needs no kernel of its own: it is upfirdn2d of the output
// gradient with up and down swapped (head4d/ops/_library.py).
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/ATen.h>

#include "../host_utils.h"
#include "../ops.h"
#include "upfirdn2d.h"

namespace head4d {
namespace {

constexpr const char* kOp = "upfirdn2d";

int checked_int(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value >= std::numeric_limits<int>::min() && value <= std::numeric_limits<int>::max(),
                    "upfirdn2d: ", name, " out of range: ", value);
  return static_cast<int>(value);
}

}  // namespace

at::Tensor upfirdn2d_forward(const at::Tensor& x, const at::Tensor& f, int64_t upx, int64_t upy, int64_t downx,
                             int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1,
                             bool flip_filter, double gain) {
  TORCH_CHECK_VALUE(x.dim() == 4, "upfirdn2d: x must have shape [N, C, H, W], got ", x.sizes());
  TORCH_CHECK_VALUE(f.dim() == 1 || f.dim() == 2, "upfirdn2d: f must have shape [fh, fw] or [fw], got ", f.sizes());
  TORCH_CHECK_VALUE(f.numel() > 0, "upfirdn2d: f must not be empty");
  TORCH_CHECK_TYPE(at::isFloatingType(f.scalar_type()), "upfirdn2d: f must be floating point, got ",
                   f.scalar_type());
  TORCH_CHECK_VALUE(x.device() == f.device(), "upfirdn2d: x on ", x.device(), " but f on ", f.device());
  TORCH_CHECK_VALUE(upx >= 1 && upy >= 1 && downx >= 1 && downy >= 1,
                    "upfirdn2d: up and down must be >= 1, got up (", upx, ", ", upy, "), down (", downx, ", ",
                    downy, ")");
  TORCH_CHECK_VALUE(std::isfinite(gain), "upfirdn2d: gain must be finite, got ", gain);
  TORCH_CHECK_VALUE(f.dim() == 2 || gain >= 0, "upfirdn2d: a 1-D filter needs gain >= 0, got ", gain);
  const Dtype dtype = kernel_dtype(x, kOp, "x");
  const int64_t fh = f.size(0), fw = f.size(-1);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = (H * upy + pady0 + pady1 - fh) / downy + 1;
  const int64_t OW = (W * upx + padx0 + padx1 - fw) / downx + 1;
  TORCH_CHECK_VALUE(H * upy + pady0 + pady1 >= fh && W * upx + padx0 + padx1 >= fw,
                    "upfirdn2d: the padded input (", H * upy + pady0 + pady1, " x ", W * upx + padx0 + padx1,
                    ") is smaller than the filter (", fh, " x ", fw, ")");
  at::Tensor out = at::empty({N, C, OH, OW}, x.options());
  if (out.numel() == 0) return out;

  // the gain ** (ndim / 2) in the filter's dtype (as the reference scales it), then the
  // accumulation type; the kernels correlate, so flip the filter for a true convolution
  at::Tensor taps = (f * std::pow(gain, f.dim() / 2.0)).to(accumulate_type(x));
  if (!flip_filter) taps = taps.flip(f.dim() == 1 ? std::vector<int64_t>{0} : std::vector<int64_t>{0, 1});
  taps = taps.contiguous();
  const at::Tensor input = x.contiguous();

  upfirdn2d::Geometry geometry{N * C,
                               H,
                               W,
                               OH,
                               OW,
                               checked_int(upx, "up"),
                               checked_int(upy, "up"),
                               checked_int(downx, "down"),
                               checked_int(downy, "down"),
                               checked_int(padx0, "padding"),
                               checked_int(pady0, "padding"),
                               checked_int(fh, "f size"),
                               checked_int(fw, "f size"),
                               f.dim() == 1};
  upfirdn2d::Args args{input.data_ptr(), taps.data_ptr(), out.data_ptr(), geometry, dtype};
  if (uses_cuda_kernels(x)) {
    HEAD4D_ON_CUDA(x, "upfirdn2d", upfirdn2d::forward_cuda(args, stream));
  } else {
    HEAD4D_ON_CPU(x, "upfirdn2d", upfirdn2d::forward_cpu(args, host_parallel_for()));
  }
  return out;
}

}  // namespace head4d
