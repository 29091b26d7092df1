// 2/3-bit Marlin units -> 4-bit Marlin tiles (issue 14), so that large batches of a 2/3-bit layer run on the Hopper
// GEMM, which converts 4/8-bit codes only.  Both layouts give lane t of a warp the same 32 codes of each k-tile
// (fragment pairs P(s, b), rows + h: formats/marlin.py), so the conversion is per lane and needs no shuffles:
// 4-bit word j of lane t holds sub-tiles 2j, 2j+1 with nibble i = b + 2 s' + 4 h for sub-tile 2j + s'
// (marlin_gemm.cu's field list).  Codes are shifted by d = 8 - 2^(b-1) into the 4-bit symmetric range, so
// q4 - 8 = q - 2^(b-1) and, with zero points, s (8 - (z + d)) = s (2^(b-1) - z): the Hopper GEMM's scales and zero
// term (formats/hopper.py operands of the 2/3-bit weight) are used unchanged.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "marlin_kernel.cuh"
#include "../kernels.h"

namespace gptq_vllm {
namespace marlin {

// One thread per (unit, lane): reads the lane's chunks of its unit (chunk-major: coalesced across the warp) and
// writes one 16-byte 4-bit tile word group per k-tile (lane-major: coalesced as well).
template <int BITS>
__global__ void __launch_bounds__(THREADS) widen_kernel(const int4* __restrict__ src, int units, int NS,
                                                      int4* __restrict__ dst) {
  constexpr int UT = unit_tiles<BITS>(), UC = unit_chunks<BITS>();
  constexpr uint32_t D = 8 - (1 << (BITS - 1));
  const int64_t id = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  if (id >= static_cast<int64_t>(units) * 32) return;
  const int lane = static_cast<int>(id & 31);
  const int64_t unit = id >> 5;  // ku * NS + nt
  const int64_t ku = unit / NS, nt = unit % NS;
  uint32_t uw[4 * UC];
  load_unit_words<BITS, true>(src + unit * (32 * UC), lane, uw);
#pragma unroll
  for (int t = 0; t < UT; ++t) {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      w[j] = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int b = i & 1, sp = (i >> 1) & 1, h = i >> 2;
        w[j] |= (fragment_code<BITS>(uw, t, 2 * j + sp, (b << 1) | h) + D) << (4 * i);
      }
    }
    const int64_t kt = ku * UT + t;
    dst[(kt * NS + nt) * 32 + lane] = make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                                                static_cast<int>(w[3]));
  }
}

}  // namespace marlin

at::Tensor marlin_widen(const at::Tensor& qweight, int64_t bits) {
  using namespace marlin;
  TORCH_CHECK(bits == 2 || bits == 3, "marlin_widen: bits must be 2 or 3, got ", bits);
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "marlin_widen: qweight must be a contiguous int32 CUDA tensor [K/(16U), N*U*b/2]");
  const int64_t U = bits == 2 ? unit_tiles<2>() : unit_tiles<3>();
  TORCH_CHECK(qweight.size(1) % (64 * U * bits / 2) == 0, "marlin_widen: qweight has ", qweight.size(1),
              " columns, not a multiple of 64*U*b/2 = ", 64 * U * bits / 2);
  const int64_t N = qweight.size(1) * 2 / (U * bits), K = qweight.size(0) * 16 * U;
  at::Tensor out = at::empty({K / 16, 2 * N}, qweight.options());
  const int64_t units = qweight.size(0) * (N / 64);
  if (units == 0) return out;
  TORCH_CHECK(units * 32 < (int64_t(1) << 31), "marlin_widen: too large");
  c10::cuda::CUDAGuard guard(qweight.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((units * 32 + THREADS - 1) / THREADS);
  const int4* src = reinterpret_cast<const int4*>(qweight.data_ptr<int>());
  int4* dst = reinterpret_cast<int4*>(out.data_ptr<int>());
  const int n_units = static_cast<int>(units), strips = static_cast<int>(N / 64);
  if (bits == 2) widen_kernel<2><<<blocks, THREADS, 0, stream>>>(src, n_units, strips, dst);
  else widen_kernel<3><<<blocks, THREADS, 0, stream>>>(src, n_units, strips, dst);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace gptq_vllm
