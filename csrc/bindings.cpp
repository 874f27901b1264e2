// The one Python binding of head4d's compiled ops: the module head4d._C.
// Only this file includes torch's pybind11 support (torch/csrc/utils/pybind.h: the
// Tensor type casters, a lighter include than torch/extension.h, which compiles 40%
// slower); the op host files include ATen alone and the kernel files no torch header.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

#include "ops.h"

#ifdef HEAD4D_CUDA_EMULATION
namespace head4d {
namespace emulation_selftest {
std::vector<float> run(const std::string& kernel, const std::vector<float>& input, int threads);
}  // namespace emulation_selftest
}  // namespace head4d
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "head4d's compiled CPU and CUDA kernels (see head4d.ops for the public API)";
  m.def("with_cuda", &head4d::with_cuda, "Whether this build contains the CUDA kernels.");
  m.def("cuda_emulated", &head4d::cuda_emulated,
        "Whether this is the emulated build: the CUDA kernels compiled as host code, run on CPU tensors.");
#ifdef HEAD4D_CUDA_EMULATION
  m.def("emulation_selftest", &head4d::emulation_selftest::run, py::arg("kernel"), py::arg("input"),
        py::arg("threads"), "Runs one of the emulation's own test kernels (csrc/cuda_emulation/selftest_kernels.cu).");
#endif
  m.def("sample_triplanes_forward", &head4d::sample_triplanes_forward, py::arg("planes"), py::arg("points"),
        py::arg("scale"), py::arg("layout"), py::arg("reduce"),
        "planes [N,3,C,H,W], points [N,M,3] -> features [N,M,C] or [N,3,M,C] (reduce none).");
  m.def("sample_triplanes_backward", &head4d::sample_triplanes_backward, py::arg("grad_out"), py::arg("planes"),
        py::arg("points"), py::arg("scale"), py::arg("layout"), py::arg("reduce"),
        py::arg("need_grad_planes"), py::arg("need_grad_points"),
        "-> (grad_planes [N,3,C,H,W] or None, grad_points [N,M,3] or None).");
  m.def("composite_rays_forward", &head4d::composite_rays_forward, py::arg("colors"), py::arg("densities"),
        py::arg("depths"), py::arg("background"), py::arg("white_back"),
        "colors [N,R,S,C], densities/depths [N,R,S,1], background [N,R,C] or None -> "
        "[rgb [N,R,C], depth [N,R,1], weights [N,R,S-1,1], aux [N,R,4]].");
  m.def("composite_rays_backward", &head4d::composite_rays_backward, py::arg("grad_rgb"), py::arg("grad_depth"),
        py::arg("grad_weights"), py::arg("colors"), py::arg("densities"), py::arg("depths"),
        py::arg("background"), py::arg("white_back"), py::arg("aux"),
        "-> [grad_colors, grad_densities, grad_depths, grad_background or None].");
  m.def("sample_importance", &head4d::sample_importance, py::arg("depths"), py::arg("weights"), py::arg("u"),
        "depths [N,R,S,1], weights [N,R,S-1,1], u [N*R,n] or [n] (accumulation type) -> fine depths [N,R,n,1].");
  m.def("decode_triplanes_forward", &head4d::decode_triplanes_forward, py::arg("planes"), py::arg("points"),
        py::arg("weight1"), py::arg("bias1"), py::arg("weight2"), py::arg("bias2"), py::arg("scale"),
        py::arg("layout"),
        "planes [N,3,C,H,W], points [N,M,3], weight1 [Hd,C], bias1 [Hd], weight2 [1+Co,Hd], bias2 [1+Co] -> "
        "[rgb [N,M,Co], sigma [N,M,1]].");
  m.def("decode_triplanes_backward", &head4d::decode_triplanes_backward, py::arg("grad_rgb"),
        py::arg("grad_sigma"), py::arg("planes"), py::arg("points"), py::arg("weight1"), py::arg("bias1"),
        py::arg("weight2"), py::arg("bias2"), py::arg("scale"), py::arg("layout"), py::arg("need_planes"),
        py::arg("need_points"), py::arg("need_weight1"), py::arg("need_bias1"), py::arg("need_weight2"),
        py::arg("need_bias2"),
        "-> [grad_planes, grad_points, grad_weight1, grad_bias1, grad_weight2, grad_bias2], None where not needed.");
  m.def("sample_grid3d_forward", &head4d::sample_grid3d_forward, py::arg("grid"), py::arg("points"),
        py::arg("bound"), py::arg("padding"),
        "grid [N,C,D,H,W], points [N,M,3], padding 0 zeros / 1 border -> [N,M,C] (trilinear, align_corners).");
  m.def("sample_grid3d_backward", &head4d::sample_grid3d_backward, py::arg("grad_out"), py::arg("grid"),
        py::arg("points"), py::arg("bound"), py::arg("padding"), py::arg("need_grad_grid"),
        py::arg("need_grad_points"), "-> (grad_grid [N,C,D,H,W] or None, grad_points [N,M,3] or None).");
  m.def("one_ring_deform_forward", &head4d::one_ring_deform_forward, py::arg("points"), py::arg("verts_obs"),
        py::arg("verts_canon"), py::arg("neighbours"), py::arg("vertex_subset"),
        "points [N,M,3], verts_obs/verts_canon [N,V,3], neighbours [V,K], vertex_subset [S] or None -> "
        "[out [N,M,3], nearest [N,M] int32].");
  m.def("one_ring_deform_backward", &head4d::one_ring_deform_backward, py::arg("grad_out"), py::arg("points"),
        py::arg("verts_obs"), py::arg("verts_canon"), py::arg("neighbours"), py::arg("nearest"),
        py::arg("need_points"), py::arg("need_verts_obs"), py::arg("need_verts_canon"),
        "-> [grad_points, grad_verts_obs, grad_verts_canon], None where not needed.");
  m.def("closest_triangles_forward", &head4d::closest_triangles_forward, py::arg("points"), py::arg("verts"),
        py::arg("faces"), py::arg("values"),
        "points [N,M,3], verts [N,V,3], faces [F,3] -> [face_index [N,M] int64, barycentric [N,M,3] or None, "
        "signed_distance [N,M] or None, squared_distance [N,M]] (values=False: the search alone).");
  m.def("surface_field_grid_forward", &head4d::surface_field_grid_forward, py::arg("verts_obs"),
        py::arg("verts_canon"), py::arg("faces"), py::arg("resolution"), py::arg("bound"),
        "verts_obs [N,V,3], verts_canon [N,V,3] or None, faces [F,3] -> [face_index [N,R^3] int64, "
        "displacement [N,3,R,R,R] or None, squared_distance [N,1,R,R,R]].");
  m.def("bias_act_run", &head4d::bias_act_run, py::arg("x"), py::arg("bias"), py::arg("grad"), py::arg("dim"),
        py::arg("act"), py::arg("order"), py::arg("alpha"), py::arg("gain"), py::arg("clamp"),
        "x, bias [C] or None, grad like x or None -> like x (order 0 value, 1 first, 2 second derivative times grad).");
  m.def("upfirdn2d_forward", &head4d::upfirdn2d_forward, py::arg("x"), py::arg("f"), py::arg("upx"), py::arg("upy"),
        py::arg("downx"), py::arg("downy"), py::arg("padx0"), py::arg("padx1"), py::arg("pady0"), py::arg("pady1"),
        py::arg("flip_filter"), py::arg("gain"),
        "x [N,C,H,W], f [fh,fw] or [fw] -> [N,C,OH,OW]: zero insertion, padding, FIR filter, decimation.");
  m.def("rasterize_triangles_forward", &head4d::rasterize_triangles_forward, py::arg("vertices_clip"),
        py::arg("faces"), py::arg("height"), py::arg("width"), py::arg("cull_backfaces"),
        "vertices_clip [N,V,4], faces [F,3] -> [face_index [N,H,W] int64, barycentric [N,H,W,3], depth [N,H,W]].");
}
