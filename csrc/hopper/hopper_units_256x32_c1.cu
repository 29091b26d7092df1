// 2/3-bit kernels (the unit mainloop) of tile config 3 (256 weight rows x 32 tokens, cluster 1): see configs.h.
#include "mixed_gemm.cuh"

GPTQ_HOPPER_INSTANTIATE_UNITS(3)
