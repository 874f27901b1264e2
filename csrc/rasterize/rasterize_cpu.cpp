// CPU kernel of the triangle rasterizer. The face and pixel math is rasterize_math.h,
// the same functions the CUDA kernels call. Two steps: the faces of every mesh are set
// up once (in parallel over faces), then one task per band of rows of one image runs
// the depth test of every face that reaches the band into the band's keys and resolves
// them (face index, barycentrics, depth). The minimum of the keys does not depend on
// the order the faces are visited in, so the result is deterministic.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "rasterize.h"
#include "rasterize_math.h"

namespace head4d {
namespace rasterize {
namespace {

constexpr int kBandRows = 16;         // rows per task
constexpr int64_t kGrainFaces = 16384;  // faces per setup task at least (one mesh: no fork, the setup is cheap)

// The setup of face f of mesh n; false when it covers nothing.
template <typename A>
bool face_setup_of(const Args& a, const A* vertices, int64_t n, int64_t f, FaceSetup<A>& setup) {
  const int32_t* idx = a.faces + 3 * f;
  for (int k = 0; k < 3; ++k) {
    if (idx[k] < 0 || idx[k] >= a.V) return false;
  }
  const A* mesh = vertices + n * a.V * 4;
  return setup_face(mesh + 4 * idx[0], mesh + 4 * idx[1], mesh + 4 * idx[2], a.height, a.width,
                    a.cull_backfaces, setup);
}

template <typename A>
void forward_impl(const Args& a, const ParallelFor& parallel_for) {
  const auto* vertices = static_cast<const A*>(a.vertices);
  auto* barycentric = static_cast<A*>(a.barycentric);
  auto* depth = static_cast<A*>(a.depth);
  const int64_t H = a.height, W = a.width;

  // step 1: every face of every mesh set up once; the live ones listed per mesh
  std::vector<FaceSetup<A>> setups(static_cast<size_t>(a.N * a.F));
  std::vector<unsigned char> live(static_cast<size_t>(a.N * a.F));
  parallel_for(a.N * a.F, kGrainFaces, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) live[i] = face_setup_of(a, vertices, i / a.F, i % a.F, setups[i]);
  });

  // step 2: per band of rows of one image, depth test then resolve
  const int64_t bands = (H + kBandRows - 1) / kBandRows;
  parallel_for(a.N * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands;
      const int row_begin = static_cast<int>((task % bands) * kBandRows);
      const int row_end = static_cast<int>(std::min<int64_t>(row_begin + kBandRows, H));
      uint64_t* keys = a.keys + (n * H + row_begin) * W;
      std::fill(keys, keys + (row_end - row_begin) * W, kEmptyKey);
      const FaceSetup<A>* mesh_setups = setups.data() + n * a.F;
      const unsigned char* mesh_live = live.data() + n * a.F;
      for (int64_t f = 0; f < a.F; ++f) {
        if (!mesh_live[f]) continue;
        const FaceSetup<A>& s = mesh_setups[f];
        const int r0 = std::max(s.y0, row_begin), r1 = std::min(s.y1, row_end - 1);
        for (int row = r0; row <= r1; ++row) {
          uint64_t* key_row = keys + static_cast<int64_t>(row - row_begin) * W;
          for (int col = s.x0; col <= s.x1; ++col) {
            A e[3], z;
            if (!covers(s, row, col, e, z)) continue;
            const uint64_t key = depth_key(z, f);
            if (key < key_row[col]) key_row[col] = key;
          }
        }
      }
      for (int row = row_begin; row < row_end; ++row) {
        for (int64_t col = 0; col < W; ++col) {
          const int64_t pixel = (n * H + row) * W + col;
          const uint64_t key = a.keys[pixel];
          A e[3] = {A(0), A(0), A(0)}, z = A(0), b[3] = {A(0), A(0), A(0)};
          int64_t face = -1;
          if (key != kEmptyKey) {
            face = key_face(key);
            const FaceSetup<A>& s = mesh_setups[face];
            covers(s, row, static_cast<int>(col), e, z);  // true: it won the depth test here
            perspective_barycentrics(s, e, b);
          }
          a.face_index[pixel] = face;
          depth[pixel] = z;
          for (int k = 0; k < 3; ++k) barycentric[3 * pixel + k] = b[k];
        }
      }
    }
  });
}

}  // namespace

void forward_cpu(const Args& args, const ParallelFor& parallel_for) {
  if (args.N * args.height * args.width == 0) return;
  switch (args.dtype) {
    case Dtype::kFloat32: return forward_impl<float>(args, parallel_for);
    case Dtype::kFloat64: return forward_impl<double>(args, parallel_for);
    default: break;
  }
  throw std::invalid_argument("rasterize_triangles: vertices must be float32 or float64 in the kernels");
}

}  // namespace rasterize
}  // namespace head4d
