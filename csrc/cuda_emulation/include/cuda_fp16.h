// Stand-in for CUDA's <cuda_fp16.h> in the emulated build (the *_cuda.cu files compiled as
// host C++): everything it provides is in ../emulation.h.
#pragma once
#include "../emulation.h"
