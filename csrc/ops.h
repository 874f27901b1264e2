// Host entry points of every op, as bound into head4d._C by bindings.cpp.
// Each checks its inputs, allocates outputs and calls the CPU or CUDA launcher.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

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

// colors [N, R, S, C], densities and depths [N, R, S, 1], background [N, R, C] or None
// (all one dtype and device) -> (rgb [N, R, C], depth [N, R, 1], weights [N, R, S-1, 1],
// aux [N, R, 4] in the accumulation type: per ray what the backward needs).
std::vector<at::Tensor> composite_rays_forward(const at::Tensor& colors, const at::Tensor& densities,
                                               const at::Tensor& depths,
                                               const std::optional<at::Tensor>& background, bool white_back);

// grad_depth / grad_weights may be None (that output got no gradient)
// -> (grad_colors, grad_densities, grad_depths, grad_background or None), in the inputs' dtype.
std::vector<at::Tensor> composite_rays_backward(const at::Tensor& grad_rgb,
                                                const std::optional<at::Tensor>& grad_depth,
                                                const std::optional<at::Tensor>& grad_weights,
                                                const at::Tensor& colors, const at::Tensor& densities,
                                                const at::Tensor& depths,
                                                const std::optional<at::Tensor>& background, bool white_back,
                                                const at::Tensor& aux);

// depths [N, R, S, 1] (S >= 4), weights [N, R, S-1, 1] (one dtype and device), u in the
// accumulation type: [N*R, n], or [n] shared by all rays -> fine depths [N, R, n, 1] in depths' dtype.
at::Tensor sample_importance(const at::Tensor& depths, const at::Tensor& weights, const at::Tensor& u);

// planes [N, 3, C, H, W] (any strides), points [N, M, 3], weight1 [Hd, C], bias1 [Hd],
// weight2 [1 + Co, Hd], bias2 [1 + Co] (any floating dtypes; C <= 64, Hd <= 128,
// 1 + Co <= 64) -> [rgb [N, M, Co], sigma [N, M, 1]] in planes' dtype: triplane
// sampling (mean), the decoder MLP and its activations in one pass (decoding/decoding.h).
std::vector<at::Tensor> decode_triplanes_forward(const at::Tensor& planes, const at::Tensor& points,
                                                 const at::Tensor& weight1, const at::Tensor& bias1,
                                                 const at::Tensor& weight2, const at::Tensor& bias2, double scale,
                                                 int64_t layout);

// grad_rgb / grad_sigma may be None (zero) -> [grad_planes, grad_points, grad_weight1, grad_bias1,
// grad_weight2, grad_bias2], each in its input's dtype, None where not needed. Recomputes
// everything per point from the inputs.
std::vector<at::Tensor> decode_triplanes_backward(const std::optional<at::Tensor>& grad_rgb,
                                                  const std::optional<at::Tensor>& grad_sigma,
                                                  const at::Tensor& planes, const at::Tensor& points,
                                                  const at::Tensor& weight1, const at::Tensor& bias1,
                                                  const at::Tensor& weight2, const at::Tensor& bias2, double scale,
                                                  int64_t layout, bool need_planes, bool need_points, bool need_w1,
                                                  bool need_b1, bool need_w2, bool need_b2);

// grid [N, C, D, H, W] (any strides), points [N, M, 3] (any floating dtype), padding 0 zeros /
// 1 border -> [N, M, C] in grid's dtype: trilinear, align_corners=True, at points / bound.
at::Tensor sample_grid3d_forward(const at::Tensor& grid, const at::Tensor& points, double bound, int64_t padding);

// -> (grad_grid [N, C, D, H, W] in grid's dtype, grad_points [N, M, 3] in points' dtype),
// undefined (None) where not needed.
std::tuple<at::Tensor, at::Tensor> sample_grid3d_backward(const at::Tensor& grad_out, const at::Tensor& grid,
                                                          const at::Tensor& points, double bound, int64_t padding,
                                                          bool need_grad_grid, bool need_grad_points);

// points [N, M, 3], verts_obs / verts_canon [N, V, 3] (one dtype), neighbours [V, K] int32/int64
// (-1 padding), vertex_subset [S] int32/int64 or None -> [out [N, M, 3] in points' dtype,
// nearest [N, M] int32: the chosen vertex per point, for the backward].
std::vector<at::Tensor> one_ring_deform_forward(const at::Tensor& points, const at::Tensor& verts_obs,
                                                const at::Tensor& verts_canon, const at::Tensor& neighbours,
                                                const std::optional<at::Tensor>& vertex_subset);

// -> [grad_points, grad_verts_obs, grad_verts_canon] in points' dtype, undefined where not needed.
std::vector<at::Tensor> one_ring_deform_backward(const at::Tensor& grad_out, const at::Tensor& points,
                                                 const at::Tensor& verts_obs, const at::Tensor& verts_canon,
                                                 const at::Tensor& neighbours, const at::Tensor& nearest,
                                                 bool need_points, bool need_verts_obs, bool need_verts_canon);

// points [N, M, 3], verts [N, V, 3] (one floating dtype), faces [F, 3] int32/int64 (F >= 1;
// an index outside [0, V) gives NaN) -> [face_index [N, M] int64, barycentric [N, M, 3],
// signed_distance [N, M], squared_distance [N, M]] in points' dtype: the exact closest
// triangle (the reference's distance, tie rule and degenerate triangles; closest_triangles/closest_triangles.h).
// values=false: the search alone, barycentric and signed_distance undefined (None).
std::vector<at::Tensor> closest_triangles_forward(const at::Tensor& points, const at::Tensor& verts,
                                                  const at::Tensor& faces, bool values);

// verts_obs [N, V, 3], verts_canon [N, V, 3] or None, faces [F, 3] -> [face_index [N, R^3] int64,
// displacement [N, 3, R, R, R] (undefined without verts_canon), squared_distance [N, 1, R, R, R]]
// in verts_obs' dtype, at the grid points (g[w], g[h], g[d]), g = linspace(-bound, bound, R).
std::vector<at::Tensor> surface_field_grid_forward(const at::Tensor& verts_obs,
                                                   const std::optional<at::Tensor>& verts_canon,
                                                   const at::Tensor& faces, int64_t resolution, double bound);

// bias_act (StyleGAN2's fused bias + activation + gain + clamp): x any shape of a
// floating dtype, bias [x.shape[dim]] of x's dtype or None, grad like x (orders 1, 2)
// -> like x: order 0 the output, order 1 grad * d/dx, order 2 grad * d2/dx2 of it
// (bias_act/bias_act_math.h). act: the code of head4d/ops/bias_act.py's table; clamp < 0: none.
at::Tensor bias_act_run(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& grad, int64_t dim, int64_t act, int64_t order,
                        double alpha, double gain, double clamp);

bool with_cuda();
bool cuda_emulated();

// upfirdn2d (csrc/upfirdn2d/): x [N, C, H, W], f [fh, fw] or [fw] -> [N, C, OH, OW], StyleGAN2's
// FIR resampling; the gradient is the same op with up and down swapped (no kernel of its own).
at::Tensor upfirdn2d_forward(const at::Tensor& x, const at::Tensor& f, int64_t upx, int64_t upy, int64_t downx,
                             int64_t downy, int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1,
                             bool flip_filter, double gain);

// rasterize_triangles (csrc/rasterize/): vertices_clip [N, V, 4] floating (clip space), faces [F, 3]
// int32/int64 -> [face_index [N, H, W] int64 (-1 empty), barycentric [N, H, W, 3], depth [N, H, W]] in
// float32 (float64 for float64 vertices): z-buffer rasterization, conventions in rasterize/rasterize_math.h.
std::vector<at::Tensor> rasterize_triangles_forward(const at::Tensor& vertices_clip, const at::Tensor& faces,
                                                    int64_t height, int64_t width, bool cull_backfaces);

}  // namespace head4d
