// Facts about the current device and this build, shared by the kernel families.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels.h"

namespace gptq_vllm {

namespace {
// Writes 1 where this build carries sm_90a code for the device (wgmma and the other Hopper-only
// instructions are compiled only for the arch-specific target, see gptq_vllm/kernels/arch.py).
__global__ void sm90a_probe_kernel(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}
}  // namespace

int sm_count() {
  static int counts[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && counts[dev]) return counts[dev];
  int n = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (dev < 64) counts[dev] = n;
  return n;
}

bool sm90a_code_runs() {
  // A one-time probe per device, run outside CUDA graph capture (the first GEMM on a device comes from a
  // warm-up in vLLM and the benchmarks); during a capture an unprobed device answers false.
  static int state[64];  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64) return false;
  if (state[dev] == 0) {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capturing));
    if (capturing != cudaStreamCaptureStatusNone) return false;
    int flag = 0;
    if (prop->major == 9 && prop->minor == 0) {
      int* d = nullptr;
      C10_CUDA_CHECK(cudaMalloc(&d, sizeof(int)));
      sm90a_probe_kernel<<<1, 1>>>(d);
      C10_CUDA_CHECK(cudaMemcpy(&flag, d, sizeof(int), cudaMemcpyDeviceToHost));
      C10_CUDA_CHECK(cudaFree(d));
    }
    state[dev] = flag ? 2 : 1;
  }
  return state[dev] == 2;
}

}  // namespace gptq_vllm
