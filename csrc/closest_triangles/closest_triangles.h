// Launchers of the closest-triangle search (closest_triangles, surface_field_grid):
// raw pointers in, no torch types, so the kernel files compile without torch headers.
// Inputs are checked, converted and outputs / scratch allocated by closest_triangles_host.cpp.
//
// Every floating array is in the accumulation type `dtype` (float32, or float64 for
// float64 inputs): the host converts half-precision inputs (small next to the work).
//
// How a call runs (the same on both sides):
//   1. keys: a Morton code of every face's centroid (batch element 0), with the face
//      index in the low 32 bits; the host sorts them (at::sort), which gives the
//      search order of the faces: spatially close faces end up in the same tile.
//   2. prepare: per (batch element, face in search order) a TriRecord (the exact
//      per-triangle quantities of the reference's distance), a bounding sphere, and per
//      tile of `tile` consecutive faces a bounding box.
//   3. search: per block of query points, the tiles in order of their lower-bound
//      distance to the block's bounding box; per point the exact distance to every face
//      that the lower bounds cannot exclude (closest_triangles_math.h). Optionally the values of
//      the chosen face (barycentrics, signed distance) and the surface field.
// The result does not depend on the order (ties are broken by face index), only the
// speed does.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

#include "../common.h"

namespace head4d {
namespace closest_triangles {

// Faces per tile: the CPU's tiles are smaller (a finer culling for one point at a time),
// the GPU's tiles amortize a block-wide synchronization.
constexpr int kTileCpu = 32;
constexpr int kTileCuda = 64;

// Sizes in bytes of the scratch records (TriRecord, Sphere, TileBox of closest_triangles_math.h)
// in the accumulation type `dtype`; defined in closest_triangles_cpu.cpp.
size_t record_bytes(Dtype dtype);
size_t sphere_bytes(Dtype dtype);
size_t tile_bytes(Dtype dtype);

struct KeysArgs {
  const void* verts;     // [V, 3] contiguous (batch element 0)
  const int32_t* faces;  // [F, 3] contiguous
  int64_t* keys;         // [F] out: Morton code of the centroid << 32 | face index
  int64_t V, F;
  Dtype dtype;
};

struct PrepareArgs {
  const void* verts;     // [N, V, 3] contiguous
  const int32_t* faces;  // [F, 3] contiguous; an index outside [0, V) gives NaN corners
  const int32_t* order;  // [F] the search order: order[s] is the face at slot s
  void* records;         // [N, F] TriRecord, slot order
  void* spheres;         // [N, F] Sphere, slot order
  void* tiles;           // [N, T] TileBox of slots [t * tile, (t + 1) * tile)
  int64_t N, V, F, T;
  int tile;
  Dtype dtype;
};

struct SearchArgs {
  const void* points;       // [N, M, 3] contiguous, or nullptr: the grid below
  const void* grid;         // [R] grid coordinates (when points is nullptr): point
                            // m = (d * R + h) * R + w is (g[w], g[h], g[d]), M = R^3
  int64_t R;
  const void* records;      // PrepareArgs' outputs
  const void* spheres;
  const void* tiles;
  const void* verts_canon;  // [N, V, 3] contiguous, or nullptr (needed for displacement)
  const int32_t* faces;     // [F, 3]
  int64_t* face_index;      // [N, M] out: the closest face
  void* squared;            // [N, M] out: its squared distance
  void* barycentric;        // [N, M, 3] out, or nullptr
  void* signed_distance;    // [N, M] out, or nullptr
  void* displacement;       // [N, 3, M] out, or nullptr: x_canon - x (needs verts_canon)
  int64_t N, M, V, F, T;
  int tile;
  Dtype dtype;              // kFloat32 or kFloat64
};

void keys_cpu(const KeysArgs& args);
void prepare_cpu(const PrepareArgs& args, const ParallelFor& parallel_for);
void search_cpu(const SearchArgs& args, const ParallelFor& parallel_for);

#ifdef HEAD4D_WITH_CUDA
// `stream` is a cudaStream_t. Throws std::runtime_error when a launch fails.
void keys_cuda(const KeysArgs& args, void* stream);
void prepare_cuda(const PrepareArgs& args, void* stream);
void search_cuda(const SearchArgs& args, void* stream);
#endif

}  // namespace closest_triangles
}  // namespace head4d
