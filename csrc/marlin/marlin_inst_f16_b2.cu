// Instantiates the Marlin GEMM kernels for half, 2-bit (see marlin_kernel.cuh); one file per pair builds in parallel.
#include "marlin_kernel.cuh"

namespace gptq_vllm {
namespace marlin {
template void launch_bits<half, 2>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
}  // namespace marlin
}  // namespace gptq_vllm
