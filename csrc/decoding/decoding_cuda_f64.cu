// The fused triplane decoder's kernels for double storage (see decoding_kernels.cuh).
#include "decoding_kernels.cuh"

namespace head4d {
namespace decoding {
namespace kernels {
HEAD4D_DECODING_INSTANTIATE_GENERAL(, double)
}  // namespace kernels
}  // namespace decoding
}  // namespace head4d
