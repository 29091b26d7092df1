// Host-side entry points of the gptq_vllm CUDA kernels; registered as torch ops in ops.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace gptq_vllm {

at::Tensor marlin_gemm(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& qzeros, const std::optional<at::Tensor>& g_idx_sorted,
                       int64_t bits, int64_t group_size, const std::optional<at::Tensor>& perm);

// Benchmark-only tuning override of the Marlin GEMM's split choice (0 = automatic).
void marlin_set_config(int64_t sb, int64_t cs, int64_t slices, int64_t dense_min_m, int64_t tile_rows, int64_t wgmma);
// Whether the Marlin GEMM's wgmma loop runs on the current device (sm_90a code in this build, a CC 9.0 GPU).
bool marlin_wgmma_supported();

at::Tensor exllama_gemm(const at::Tensor& a, const at::Tensor& qweight, const std::optional<at::Tensor>& qzeros,
                        const at::Tensor& scales, const std::optional<at::Tensor>& g_idx_sorted, int64_t bits,
                        int64_t group_size);

at::Tensor marlin_repack(const at::Tensor& qweight, const std::optional<at::Tensor>& perm, int64_t bits,
                         int64_t size_k, int64_t size_n);

at::Tensor exllama_shuffle(const at::Tensor& qweight, const std::optional<at::Tensor>& perm, int64_t bits,
                           int64_t size_k);

// out[M, N] (dtype of out) = sum over s of ws[s, M, N] (fp32): the split-K reduction, deterministic.
void reduce_slices(const at::Tensor& ws, at::Tensor& out);

// Points a GEMM's output (p.C) at out, or, for slices > 1, its fp32 partials (p.ws) at a fresh workspace
// [slices, M, N] that reduce_slices(ws, out) sums afterwards; returns that workspace (undefined for 1 slice).
template <typename Params>
at::Tensor bind_output(Params& p, int slices, at::Tensor& out) {
  if (slices == 1) {
    p.C = out.data_ptr();
    return at::Tensor();
  }
  at::Tensor ws = at::empty({slices, out.size(0), out.size(1)}, out.options().dtype(at::kFloat));
  p.ws = ws.data_ptr<float>();
  return ws;
}

// Multiprocessor count of the current device (cached per device).
int sm_count();

}  // namespace gptq_vllm
