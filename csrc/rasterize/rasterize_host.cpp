// Host side of the triangle rasterizer: checks, conversion of the inputs to what the
// kernels read (vertices in the computation type, faces as int32), allocation, dispatch.
// No gradient: the rasterizer's outputs are piecewise constant in the vertices.
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/ATen.h>

#include "../host_utils.h"
#include "../ops.h"
#include "rasterize.h"

namespace head4d {
namespace {

constexpr const char* kOp = "rasterize_triangles";

}  // namespace

std::vector<at::Tensor> rasterize_triangles_forward(const at::Tensor& vertices_clip, const at::Tensor& faces,
                                                    int64_t height, int64_t width, bool cull_backfaces) {
  TORCH_CHECK_VALUE(vertices_clip.dim() == 3 && vertices_clip.size(2) == 4,
                    "rasterize_triangles: vertices_clip must have shape [N, V, 4], got ", vertices_clip.sizes());
  TORCH_CHECK_VALUE(faces.dim() == 2 && faces.size(1) == 3, "rasterize_triangles: faces must have shape [F, 3], got ",
                    faces.sizes());
  TORCH_CHECK_TYPE(faces.scalar_type() == at::kInt || faces.scalar_type() == at::kLong,
                   "rasterize_triangles: faces must be int32 or int64, got ", faces.scalar_type());
  TORCH_CHECK_VALUE(vertices_clip.device() == faces.device(), "rasterize_triangles: vertices_clip on ",
                    vertices_clip.device(), " but faces on ", faces.device());
  TORCH_CHECK_VALUE(height >= 1 && width >= 1 && height <= std::numeric_limits<int>::max() / 2 &&
                        width <= std::numeric_limits<int>::max() / 2,
                    "rasterize_triangles: resolution must be two positive ints, got (", height, ", ", width, ")");
  TORCH_CHECK_VALUE(faces.size(0) < std::numeric_limits<int32_t>::max() &&
                        vertices_clip.size(1) <= std::numeric_limits<int32_t>::max(),
                    "rasterize_triangles: at most 2^31 - 2 faces and 2^31 - 1 vertices, got ", faces.size(0),
                    " faces and ", vertices_clip.size(1), " vertices");
  check_kernel_device(vertices_clip, kOp);
  kernel_dtype(vertices_clip, kOp, "vertices_clip");  // a TypeError unless floating
  const at::ScalarType compute = accumulate_type(vertices_clip);
  const at::Tensor vertices = vertices_clip.to(compute).contiguous();
  const at::Tensor faces32 = faces.to(at::kInt).contiguous();
  const int64_t N = vertices.size(0), V = vertices.size(1), F = faces32.size(0);

  at::Tensor face_index = at::empty({N, height, width}, vertices.options().dtype(at::kLong));
  at::Tensor barycentric = at::empty({N, height, width, 3}, vertices.options());
  at::Tensor depth = at::empty({N, height, width}, vertices.options());
  at::Tensor keys = at::empty({N, height, width}, vertices.options().dtype(at::kLong));
  rasterize::Args args{vertices.data_ptr(),
                       faces32.data_ptr<int32_t>(),
                       face_index.data_ptr<int64_t>(),
                       barycentric.data_ptr(),
                       depth.data_ptr(),
                       reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
                       N,
                       V,
                       F,
                       static_cast<int>(height),
                       static_cast<int>(width),
                       cull_backfaces,
                       compute == at::kDouble ? Dtype::kFloat64 : Dtype::kFloat32};
  if (uses_cuda_kernels(vertices)) {
    HEAD4D_ON_CUDA(vertices, kOp, rasterize::forward_cuda(args, stream));
  } else {
    HEAD4D_ON_CPU(vertices, kOp, rasterize::forward_cpu(args, host_parallel_for()));
  }
  return {face_index, barycentric, depth};
}

}  // namespace head4d
