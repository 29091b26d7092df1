// Marlin-layout W2/W3/W4/W8 x A16 GEMM:  C[M, N] = A[M, K] @ dequant(B)[K, N],  dequant = s * (q - z).
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
//   2/3-bit (issue 14): units of 2 / 4 k-tiles (qweight [K/32, 2N] / [K/64, 6N]); lane t's words of a unit are
//          chunk-major (int4 32c + t), holding each k-tile's 16 fragment pairs (rows r, r+1 in the low / high
//          16-bit half at one bit offset), pair p = 2s + b (rows + 8b of sub-tile s): 2-bit at bit 2(p%8) of the
//          k-tile's word p/8; 3-bit by pair group g = p/4 in lane words 4c + g (k-tile c < 3 at bit 3(p%4),
//          k-tile 3 at bit 12 of word 4(p%4) + g and, pair 4g + 3, spread over bit 15 of the three words).  Zero
//          points use the 4-bit packing.  Definition: formats/marlin.py; kernel: marlin_kernel.cuh.
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
#include "../kernels.h"

namespace gptq_vllm {
namespace marlin {

// Tuning override (benchmarks only): 0 = automatic.
struct Override {
  int sb = 0, cs = 0, slices = 0, dense_min_m = 0, tile_rows = 0, wgmma = 0, a_buffers = 0, solo = 0;
};
Override& override_cfg() {
  static Override o;
  return o;
}

// Tile and split choices measured on the H200 (132 SMs): for each Llama-3-8B/70B layer shape and batch bucket
// (M <= 8, measured at M = 1; M <= 16, 32, 64, 128, measured at that M) the block-tile rows (0: dequantize +
// cuBLAS), the fastest (strips per block, cluster ranks) of the 16 tried, and whether the wgmma loop runs.
// M <= 16: `SWEEP=1 MS=1,16 python benchmarks/kernels.py`; 16-row splits at M = 32/64: `SWEEP=1 ROWS=16
// MS=32,64 ...`; rows and wgmma: `python benchmarks/pick_tiles.py` over the `ROWS=32` / `ROWS=64` / `ROWS=64
// WGMMA=1` sweeps (docs/kernel-tuning.md, 2026-11-22).  M <= 32 at (4096, 6144) and (8192, 8192): 32-row tiles
// since they fold the scales into the run sums, `ROWS=32 SWEEP=1 MS=32,64 ...` on an H100 (2026-12-06).  M <= 16 at
// (4096, 28672): (4, 1), 112 blocks that take the one-block-per-SM build, 5.5 % ahead of the H200's (8, 4) in three
// `SWEEP=1 ROWS=16 MS=16,32,64` runs and an A/B on H100s (2026-12-06, fourteenth session); no other point gained 5 %.
// Other shapes, batch sizes and GPUs use 8/16-row tiles with the model in marlin_gemm(), dense from M = 128.
struct Tuned {
  int K, N, M, rows, sb, cs, wg;  // wg: the wgmma loop (64-row tiles, sm_90a builds)
};
constexpr Tuned TUNED[] = {
    // M <= 8
    {4096, 6144, 8, 8, 4, 4, 0}, {4096, 4096, 8, 8, 1, 2, 0},
    {4096, 28672, 8, 8, 8, 4, 0}, {14336, 4096, 8, 8, 1, 2, 0},
    {8192, 10240, 8, 8, 4, 4, 0}, {8192, 8192, 8, 8, 2, 2, 0},
    {8192, 57344, 8, 8, 8, 2, 0}, {28672, 8192, 8, 8, 1, 2, 0},
    // M <= 16
    {4096, 6144, 16, 16, 4, 4, 0}, {4096, 4096, 16, 16, 8, 8, 0},
    {4096, 28672, 16, 16, 4, 1, 0}, {14336, 4096, 16, 16, 4, 8, 0},
    {8192, 10240, 16, 16, 8, 8, 0}, {8192, 8192, 16, 16, 2, 2, 0},
    {8192, 57344, 16, 16, 8, 2, 0}, {28672, 8192, 16, 16, 2, 2, 0},
    // M <= 32
    {4096, 6144, 32, 32, 4, 4, 0}, {4096, 4096, 32, 16, 2, 2, 0},
    {4096, 28672, 32, 32, 8, 2, 0}, {14336, 4096, 32, 16, 2, 2, 0},
    {8192, 10240, 32, 16, 8, 8, 0}, {8192, 8192, 32, 32, 2, 2, 0},
    {8192, 57344, 32, 32, 8, 1, 0}, {28672, 8192, 32, 16, 4, 2, 0},
    // M <= 64
    {4096, 6144, 64, 64, 4, 4, 1}, {4096, 4096, 64, 16, 4, 2, 0},
    {4096, 28672, 64, 64, 8, 2, 1}, {14336, 4096, 64, 16, 4, 2, 0},
    {8192, 10240, 64, 64, 8, 4, 1}, {8192, 8192, 64, 32, 4, 2, 0},
    {8192, 57344, 64, 64, 8, 1, 1}, {28672, 8192, 64, 32, 4, 2, 0},
    // M <= 128
    {4096, 6144, 128, 64, 8, 4, 1}, {4096, 4096, 128, 0, 0, 0, 0},
    {4096, 28672, 128, 64, 8, 1, 1}, {14336, 4096, 128, 32, 4, 2, 0},
    {8192, 10240, 128, 64, 8, 8, 1}, {8192, 8192, 128, 64, 4, 2, 0},
    {8192, 57344, 128, 64, 8, 1, 1}, {28672, 8192, 128, 64, 4, 2, 0},
};
const Tuned* tuned_split(int64_t K, int64_t N, int64_t M, int sms) {
  if (sms != 132 || M > 128) return nullptr;
  const int bucket = M <= 8 ? 8 : (M <= 16 ? 16 : (M <= 32 ? 32 : (M <= 64 ? 64 : 128)));
  for (const Tuned& t : TUNED)
    if (t.K == K && t.N == N && t.M == bucket) return &t;
  return nullptr;
}

extern template void launch_bits<half, 4>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<half, 8>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<half, 2>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<half, 3>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<__nv_bfloat16, 4>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<__nv_bfloat16, 8>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<__nv_bfloat16, 2>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);
extern template void launch_bits<__nv_bfloat16, 3>(const Params&, int, bool, int, dim3, int, size_t, cudaStream_t);

}  // namespace marlin

namespace {

template <typename T>
void launch_gather(const at::Tensor& a, const at::Tensor& perm, int64_t K, at::Tensor& out, cudaStream_t stream) {
  const int64_t M = a.size(0);
  const int lda = static_cast<int>(a.size(1)), k = static_cast<int>(K);
  // Slices per row: about two blocks per SM in all, at most one thread per 8 output columns.
  const int64_t want = (2 * sm_count() + M - 1) / M;
  const dim3 blocks(static_cast<unsigned>(M),
                    static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want, (K / 8 + marlin::THREADS - 1) / marlin::THREADS))));
  const size_t row_bytes = static_cast<size_t>(lda) * sizeof(T);
  const T* src = reinterpret_cast<const T*>(a.data_ptr());
  T* dst = reinterpret_cast<T*>(out.data_ptr());
  if (row_bytes <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) {
    auto kernel = marlin::gather_columns_kernel<T, true>;
    if (row_bytes > 48 * 1024)
      AT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(row_bytes)));
    kernel<<<blocks, marlin::THREADS, row_bytes, stream>>>(src, lda, perm.data_ptr<int>(), k, dst);
  } else {
    marlin::gather_columns_kernel<T, false><<<blocks, marlin::THREADS, 0, stream>>>(src, lda, perm.data_ptr<int>(), k, dst);
  }
}

template <typename T>
void launch_dequant(const marlin::Params& p, int64_t bits, dim3 blocks, at::Tensor& w, cudaStream_t stream) {
  using namespace marlin;
  T* out = reinterpret_cast<T*>(w.data_ptr());
  if (bits == 2) marlin_dequant_kernel<T, 2><<<blocks, THREADS, 0, stream>>>(p, out);
  else if (bits == 3) marlin_dequant_kernel<T, 3><<<blocks, THREADS, 0, stream>>>(p, out);
  else if (bits == 4) marlin_dequant_kernel<T, 4><<<blocks, THREADS, 0, stream>>>(p, out);
  else marlin_dequant_kernel<T, 8><<<blocks, THREADS, 0, stream>>>(p, out);
}

template <typename T>
void launch_gemm(const marlin::Params& p, int64_t bits, int mb, bool wg, int solo, dim3 grid, int cs, size_t smem,
                 cudaStream_t stream) {
  using namespace marlin;
  switch (bits) {
    case 2: return launch_bits<T, 2>(p, mb, wg, solo, grid, cs, smem, stream);
    case 3: return launch_bits<T, 3>(p, mb, wg, solo, grid, cs, smem, stream);
    case 4: return launch_bits<T, 4>(p, mb, wg, solo, grid, cs, smem, stream);
    default: return launch_bits<T, 8>(p, mb, wg, solo, grid, cs, smem, stream);
  }
}

}  // namespace

at::Tensor gather_columns(const at::Tensor& a, const at::Tensor& perm, int64_t K) {
  TORCH_CHECK(perm.scalar_type() == at::kInt && perm.dim() == 1 && perm.size(0) == K && perm.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(perm.data_ptr()) % 16 == 0 && K % 8 == 0,
              "gather_columns: perm must be 16-byte aligned contiguous int32 [K], K % 8 == 0");
  TORCH_CHECK(a.is_contiguous(), "gather_columns: a must be contiguous");
  at::Tensor out = at::empty({a.size(0), K}, a.options());
  if (a.size(0) == 0 || K == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (a.scalar_type() == at::kHalf) launch_gather<half>(a, perm, K, out, stream);
  else launch_gather<__nv_bfloat16>(a, perm, K, out, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void marlin_set_config(int64_t sb, int64_t cs, int64_t slices, int64_t dense_min_m, int64_t tile_rows, int64_t wgmma,
                       int64_t a_buffers, int64_t solo) {
  TORCH_CHECK(tile_rows == 0 || tile_rows == 8 || tile_rows == 16 || tile_rows == 32 || tile_rows == 64,
              "marlin_set_config: tile_rows must be 0 (automatic), 8, 16, 32 or 64");
  TORCH_CHECK(a_buffers >= 0 && a_buffers <= marlin::A_BUFS_MAX, "marlin_set_config: a_buffers must be 0 (automatic), 1 or 2");
  TORCH_CHECK(solo >= -1 && solo <= 1, "marlin_set_config: solo must be 0 (automatic), 1 (one block per SM) or -1 (two)");
  auto& o = marlin::override_cfg();
  o.tile_rows = static_cast<int>(tile_rows);
  o.sb = static_cast<int>(sb);
  o.cs = static_cast<int>(cs);
  o.slices = static_cast<int>(slices);
  o.dense_min_m = static_cast<int>(dense_min_m);
  o.wgmma = static_cast<int>(wgmma);
  o.a_buffers = static_cast<int>(a_buffers);
  o.solo = static_cast<int>(solo);
}


at::Tensor marlin_gemm(const at::Tensor& a_in, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& qzeros, const std::optional<at::Tensor>& g_idx_sorted,
                       int64_t bits, int64_t group_size, const std::optional<at::Tensor>& perm_in) {
  using namespace marlin;
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "marlin_gemm: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(a_in.is_cuda() && a_in.dim() == 2, "marlin_gemm: a must be a 2-D CUDA tensor");
  TORCH_CHECK(a_in.scalar_type() == at::kHalf || a_in.scalar_type() == at::kBFloat16,
              "marlin_gemm: a must be float16 or bfloat16");
  TORCH_CHECK(scales.scalar_type() == a_in.scalar_type(), "marlin_gemm: scales dtype must equal a's dtype");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "marlin_gemm: qweight must be contiguous int32 [K/(16U), N*U*b/2]");
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous(), "marlin_gemm: scales must be contiguous [NG, N]");
  TORCH_CHECK(qweight.device() == a_in.device() && scales.device() == a_in.device(),
              "marlin_gemm: tensors must be on one device");
  // Rows of qweight are units of U k-tiles (U = 1 for 4/8-bit, 2 for 2-bit, 4 for 3-bit).
  const int unit = bits == 2 ? unit_tiles<2>() : (bits == 3 ? unit_tiles<3>() : 1);
  const int64_t K = qweight.size(0) * 16 * unit;
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
  TORCH_CHECK(qweight.size(1) == N * unit * bits / 2, "marlin_gemm: qweight has ", qweight.size(1),
              " columns, expected N*U*b/2 = ", N * unit * bits / 2);
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
                    qzeros->size(1) == N * (bits == 8 ? 8 : 4) / 32 && qzeros->is_contiguous() &&
                    qzeros->device() == a.device(),
                "marlin_gemm: qzeros must be contiguous int32 [NG, N*b/32] (b = 4 for 2/3-bit codes)");
  }

  Params p{};
  p.A = a.data_ptr();
  p.B = reinterpret_cast<const int4*>(qweight.data_ptr<int>());
  p.scales = scales.data_ptr();
  p.zeros = (qzeros.has_value() && qzeros->defined() && qzeros->numel() > 0)
                ? reinterpret_cast<const uint32_t*>(qzeros->data_ptr<int>())
                : nullptr;
  p.gidx = gidx.defined() ? gidx.data_ptr<int>() : nullptr;
  // The kernel reads perm 8 entries (32 bytes) at a time.
  const at::Tensor perm = !has_perm ? at::Tensor()
                          : (reinterpret_cast<uintptr_t>(perm_in->data_ptr()) % 16 ? perm_in->clone() : *perm_in);
  p.perm = has_perm ? perm.data_ptr<int>() : nullptr;
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
  const bool clusters = at::cuda::getCurrentDeviceProperties()->major >= 9;
  const Tuned* tuned = clusters ? tuned_split(K, N, M, sm_count()) : nullptr;
  // Dense from DENSE_MIN_M_DEFAULT on, or where the table says so (rows 0); an override decides alone.
  const bool dense = ov.dense_min_m > 0 ? M >= ov.dense_min_m
                                        : (tuned != nullptr ? tuned->rows == 0 : M >= DENSE_MIN_M_DEFAULT);
  // Act-order: the kernel gathers A through perm while staging it (8 columns per thread in flight) at M = 1
  // with K <= STAGED_GATHER_MAX_K; elsewhere, where the blocks' repeated gathers cost more, a gather kernel
  // runs first.
  if (has_perm && (M > 1 || K > STAGED_GATHER_MAX_K || dense)) {
    a = gather_columns(a, perm, K);
    p.A = a.data_ptr();
    p.perm = nullptr;
    p.lda = static_cast<int>(K);
  }
  if (dense) {
    // Prefill sizes: dequantize once (memory-bound, ~ K*N*(b/8 + 2) bytes), multiply with cuBLAS.
    at::Tensor w = at::empty({K, N}, a.options());
    Params pd = p;
    pd.scale_epilogue = 0;
    const dim3 blocks(static_cast<unsigned>((N / 64 + WARPS - 1) / WARPS), static_cast<unsigned>(K / 16));
    if (a.scalar_type() == at::kHalf) launch_dequant<half>(pd, bits, blocks, w, stream);
    else launch_dequant<__nv_bfloat16>(pd, bits, blocks, w, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::matmul_out(out, a, w);
    return out;
  }

  // ---- tile and split choice ----
  const int R = ov.tile_rows > 0                       ? ov.tile_rows
                : (tuned != nullptr && tuned->rows > 0) ? tuned->rows
                                                        : (M <= 8 ? 8 : 16);
  const int mb = R / 8;  // m8 blocks per block tile
  const int mblocks = static_cast<int>((M + R - 1) / R);
  const int NS = static_cast<int>(N / 64);
  const int KT = static_cast<int>(K / 16);
  const int KR = (KT + RUN - 1) / RUN;  // runs along K
  const int sms = sm_count();
  const int ring = (bits == 2 ? ring_bytes<2>() : bits == 3 ? ring_bytes<3>() : bits == 4 ? ring_bytes<4>() : ring_bytes<8>()) +
                   sring_bytes();
  auto kc_for = [&](int kpp, int nbuf) {  // A columns per chunk: the part's columns, at most what a buffer holds
    return std::min(a_buffer_bytes(R, nbuf) / (2 * R), (16 * kpp + 16 * RUN - 1) / (16 * RUN) * (16 * RUN));
  };
  auto smem_for = [&](int kpp, int nbuf) { return gemm_smem(ring, R, kc_for(kpp, nbuf), nbuf); };
  auto fits = [&](int sb, int parts) {  // sb divides the strips, every warp gets a run, the partial tile fits
    const int kpp = (KR + parts - 1) / parts * RUN;
    return NS % sb == 0 && (parts == 1 || kpp / RUN >= WARPS / sb) &&
           static_cast<size_t>(sb) * R * RED_STRIDE * 4 <= smem_for(kpp, 1);
  };
  int sb = 0, parts = 0;
  if (tuned != nullptr && R == tuned->rows && fits(tuned->sb, tuned->cs)) {
    sb = tuned->sb;
    parts = tuned->cs;
  } else {
    // Not in the table: the least predicted time over the candidates, from a log-linear model fitted to the
    // 512 timings of those sweeps (M = 1/16/32/64; benchmarks/tuning/fit_split_model.py refits it; its picks there
    // cost 1.13x the best on average, 1.45x at worst): time ~ work^0.81 (strip-runs on the busiest SM), x1.11 per doubling of split parts, x1.21
    // per doubling of k-phases (8 / sb), and the blocks per SM / short-grid terms.
    double best = 1e30;
    for (int sbc = 1; sbc <= 8; sbc *= 2) {
      for (int pc = 1; pc <= (clusters ? 8 : 64); pc *= 2) {
        if (!fits(sbc, pc)) continue;
        const int64_t blocks = static_cast<int64_t>(NS / sbc) * pc * mblocks;
        const int64_t per_sm = (blocks + sms - 1) / sms;  // blocks on the busiest SM
        const double work = static_cast<double>(per_sm) * sbc * ((KR + pc - 1) / pc);
        const double score = 0.808 * std::log(work) + 0.105 * std::log2(static_cast<double>(pc)) +
                             0.19 * std::log2(static_cast<double>(WARPS / sbc)) - 0.207 * (per_sm > 1) +
                             0.151 * std::log(static_cast<double>(per_sm)) - 0.11 * (2 * blocks < sms);
        if (score < best - 1e-9) {
          best = score;
          sb = sbc;
          parts = pc;
        }
      }
    }
  }
  if (ov.sb > 0) sb = ov.sb;
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
  // keep the fp32 workspace modest
  while (slices > 1 && static_cast<int64_t>(slices) * M * N > (int64_t(1) << 26)) {
    slices /= 2;
    parts = cs * slices;
  }
  p.kpp = (KR + parts - 1) / parts * RUN;
  while (sb > 1 && (NS % sb || static_cast<size_t>(sb) * R * RED_STRIDE * 4 > smem_for(p.kpp, 1))) sb /= 2;
  p.sb = sb;
  // A buffers: two where a part spans several chunks (the next chunk's copies then fly under this chunk's runs),
  // a chunk still holds a run for each k-phase, and 8/16-row tiles still fit twice on an SM; the staged act-order
  // gather keeps one.
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const size_t two_blocks = prop->sharedMemPerMultiprocessor / 2 - prop->reservedSharedMemPerBlock;
  const bool two_fit = kc_for(p.kpp, 2) >= 16 * RUN * (WARPS / sb) && (R >= 32 || smem_for(p.kpp, 2) <= two_blocks);
  p.nbuf = ov.a_buffers > 0                                                          ? ov.a_buffers
           : (p.perm == nullptr && 16 * p.kpp > kc_for(p.kpp, 1) && two_fit) ? 2
                                                                                      : 1;
  p.kc = kc_for(p.kpp, p.nbuf);
  p.slices = slices;
  const size_t smem = smem_for(p.kpp, p.nbuf);

  // wgmma: 64-row tiles whose warpgroups share a k-phase (sb >= 4), lean mode, where the table says so or the
  // override forces it (on 1, off -1).
  const bool want_wg = ov.wgmma != 0 ? ov.wgmma > 0 : (tuned != nullptr && tuned->wg && R == tuned->rows);
  const bool wg = want_wg && R == 64 && sb >= 4 && !needs_general(p) && sm90a_code_runs();
  const at::Tensor ws = bind_output(p, slices, out);
  dim3 grid(cs, mblocks, (NS / sb) * slices);
  if (a.scalar_type() == at::kHalf) launch_gemm<half>(p, bits, mb, wg, ov.solo, grid, cs, smem, stream);
  else launch_gemm<__nv_bfloat16>(p, bits, mb, wg, ov.solo, grid, cs, smem, stream);
  if (slices > 1) reduce_slices(ws, out);
  return out;
}

}  // namespace gptq_vllm
