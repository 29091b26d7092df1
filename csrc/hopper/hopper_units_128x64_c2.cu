// 2/3-bit kernels (the unit mainloop) of tile config 4 (128 weight rows x 64 tokens, cluster 2): see configs.h.
#include "mixed_gemm.cuh"

GPTQ_HOPPER_INSTANTIATE_UNITS(4)
