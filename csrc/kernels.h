// Host-side entry points of the gptq_vllm CUDA kernels; registered as torch ops in ops.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <vector>

namespace gptq_vllm {

at::Tensor marlin_gemm(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& qzeros, const std::optional<at::Tensor>& g_idx_sorted,
                       int64_t bits, int64_t group_size, const std::optional<at::Tensor>& perm);

// Benchmark-only tuning override of the Marlin GEMM's split choice (0 = automatic).
void marlin_set_config(int64_t sb, int64_t cs, int64_t slices, int64_t dense_min_m, int64_t tile_rows, int64_t wgmma,
                       int64_t a_buffers, int64_t solo);

at::Tensor exllama_gemm(const at::Tensor& a, const at::Tensor& qweight, const std::optional<at::Tensor>& qzeros,
                        const at::Tensor& scales, const std::optional<at::Tensor>& g_idx_sorted, int64_t bits,
                        int64_t group_size);

at::Tensor marlin_repack(const at::Tensor& qweight, const std::optional<at::Tensor>& perm, int64_t bits,
                         int64_t size_k, int64_t size_n);

at::Tensor exllama_shuffle(const at::Tensor& qweight, const std::optional<at::Tensor>& perm, int64_t bits,
                           int64_t size_k);

// 2/3-bit Marlin units -> 4-bit Marlin tiles [K/16, 2N] of the codes + 8 - 2^(b-1) (csrc/marlin/marlin_widen.cu):
// the Hopper GEMM's input for large batches of a 2/3-bit layer.
at::Tensor marlin_widen(const at::Tensor& qweight, int64_t bits);

// out[M, K] = a[:, perm[k]] (zero where perm[k] >= a.size(1)): the act-order gather of the activations,
// one 16-byte store per 8 columns (csrc/marlin/, shared with the Hopper GEMM).
at::Tensor gather_columns(const at::Tensor& a, const at::Tensor& perm, int64_t K);

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

// Whether this build's sm_90a code runs on the current device (a CC 9.0 GPU): the Marlin GEMM's wgmma loop
// and the Hopper mixed-input GEMMs need it.
bool sm90a_code_runs();

// Hopper mixed-input GEMM (csrc/hopper/): out[M, N] = a[M, K] @ dequant(Marlin words), sm_90a only.
// With perm (int32 [K], 16-byte aligned), a is the raw [M, K_in] activation, gathered first (act-order).
at::Tensor hopper_gemm(const at::Tensor& a, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size, int64_t config,
                       int64_t decomposition, int64_t splits, const std::optional<at::Tensor>& perm);
// Names of the tile configurations, by config id.
std::vector<std::string> hopper_configs();
// Code offset of each (n, k) of a Marlin tile under the CuTe atom the Hopper GEMM reads ([64, 16], CPU).
at::Tensor hopper_tile_offsets(int64_t bits);

}  // namespace gptq_vllm
