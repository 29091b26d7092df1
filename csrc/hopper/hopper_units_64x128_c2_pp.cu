// 2/3-bit kernels (the unit mainloop) of tile config 10 (64 weight rows x 128 tokens, cluster 2, ping-pong): see configs.h.
#include "mixed_gemm.cuh"

GPTQ_HOPPER_INSTANTIATE_UNITS(10)
