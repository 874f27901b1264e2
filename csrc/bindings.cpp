// The one Python binding of head4d's compiled ops: the module head4d._C.
// Only this file includes torch/extension.h (slow to compile); the op host
// files include ATen alone and the kernel files no torch header at all.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "head4d's compiled CPU and CUDA kernels (see head4d.ops for the public API)";
  m.def("with_cuda", &head4d::with_cuda, "Whether this build contains the CUDA kernels.");
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
}
