// Instantiates the Marlin GEMM kernels for __nv_bfloat16, 3-bit (see marlin_kernel.cuh); one file per pair builds in parallel.
#include "marlin_kernel.cuh"

namespace gptq_vllm {
namespace marlin {
template void launch_bits<__nv_bfloat16, 3>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
}  // namespace marlin
}  // namespace gptq_vllm
