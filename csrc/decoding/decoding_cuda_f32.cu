// The fused triplane decoder's kernels for float storage (see decoding_kernels.cuh).
#include "decoding_kernels.cuh"

namespace head4d {
namespace decoding {
namespace kernels {
HEAD4D_DECODING_INSTANTIATE(, float)
}  // namespace kernels
}  // namespace decoding
}  // namespace head4d
