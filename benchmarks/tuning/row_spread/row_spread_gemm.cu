// Tuning experiment (not part of the package): the Hopper GEMM with a weight atom whose A-fragment loads are free
// of shared-memory bank conflicts, to measure what the Marlin atom's conflicts cost (docs/kernels.md).
//
// In the Marlin atom lane t of warp w reads word 4t + w of each 128-word tile: the 32 lanes of a warp hit 8 banks,
// a 4-way conflict on every A-fragment load, and TMA (16-byte granularity) cannot move the words apart.  The
// "row-spread" atom reads the same 512-byte tile with another assignment of its 64 rows to the wgmma's rows:
// logical row m = r + 8 v1 + 16 w (r = lane / 4) is stored row 16 (r % 4) + 2 w + r / 4 + 8 v1, so warp w reads
// word 32 w + 16 (r / 4) + r % 4 + 4 (lane % 4): 32 distinct banks.  The k order and each word's nibble order are
// unchanged (same conversion).  The output comes out with its features permuted by that map within each
// 64-feature block (the scales must be passed permuted alike) - the price a production version would have to
// fold into the format; here it only checks against the Marlin-atom kernel.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "hopper/mixed_gemm.cuh"

namespace {

using namespace cute;
using namespace gptq_vllm::hopper;

// m-mode ((r % 4, r / 4), v1, w), k-mode as the Marlin atom: (k_odd, lane % 4, k_hi).
using RowSpreadAtom = Layout<Shape<Shape<Shape<_4, _2>, _2, _4>, Shape<_2, _4, _2>>,
                             Stride<Stride<Stride<_8, _128>, _2, _256>, Stride<_4, _32, _1>>>;

template <int CFG>
using K = Kernel<cutlass::half_t, 4, false, CFG, RowSpreadAtom>;

#define ROW_SPREAD_CONFIGS(X) X(2) X(3) X(4) X(5) X(6) X(8)

at::Tensor row_spread_gemm(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scales, int64_t config,
                           int64_t decomposition, int64_t splits) {
  TORCH_CHECK(a.scalar_type() == at::kHalf && a.is_contiguous() && scales.is_contiguous(), "fp16, contiguous");
  const int64_t M = a.size(0), K_ = qweight.size(0) * 16, N = qweight.size(1) * 2 / 4;
  at::Tensor out = at::empty({M, N}, a.options());
  GemmArgs g{a.data_ptr(), qweight.data_ptr(), scales.data_ptr(), nullptr, out.data_ptr(), static_cast<int>(M),
             static_cast<int>(N), static_cast<int>(K_), static_cast<int>(K_ / scales.size(0)),
             at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
             static_cast<Decomposition>(decomposition), static_cast<int>(splits), at::cuda::getCurrentCUDAStream()};
  size_t bytes = 0;
  switch (config) {
#define WS(C) case C: bytes = kernel_workspace_size<K<C>>(g); break;
    ROW_SPREAD_CONFIGS(WS)
#undef WS
    default: TORCH_CHECK(false, "row_spread_gemm: config ", config, " not instantiated");
  }
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, a.options().dtype(at::kByte));
  const char* err = "";
  switch (config) {
#define RUN(C) case C: err = run_kernel<K<C>>(g, bytes ? ws.data_ptr() : nullptr); break;
    ROW_SPREAD_CONFIGS(RUN)
#undef RUN
  }
  TORCH_CHECK(err[0] == '\0', "row_spread_gemm: ", err);
  return out;
}

// The atom's code offsets [64, 16] (logical row, k), to derive the row map in Python.
at::Tensor row_spread_offsets() {
  at::Tensor out = at::empty({64, 16}, at::kLong);
  auto o = out.accessor<int64_t, 2>();
  for (int n = 0; n < 64; ++n)
    for (int k = 0; k < 16; ++k) o[n][k] = RowSpreadAtom{}(n, k);
  return out;
}

}  // namespace

TORCH_LIBRARY(mygptq_tuning, m) {
  m.def("row_spread_gemm(Tensor a, Tensor qweight, Tensor scales, int config, int decomposition, int splits) -> Tensor");
  m.def("row_spread_offsets() -> Tensor");
}
TORCH_LIBRARY_IMPL(mygptq_tuning, CUDA, m) { m.impl("row_spread_gemm", &row_spread_gemm); }
TORCH_LIBRARY_IMPL(mygptq_tuning, CompositeExplicitAutograd, m) { m.impl("row_spread_offsets", &row_spread_offsets); }
