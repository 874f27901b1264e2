// CUDA kernels of the triangle rasterizer. The face and pixel math is rasterize_math.h,
// the same functions the CPU kernel calls. Three launches:
//
//   1. fill: every key of the z-buffer set to the empty key;
//   2. depth test: one thread per (mesh, face) sets the face up and walks the pixels of
//      its bounding box, taking an atomicMin of the packed 64-bit key (depth rounded to
//      float32, face index) at each covered pixel: the minimum does not depend on the
//      order the threads run in, so the result is deterministic, ties included;
//   3. resolve: one thread per pixel reads its key, sets the winning face up again and
//      writes the face index, the perspective-correct barycentrics and the depth.
//
// Why not tiles: the meshes this op is for (a FLAME head, ~10k faces at 512^2) have
// small faces, a few dozen pixels each, so a thread per face does a short, nearly even
// walk and the atomics spread over the image; binning faces into tiles would add a
// sort or a prefix sum for little gain. Estimated for the issue's shape (8 x 9,976
// faces, 512^2, about 2 covered pixels per pixel): ~2 M 64-bit atomics into a 16 MB
// buffer, then one pass reading keys and vertices and writing 72 MB; both well under
// the 0.3 ms goal on an H100 (not measured: no GPU here). A mesh with large faces
// would serialize each face's pixels on one thread; tiling is the step for that case.
#include <cstdint>

#include "../cuda_launch.cuh"
#include "rasterize.h"
#include "rasterize_math.h"

namespace head4d {
namespace rasterize {
namespace {

constexpr const char* kOp = "rasterize_triangles";
constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) fill_kernel(uint64_t* __restrict__ keys, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) keys[i] = kEmptyKey;
}

// The setup of face f of mesh n; false when it covers nothing (bad index, dropped, empty box).
template <typename A>
__device__ __forceinline__ bool face_setup_of(const A* __restrict__ vertices, const int32_t* __restrict__ faces,
                                              int64_t n, int64_t f, int64_t V, int height, int width,
                                              bool cull_backfaces, FaceSetup<A>& setup) {
  const int32_t i0 = faces[3 * f], i1 = faces[3 * f + 1], i2 = faces[3 * f + 2];
  if (i0 < 0 || i0 >= V || i1 < 0 || i1 >= V || i2 < 0 || i2 >= V) return false;
  const A* mesh = vertices + n * V * 4;
  return setup_face(mesh + 4 * i0, mesh + 4 * i1, mesh + 4 * i2, height, width, cull_backfaces, setup);
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    depth_test_kernel(const A* __restrict__ vertices, const int32_t* __restrict__ faces, uint64_t* __restrict__ keys,
                      int64_t N, int64_t V, int64_t F, int height, int width, bool cull_backfaces) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * F) return;
  const int64_t n = i / F, f = i - n * F;
  FaceSetup<A> s;
  if (!face_setup_of(vertices, faces, n, f, V, height, width, cull_backfaces, s)) return;
  uint64_t* image = keys + n * height * static_cast<int64_t>(width);
  for (int row = s.y0; row <= s.y1; ++row) {
    for (int col = s.x0; col <= s.x1; ++col) {
      A e[3], z;
      if (!covers(s, row, col, e, z)) continue;
      atomicMin(reinterpret_cast<unsigned long long*>(image + static_cast<int64_t>(row) * width + col),
                static_cast<unsigned long long>(depth_key(z, f)));
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    resolve_kernel(const A* __restrict__ vertices, const int32_t* __restrict__ faces,
                   const uint64_t* __restrict__ keys, int64_t* __restrict__ face_index, A* __restrict__ barycentric,
                   A* __restrict__ depth, int64_t N, int64_t V, int height, int width, bool cull_backfaces) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_image = static_cast<int64_t>(height) * width;
  if (pixel >= N * per_image) return;
  const int64_t n = pixel / per_image, within = pixel - n * per_image;
  const int row = static_cast<int>(within / width), col = static_cast<int>(within - row * static_cast<int64_t>(width));
  const uint64_t key = keys[pixel];
  A e[3] = {A(0), A(0), A(0)}, z = A(0), b[3] = {A(0), A(0), A(0)};
  int64_t face = -1;
  if (key != kEmptyKey) {
    face = key_face(key);
    FaceSetup<A> s;
    face_setup_of(vertices, faces, n, face, V, height, width, cull_backfaces, s);  // true: it won here
    covers(s, row, col, e, z);
    perspective_barycentrics(s, e, b);
  }
  face_index[pixel] = face;
  depth[pixel] = z;
  barycentric[3 * pixel] = b[0];
  barycentric[3 * pixel + 1] = b[1];
  barycentric[3 * pixel + 2] = b[2];
}

}  // namespace

void forward_cuda(const Args& a, void* stream_ptr) {
  const int64_t pixels = a.N * a.height * static_cast<int64_t>(a.width);
  if (pixels == 0) return;
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  HEAD4D_LAUNCH(blocks_for(pixels, kThreads, kOp), kThreads, 0, stream, fill_kernel)(a.keys, pixels);
  check_launch(kOp, "fill");
  with_float_type(a.dtype, kOp, [&](auto tag) {
    using A = decltype(tag);
    const auto* vertices = static_cast<const A*>(a.vertices);
    if (a.F > 0) {
      HEAD4D_LAUNCH(blocks_for(a.N * a.F, kThreads, kOp), kThreads, 0, stream, depth_test_kernel<A>)(
          vertices, a.faces, a.keys, a.N, a.V, a.F, a.height, a.width, a.cull_backfaces);
      check_launch(kOp, "depth test");
    }
    HEAD4D_LAUNCH(blocks_for(pixels, kThreads, kOp), kThreads, 0, stream, resolve_kernel<A>)(
        vertices, a.faces, a.keys, a.face_index, static_cast<A*>(a.barycentric), static_cast<A*>(a.depth), a.N, a.V,
        a.height, a.width, a.cull_backfaces);
    check_launch(kOp, "resolve");
  });
}

}  // namespace rasterize
}  // namespace head4d
