// Marlin-layout W4A16 / W8A16 GEMM:  C[M, N] = A[M, K] @ dequant(B)[K, N],  dequant = s * (q - z).
//
// Layout (formats.md §4, gptq_vllm/formats/marlin.py): B is cut into 16 (k) x 64 (n) tiles; tile (kt, nt)
// is 1024*b/32 consecutive int32 words of row kt of qweight [K/16, N*16*b/32], i.e. 512 (4-bit) or 1024
// (8-bit) contiguous bytes.  Inside a tile, lane t of a warp reading the 16 bytes at 16*t (4-bit) or the
// 32 bytes at 32*t (8-bit) holds exactly the mma.m16n8k16 B fragments of all 8 n8 sub-tiles of the
// 64-column strip:
//   4-bit: word j (j = 0..3) of lane t = tile word 4t + j, column c = 16j + t/4, rows r = 2(t%4):
//          nibbles (low first) Q[r,c] Q[r+8,c] Q[r,c+8] Q[r+8,c+8] Q[r+1,c] Q[r+9,c] Q[r+1,c+8] Q[r+9,c+8]
//          -> sub-tile s = 2j (columns 16j..16j+7) and s = 2j+1 (columns 16j+8..16j+15).
//   8-bit: word s (s = 0..7) of lane t = tile word 8t + s, sub-tile s = 2w + h, column c = 8s + t/4:
//          bytes Q[r,c] Q[r+8,c] Q[r+1,c] Q[r+9,c].
// So one warp reading one tile is one perfectly coalesced 512/1024-byte load, and sub-tile s of a strip
// always covers strip columns 8s .. 8s+7 with the lane's B column gid = t/4.
//
// Work decomposition (issue 7): see marlin_kernel.cuh (per-warp cp.async ring for B, A staged per chunk,
// k-phases reduced in shared memory, split-K parts as thread-block clusters reduced through distributed shared
// memory) and docs/kernels.md; this file holds the host side (checks, split choice, dense large-M path).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>

#include "marlin_kernel.cuh"
#include "kernels.h"

namespace gptq_vllm {
namespace marlin {

// Tuning override (benchmarks only): 0 = automatic.
struct Override {
  int sb = 0, cs = 0, slices = 0, dense_min_m = 0;
};
Override& override_cfg() {
  static Override o;
  return o;
}

extern template void launch_bits<half, 4>(const Params&, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<half, 8>(const Params&, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<__nv_bfloat16, 4>(const Params&, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<__nv_bfloat16, 8>(const Params&, int, dim3, int, size_t, cudaStream_t);

}  // namespace marlin

void marlin_set_config(int64_t sb, int64_t cs, int64_t slices, int64_t dense_min_m) {
  auto& o = marlin::override_cfg();
  o.sb = static_cast<int>(sb);
  o.cs = static_cast<int>(cs);
  o.slices = static_cast<int>(slices);
  o.dense_min_m = static_cast<int>(dense_min_m);
}

at::Tensor marlin_gemm(const at::Tensor& a_in, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& qzeros, const std::optional<at::Tensor>& g_idx_sorted,
                       int64_t bits, int64_t group_size, const std::optional<at::Tensor>& perm_in) {
  using namespace marlin;
  TORCH_CHECK(bits == 4 || bits == 8, "marlin_gemm: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(a_in.is_cuda() && a_in.dim() == 2, "marlin_gemm: a must be a 2-D CUDA tensor");
  TORCH_CHECK(a_in.scalar_type() == at::kHalf || a_in.scalar_type() == at::kBFloat16,
              "marlin_gemm: a must be float16 or bfloat16");
  TORCH_CHECK(scales.scalar_type() == a_in.scalar_type(), "marlin_gemm: scales dtype must equal a's dtype");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "marlin_gemm: qweight must be contiguous int32 [K/16, N*b/2]");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous(), "marlin_gemm: scales must be contiguous [NG, N]");
  TORCH_CHECK(qweight.device() == a_in.device() && scales.device() == a_in.device(),
              "marlin_gemm: tensors must be on one device");
  const int64_t K = qweight.size(0) * 16;
  const int64_t N = scales.size(1);
  const int64_t NG = scales.size(0);
  const bool has_perm = perm_in.has_value() && perm_in->defined();
  if (has_perm) {
    TORCH_CHECK(perm_in->scalar_type() == at::kInt && perm_in->dim() == 1 && perm_in->size(0) == K &&
                    perm_in->is_contiguous() && perm_in->device() == a_in.device(),
                "marlin_gemm: perm must be contiguous int32 [K_pad] on a's device");
    TORCH_CHECK(a_in.size(1) <= K, "marlin_gemm: a has ", a_in.size(1), " columns, more than K_pad = ", K);
  } else {
    TORCH_CHECK(a_in.size(1) == K, "marlin_gemm: a has ", a_in.size(1), " columns, qweight holds K = ", K);
  }
  TORCH_CHECK(N % 64 == 0 && K % 64 == 0, "marlin_gemm: needs N % 64 == 0 and K % 64 == 0 (pad above), got K=",
              K, " N=", N);
  TORCH_CHECK(qweight.size(1) == N * 16 * bits / 32, "marlin_gemm: qweight has ", qweight.size(1),
              " columns, expected N*16*b/32 = ", N * 16 * bits / 32);
  TORCH_CHECK(group_size == -1 || group_size > 0, "marlin_gemm: bad group_size ", group_size);
  TORCH_CHECK(a_in.size(0) < (int64_t(1) << 31) && K < (int64_t(1) << 31) && N < (int64_t(1) << 31),
              "marlin_gemm: too large");

  // The kernel reads A rows with 16-byte loads: contiguous and 16-byte aligned (a fresh copy otherwise).
  at::Tensor a = a_in.contiguous();
  if (reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 != 0 || (!has_perm && a.size(1) % 8 != 0)) a = a.clone();
  const int64_t M = a.size(0);
  at::Tensor out = at::empty({M, N}, a.options());
  if (M == 0) return out;

  c10::cuda::CUDAGuard guard(a.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const bool single = group_size == -1 || group_size >= K;
  at::Tensor gidx;
  int group_rows = 0;
  if (g_idx_sorted.has_value() && g_idx_sorted->defined() && g_idx_sorted->numel() > 0) {
    gidx = *g_idx_sorted;
    TORCH_CHECK(gidx.scalar_type() == at::kInt && gidx.dim() == 1 && gidx.size(0) == K && gidx.is_contiguous() &&
                    gidx.device() == a.device(),
                "marlin_gemm: g_idx_sorted must be contiguous int32 [K] on a's device");
  } else if (!single) {
    TORCH_CHECK(NG >= (K + group_size - 1) / group_size, "marlin_gemm: ", NG, " scale rows for K=", K,
                " G=", group_size);
    if (group_size % 16 == 0) {
      group_rows = static_cast<int>(group_size);
    } else {
      // Groups that do not align with 16-row k-tiles: give every row its group id (slow path per tile).
      gidx = at::div(at::arange(K, a.options().dtype(at::kInt)), group_size, "floor");
    }
  } else {
    TORCH_CHECK(NG == 1, "marlin_gemm: group_size ", group_size, " >= K or -1 means one scale row, got ", NG);
  }
  if (qzeros.has_value() && qzeros->defined() && qzeros->numel() > 0) {
    TORCH_CHECK(qzeros->scalar_type() == at::kInt && qzeros->dim() == 2 && qzeros->size(0) == NG &&
                    qzeros->size(1) == N * bits / 32 && qzeros->is_contiguous() && qzeros->device() == a.device(),
                "marlin_gemm: qzeros must be contiguous int32 [NG, N*b/32]");
  }

  Params p{};
  p.A = a.data_ptr();
  p.B = reinterpret_cast<const int4*>(qweight.data_ptr<int>());
  p.scales = scales.data_ptr();
  p.zeros = (qzeros.has_value() && qzeros->defined() && qzeros->numel() > 0)
                ? reinterpret_cast<const uint32_t*>(qzeros->data_ptr<int>())
                : nullptr;
  p.gidx = gidx.defined() ? gidx.data_ptr<int>() : nullptr;
  p.perm = has_perm ? perm_in->data_ptr<int>() : nullptr;
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(K);
  p.N = static_cast<int>(N);
  p.lda = static_cast<int>(a.size(1));
  p.group_rows = group_rows;
  p.tpg_shift = -1;
  for (int sh = 0; sh < 30 && group_rows > 0; ++sh)
    if ((16 << sh) == group_rows) p.tpg_shift = sh;
  p.single_perm = single ? 1 : 0;
  p.scale_epilogue = (p.gidx == nullptr && group_rows == 0) ? 1 : 0;

  const Override& ov = override_cfg();
  const int dense_min_m = ov.dense_min_m > 0 ? ov.dense_min_m : DENSE_MIN_M_DEFAULT;
  // The fused gather (A staged column by column through perm) pays only for M <= 8 (measured: at M = 16 it
  // costs more than a separate pad + index_select); above that the activations are gathered here.
  if (has_perm && (M > 8 || M >= dense_min_m)) {
    at::Tensor ag = a.size(1) == K ? a : at::constant_pad_nd(a, {0, K - a.size(1)}, 0);
    a = ag.index_select(1, *perm_in).contiguous();
    p.A = a.data_ptr();
    p.perm = nullptr;
    p.lda = static_cast<int>(K);
  }
  if (M >= dense_min_m) {
    // Prefill sizes: dequantize once (memory-bound, ~ K*N*(b/8 + 2) bytes), multiply with cuBLAS.
    at::Tensor w = at::empty({K, N}, a.options());
    Params pd = p;
    pd.scale_epilogue = 0;
    const dim3 blocks(static_cast<unsigned>((N / 64 + WARPS - 1) / WARPS), static_cast<unsigned>(K / 16));
    if (a.scalar_type() == at::kHalf) {
      if (bits == 4) marlin_dequant_kernel<half, 4><<<blocks, THREADS, 0, stream>>>(pd, reinterpret_cast<half*>(w.data_ptr()));
      else marlin_dequant_kernel<half, 8><<<blocks, THREADS, 0, stream>>>(pd, reinterpret_cast<half*>(w.data_ptr()));
    } else {
      if (bits == 4) marlin_dequant_kernel<__nv_bfloat16, 4><<<blocks, THREADS, 0, stream>>>(pd, reinterpret_cast<__nv_bfloat16*>(w.data_ptr()));
      else marlin_dequant_kernel<__nv_bfloat16, 8><<<blocks, THREADS, 0, stream>>>(pd, reinterpret_cast<__nv_bfloat16*>(w.data_ptr()));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::matmul_out(out, a, w);
    return out;
  }

  // ---- tile and split choice ----
  const int mode = M <= 8 ? 0 : (M <= 16 ? 1 : (M <= 32 ? 2 : 4));
  const int R = mode == 0 ? 8 : 16 * mode;
  const int mblocks = static_cast<int>((M + R - 1) / R);
  const int NS = static_cast<int>(N / 64);
  const int KT = static_cast<int>(K / 16);
  const int sms = sm_count();
  const bool clusters = at::cuda::getCurrentDeviceProperties()->major >= 9;
  const int rb = bits == 4 ? ring_bytes<4>() + sring_bytes<4>() : ring_bytes<8>() + sring_bytes<8>();
  const int bps = mode >= 2 ? 1 : 2;  // co-resident blocks per SM (registers / shared memory)
  // Candidates: strips per block sb (divides NS; the partial tile fits the ring's memory) x split parts
  // (cluster ranks on sm_90).  Measured on the H200 (docs/kernel-tuning.md): about one full wave of
  // co-resident blocks (bps per SM) is best; every extra split part costs a DSMEM reduction pass.
  int best_sb = 1, best_parts = 1;
  double best_score = 1e30;
  const int max_parts = clusters ? 8 : 64;
  for (int sb = 1; sb <= 8; sb *= 2) {
    if (NS % sb || sb * R * RED_STRIDE * 4 > rb) continue;
    for (int parts = 1; parts <= max_parts; parts *= 2) {
      const int kpp = (KT + parts - 1) / parts;
      if (parts > 1 && kpp < 2 * (WARPS / sb)) break;  // at least 2 k-tiles per warp
      const double blocks = static_cast<double>(NS / sb) * parts * mblocks;
      const double score = std::fabs(std::log2(blocks / (static_cast<double>(sms) * bps))) +
                           0.25 * std::log2(static_cast<double>(parts)) + (mode >= 2 && sb == 1 ? 0.3 : 0.0);
      if (score < best_score - 1e-9) {
        best_score = score;
        best_sb = sb;
        best_parts = parts;
      }
    }
  }
  int sb = ov.sb > 0 ? ov.sb : best_sb;
  while (NS % sb || sb * R * RED_STRIDE * 4 > rb) sb /= 2;
  int parts = best_parts;
  int cs = 1, slices = 1;
  if (ov.cs > 0 || ov.slices > 0) {
    cs = std::max(1, ov.cs);
    slices = std::max(1, ov.slices);
    parts = cs * slices;
  } else {
    cs = clusters ? std::min(parts, 8) : 1;
    slices = parts / cs;
  }
  if (!clusters) {
    slices *= cs;
    cs = 1;
  }
  p.sb = sb;
  p.kpp = (KT + parts - 1) / parts;
  // keep the fp32 workspace modest
  while (slices > 1 && static_cast<int64_t>(slices) * M * N > (int64_t(1) << 26)) {
    slices /= 2;
    parts = cs * slices;
    p.kpp = (KT + parts - 1) / parts;
  }
  const int kcmax = A_SMEM_BYTES / (2 * R);
  p.kc = std::min(kcmax, (16 * p.kpp + 127) / 128 * 128);
  p.slices = slices;
  const size_t smem = static_cast<size_t>(rb) + static_cast<size_t>(R) * (p.kc + A_PAD) * 2;

  at::Tensor ws;
  if (slices > 1) {
    ws = at::empty({slices, M, N}, a.options().dtype(at::kFloat));
    p.ws = ws.data_ptr<float>();
  } else {
    p.C = out.data_ptr();
  }
  dim3 grid(cs, NS / sb, mblocks * slices);
  if (a.scalar_type() == at::kHalf) {
    if (bits == 4) launch_bits<half, 4>(p, mode, grid, cs, smem, stream);
    else launch_bits<half, 8>(p, mode, grid, cs, smem, stream);
  } else {
    if (bits == 4) launch_bits<__nv_bfloat16, 4>(p, mode, grid, cs, smem, stream);
    else launch_bits<__nv_bfloat16, 8>(p, mode, grid, cs, smem, stream);
  }
  if (slices > 1) reduce_slices(ws, out);
  return out;
}

}  // namespace gptq_vllm
