// 2/3-bit kernels (the unit mainloop) of tile config 14 (64 weight rows x 256 tokens, cluster 2, ping-pong): see configs.h.
#include "mixed_gemm.cuh"

GPTQ_HOPPER_INSTANTIATE_UNITS(14)
