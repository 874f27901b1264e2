// Host side of closest_triangles and surface_field_grid: checks, conversion to the
// accumulation type and int32 faces, the search order (Morton keys sorted with
// at::sort), scratch and output allocation, dispatch.
#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "../host_utils.h"
#include "../ops.h"
#include "closest_triangles.h"

namespace head4d {
namespace {

void check_mesh(const char* op, const char* name, const at::Tensor& verts, const at::Tensor& faces) {
  TORCH_CHECK_VALUE(verts.dim() == 3 && verts.size(2) == 3, op, ": ", name, " must have shape [N, V, 3], got ",
                    verts.sizes());
  TORCH_CHECK_VALUE(verts.size(1) >= 1 && verts.size(1) < (int64_t(1) << 31) - 1, op, ": ", name,
                    " needs 1 <= V < 2^31 - 1 vertices, got ", verts.size(1));
  kernel_dtype(verts, op, name);
  TORCH_CHECK_VALUE(faces.dim() == 2 && faces.size(1) == 3, op, ": faces must have shape [F, 3], got ",
                    faces.sizes());
  TORCH_CHECK_VALUE(faces.size(0) >= 1 && faces.size(0) < (int64_t(1) << 31) - 1, op,
                    ": faces must hold 1 <= F < 2^31 - 1 triangles, got ", faces.size(0));
  TORCH_CHECK_TYPE(faces.scalar_type() == at::kInt || faces.scalar_type() == at::kLong, op,
                   ": faces must be int32 or int64, got ", faces.scalar_type());
  TORCH_CHECK_VALUE(faces.device() == verts.device(), op, ": all tensors must be on one device, got ",
                    verts.device(), " and ", faces.device());
}

// The scratch of one call: per-face records and spheres in the search order, tile boxes.
struct Prepared {
  at::Tensor faces;  // [F, 3] int32
  at::Tensor records, spheres, tiles;
  int64_t T;
  int tile;
};

// verts: [N, V, 3] contiguous, accumulation type, N >= 1.
Prepared prepare(const at::Tensor& verts, const at::Tensor& faces, Dtype dtype) {
  Prepared out;
  const bool cuda = uses_cuda_kernels(verts);
  const int64_t N = verts.size(0), V = verts.size(1), F = faces.size(0);
  out.tile = cuda ? closest_triangles::kTileCuda : closest_triangles::kTileCpu;
  out.T = (F + out.tile - 1) / out.tile;
  out.faces = faces.to(at::kInt).contiguous();
  const auto bytes = verts.options().dtype(at::kByte);
  at::Tensor keys = at::empty({F}, verts.options().dtype(at::kLong));
  const closest_triangles::KeysArgs kargs{verts.data_ptr(), out.faces.data_ptr<int32_t>(), keys.data_ptr<int64_t>(), V, F,
                                dtype};
  out.records = at::empty({N * F * static_cast<int64_t>(closest_triangles::record_bytes(dtype))}, bytes);
  out.spheres = at::empty({N * F * static_cast<int64_t>(closest_triangles::sphere_bytes(dtype))}, bytes);
  out.tiles = at::empty({N * out.T * static_cast<int64_t>(closest_triangles::tile_bytes(dtype))}, bytes);
  if (cuda) {
    HEAD4D_ON_CUDA(verts, "closest_triangles", closest_triangles::keys_cuda(kargs, stream));
  } else {
    HEAD4D_ON_CPU(verts, "closest_triangles", closest_triangles::keys_cpu(kargs));
  }
  // keys are distinct (the face index is their low half): any sort gives this order
  const at::Tensor order = std::get<1>(at::sort(keys)).to(at::kInt).contiguous();
  const closest_triangles::PrepareArgs pargs{verts.data_ptr(), out.faces.data_ptr<int32_t>(), order.data_ptr<int32_t>(),
                                   out.records.data_ptr(), out.spheres.data_ptr(), out.tiles.data_ptr(),
                                   N, V, F, out.T, out.tile, dtype};
  if (cuda) {
    HEAD4D_ON_CUDA(verts, "closest_triangles", closest_triangles::prepare_cuda(pargs, stream));
  } else {
    HEAD4D_ON_CPU(verts, "closest_triangles", closest_triangles::prepare_cpu(pargs, host_parallel_for()));
  }
  return out;
}

void search(const at::Tensor& like, const closest_triangles::SearchArgs& args) {
  if (uses_cuda_kernels(like)) {
    HEAD4D_ON_CUDA(like, "closest_triangles", closest_triangles::search_cuda(args, stream));
  } else {
    HEAD4D_ON_CPU(like, "closest_triangles", closest_triangles::search_cpu(args, host_parallel_for()));
  }
}

}  // namespace

std::vector<at::Tensor> closest_triangles_forward(const at::Tensor& points, const at::Tensor& verts,
                                                  const at::Tensor& faces, bool values) {
  constexpr const char* op = "closest_triangles";
  TORCH_CHECK_VALUE(points.dim() == 3 && points.size(2) == 3, op, ": points must have shape [N, M, 3], got ",
                    points.sizes());
  check_mesh(op, "verts", verts, faces);
  TORCH_CHECK_VALUE(verts.size(0) == points.size(0), op, ": verts has batch size ", verts.size(0),
                    " but points has ", points.size(0));
  TORCH_CHECK_TYPE(verts.scalar_type() == points.scalar_type(), op, ": points and verts must have one dtype, got ",
                   points.scalar_type(), " and ", verts.scalar_type());
  TORCH_CHECK_VALUE(points.device() == verts.device(), op, ": all tensors must be on one device, got ",
                    points.device(), " and ", verts.device());
  check_kernel_device(points, op);
  const int64_t N = points.size(0), M = points.size(1), V = verts.size(1), F = faces.size(0);
  const auto dtype = points.scalar_type();
  const auto acc = accumulate_type(points);
  const auto acc_opts = points.options().dtype(acc);
  at::Tensor face_index = at::empty({N, M}, points.options().dtype(at::kLong));
  at::Tensor squared = at::empty({N, M}, acc_opts);
  at::Tensor bary, signed_distance;
  if (values) {
    bary = at::empty({N, M, 3}, acc_opts);
    signed_distance = at::empty({N, M}, acc_opts);
  }
  if (N * M > 0) {
    const at::Tensor pts = points.to(acc).contiguous();
    const at::Tensor vts = verts.to(acc).contiguous();
    const Dtype kd = kernel_dtype(pts, op, "points");
    const Prepared prep = prepare(vts, faces, kd);
    closest_triangles::SearchArgs args{pts.data_ptr(),
                             nullptr,
                             0,
                             prep.records.data_ptr(),
                             prep.spheres.data_ptr(),
                             prep.tiles.data_ptr(),
                             nullptr,
                             prep.faces.data_ptr<int32_t>(),
                             face_index.data_ptr<int64_t>(),
                             squared.data_ptr(),
                             values ? bary.data_ptr() : nullptr,
                             values ? signed_distance.data_ptr() : nullptr,
                             nullptr,
                             N, M, V, F, prep.T, prep.tile, kd};
    search(pts, args);
  }
  return {face_index, values ? bary.to(dtype) : at::Tensor(), values ? signed_distance.to(dtype) : at::Tensor(),
          squared.to(dtype)};
}

std::vector<at::Tensor> surface_field_grid_forward(const at::Tensor& verts_obs,
                                                   const std::optional<at::Tensor>& verts_canon,
                                                   const at::Tensor& faces, int64_t resolution, double bound) {
  constexpr const char* op = "surface_field_grid";
  check_mesh(op, "verts_obs", verts_obs, faces);
  const bool field = verts_canon.has_value() && verts_canon->defined();
  if (field) {
    TORCH_CHECK_VALUE(verts_canon->sizes() == verts_obs.sizes(), op, ": verts_canon has shape ",
                      verts_canon->sizes(), " but verts_obs has ", verts_obs.sizes());
    TORCH_CHECK_TYPE(verts_canon->scalar_type() == verts_obs.scalar_type(), op,
                     ": verts_obs and verts_canon must have one dtype");
    TORCH_CHECK_VALUE(verts_canon->device() == verts_obs.device(), op, ": all tensors must be on one device");
  }
  TORCH_CHECK_VALUE(resolution >= 1 && resolution <= 1290, op, ": resolution must lie in [1, 1290], got ",
                    resolution);
  check_kernel_device(verts_obs, op);
  const int64_t N = verts_obs.size(0), V = verts_obs.size(1), F = faces.size(0), R = resolution;
  const int64_t M = R * R * R;
  const auto dtype = verts_obs.scalar_type();
  const auto acc = accumulate_type(verts_obs);
  const auto acc_opts = verts_obs.options().dtype(acc);
  at::Tensor face_index = at::empty({N, M}, verts_obs.options().dtype(at::kLong));
  at::Tensor squared = at::empty({N, 1, R, R, R}, acc_opts);
  at::Tensor displacement;
  if (field) displacement = at::empty({N, 3, R, R, R}, acc_opts);
  if (N > 0) {
    // the reference's grid: torch.linspace(-bound, bound, R) in the accumulation type
    const at::Tensor grid = at::linspace(-bound, bound, R, acc_opts).contiguous();
    const at::Tensor vo = verts_obs.to(acc).contiguous();
    at::Tensor vc;
    if (field) vc = verts_canon->to(acc).contiguous();
    const Dtype kd = kernel_dtype(vo, op, "verts_obs");
    const Prepared prep = prepare(vo, faces, kd);
    closest_triangles::SearchArgs args{nullptr,
                             grid.data_ptr(),
                             R,
                             prep.records.data_ptr(),
                             prep.spheres.data_ptr(),
                             prep.tiles.data_ptr(),
                             field ? vc.data_ptr() : nullptr,
                             prep.faces.data_ptr<int32_t>(),
                             face_index.data_ptr<int64_t>(),
                             squared.data_ptr(),
                             nullptr,
                             nullptr,
                             field ? displacement.data_ptr() : nullptr,
                             N, M, V, F, prep.T, prep.tile, kd};
    search(vo, args);
  }
  return {face_index, field ? displacement.to(dtype) : at::Tensor(), squared.to(dtype)};
}

}  // namespace head4d
