// 2/3-bit kernels (the unit mainloop) of tile config 0 (128 weight rows x 16 tokens, cluster 1): see configs.h.
#include "mixed_gemm.cuh"

GPTQ_HOPPER_INSTANTIATE_UNITS(0)
