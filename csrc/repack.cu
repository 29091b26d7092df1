// GPU repack kernels (GPTQ -> Marlin, GPTQ -> ExLlama), the split-K reduction and small helpers.
// Both repacks produce exactly the format core's words (gptq_vllm/formats/marlin.py repack_gptq,
// exllama.py shuffle); tests/gpu/test_kernels.py checks them bit for bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "kernels.h"

namespace gptq_vllm {
namespace {

constexpr int THREADS = 256;

// One thread per output word.  Output word (kt, jw) of row kt: tile nt = jw / TW, word j = jw % TW
// (TW = 1024*b/32 words per 16x64 tile).  Field i of the word holds Q[16 kt + dr_i, 64 nt + c + dc_i]
// with (formats.md §4.1, marlin.TILE_MAP):
//   4-bit: t = j/4, w = j%4, c = 16w + t/4, base row 2(t%4); (dr, dc) per field =
//          (0,0) (8,0) (0,8) (8,8) (1,0) (9,0) (1,8) (9,8)
//   8-bit: t = j/8, w = (j%8)/2, h = j%2, c = 16w + 8h + t/4, base row 2(t%4); dr = 0, 8, 1, 9
// and Q[k, n] = code of GPTQ row perm[k] (or k), read from the GPTQ bitstream of column n.
template <int BITS>
__global__ void marlin_repack_kernel(const int* __restrict__ q, const int* __restrict__ perm, int* __restrict__ out,
                                     int K, int N) {
  constexpr int PF = 32 / BITS;
  constexpr int TW = 1024 / PF;
  const int row_words = (N / 64) * TW;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  if (idx >= static_cast<int64_t>(K / 16) * row_words) return;
  const int kt = static_cast<int>(idx / row_words), jw = static_cast<int>(idx % row_words);
  const int nt = jw / TW, j = jw % TW;
  int t, c;
  if constexpr (BITS == 4) {
    t = j / 4;
    c = 16 * (j % 4) + t / 4;
  } else {
    t = j / 8;
    c = 16 * ((j % 8) / 2) + 8 * (j % 2) + t / 4;
  }
  const int r = 16 * kt + 2 * (t % 4);
  const int n = 64 * nt + c;
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < PF; ++i) {
    int dr, dc;
    if constexpr (BITS == 4) {
      dr = ((i & 1) ? 8 : 0) + ((i & 4) ? 1 : 0);  // fields 0..7: rows +0 +8 +0 +8 +1 +9 +1 +9
      dc = (i & 2) ? 8 : 0;                        //             cols +0 +0 +8 +8 +0 +0 +8 +8
    } else {
      dr = ((i & 1) ? 8 : 0) + ((i & 2) ? 1 : 0);  // fields 0..3: rows +0 +8 +1 +9
      dc = 0;
    }
    const int k = r + dr;
    const int src = perm != nullptr ? __ldg(perm + k) : k;
    const uint32_t code =
        (static_cast<uint32_t>(__ldg(q + static_cast<int64_t>(src / PF) * N + n + dc)) >> (BITS * (src % PF))) &
        ((1u << BITS) - 1u);
    word |= code << (BITS * i);
  }
  out[idx] = static_cast<int>(word);
}

// One thread per (block of 32 codes, column): read the 32 codes of rows perm[32 c + i] (zero past K) from
// the GPTQ bitstream and write them at the ExLlama placements (formats/exllama.py PLACEMENTS).
template <int BITS>
__global__ void exllama_shuffle_kernel(const int* __restrict__ q, const int* __restrict__ perm, int* __restrict__ out,
                                       int K, int N, int rows) {
  const int n = blockIdx.x * THREADS + threadIdx.x;
  const int c = blockIdx.y;
  if (n >= N) return;
  uint32_t codes[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int k = 32 * c + i;
    codes[i] = 0;
    if (k < K) codes[i] = bitstream_field(q + n, N, perm != nullptr ? __ldg(perm + k) : k, BITS);
  }
  uint32_t w[BITS];
#pragma unroll
  for (int j = 0; j < BITS; ++j) w[j] = 0;
  if constexpr (BITS == 3) {
#pragma unroll
    for (int i = 0; i < 30; ++i) {
      const int j = i / 10, l = i % 10, m = l >> 1;
      w[j] |= codes[i] << ((l & 1) ? 16 + 3 * m : 3 * m);
    }
#pragma unroll
    for (int j = 0; j < 3; ++j) w[j] |= (((codes[30] >> j) & 1u) << 15) | (((codes[31] >> j) & 1u) << 31);
  } else if constexpr (BITS == 8) {
#pragma unroll
    for (int i = 0; i < 32; ++i) w[i >> 2] |= codes[i] << (8 * (i & 3));
  } else {
    constexpr int PF = 32 / BITS;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int l = i % PF;
      const int f = (l & 1) ? PF / 2 + (l >> 1) : (l >> 1);
      w[i / PF] |= codes[i] << (BITS * f);
    }
  }
#pragma unroll
  for (int j = 0; j < BITS; ++j)
    if (c * BITS + j < rows) out[(static_cast<int64_t>(c) * BITS + j) * N + n] = static_cast<int>(w[j]);
}

template <typename T>
__global__ void reduce_kernel(const float* __restrict__ ws, T* __restrict__ out, int slices, int64_t mn) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x;
  if (i >= mn) return;
  float s = 0.f;
  for (int z = 0; z < slices; ++z) s += ws[z * mn + i];  // fixed order: deterministic
  out[i] = TypeTraits<T>::from_float(s);
}

std::optional<at::Tensor> checked_perm(const std::optional<at::Tensor>& perm, int64_t K, const at::Tensor& q) {
  if (!perm.has_value() || !perm->defined() || perm->numel() == 0) return std::nullopt;
  TORCH_CHECK(perm->dim() == 1 && perm->size(0) == K && perm->device() == q.device(),
              "perm must be a 1-D tensor of K = ", K, " entries on qweight's device");
  return perm->to(at::kInt).contiguous();
}

}  // namespace

void reduce_slices(const at::Tensor& ws, at::Tensor& out) {
  const int slices = static_cast<int>(ws.size(0));
  const int64_t mn = out.numel();
  const int blocks = static_cast<int>((mn + THREADS - 1) / THREADS);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (out.scalar_type() == at::kHalf)
    reduce_kernel<half><<<blocks, THREADS, 0, stream>>>(ws.data_ptr<float>(), reinterpret_cast<half*>(out.data_ptr()), slices, mn);
  else
    reduce_kernel<__nv_bfloat16><<<blocks, THREADS, 0, stream>>>(ws.data_ptr<float>(), reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), slices, mn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor marlin_repack(const at::Tensor& qweight, const std::optional<at::Tensor>& perm_in, int64_t bits,
                         int64_t size_k, int64_t size_n) {
  TORCH_CHECK(bits == 4 || bits == 8, "marlin_repack: bits must be 4 or 8");
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 2,
              "marlin_repack: qweight must be a CUDA int32 [K*b/32, N] tensor");
  TORCH_CHECK(size_k % 16 == 0 && size_n % 64 == 0, "marlin_repack: needs K % 16 == 0 and N % 64 == 0, got K=",
              size_k, " N=", size_n);
  TORCH_CHECK(qweight.size(0) == size_k * bits / 32 && qweight.size(1) == size_n, "marlin_repack: qweight shape ",
              qweight.sizes(), " does not match K=", size_k, " N=", size_n);
  const at::Tensor q = qweight.contiguous();
  const auto perm = checked_perm(perm_in, size_k, q);
  at::Tensor out = at::empty({size_k / 16, size_n * 16 * bits / 32}, q.options());
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t total = out.numel();
  const int blocks = static_cast<int>((total + THREADS - 1) / THREADS);
  const int* pp = perm ? perm->data_ptr<int>() : nullptr;
  if (bits == 4)
    marlin_repack_kernel<4><<<blocks, THREADS, 0, stream>>>(q.data_ptr<int>(), pp, out.data_ptr<int>(), size_k, size_n);
  else
    marlin_repack_kernel<8><<<blocks, THREADS, 0, stream>>>(q.data_ptr<int>(), pp, out.data_ptr<int>(), size_k, size_n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor exllama_shuffle(const at::Tensor& qweight, const std::optional<at::Tensor>& perm_in, int64_t bits,
                           int64_t size_k) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "exllama_shuffle: bits must be 2, 3, 4 or 8");
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 2,
              "exllama_shuffle: qweight must be a CUDA int32 tensor");
  const int64_t rows = bits == 3 ? (size_k + 31) / 32 * 3 : (size_k + 32 / bits - 1) / (32 / bits);
  TORCH_CHECK(qweight.size(0) == rows, "exllama_shuffle: qweight has ", qweight.size(0), " rows, expected ", rows,
              " for K=", size_k);
  const at::Tensor q = qweight.contiguous();
  const auto perm = checked_perm(perm_in, size_k, q);
  at::Tensor out = at::empty_like(q);
  const int64_t N = q.size(1);
  if (out.numel() == 0) return out;
  c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dim3 grid(static_cast<unsigned>((N + THREADS - 1) / THREADS), static_cast<unsigned>((size_k + 31) / 32));
  const int* pp = perm ? perm->data_ptr<int>() : nullptr;
  switch (bits) {
    case 2: exllama_shuffle_kernel<2><<<grid, THREADS, 0, stream>>>(q.data_ptr<int>(), pp, out.data_ptr<int>(), size_k, N, rows); break;
    case 3: exllama_shuffle_kernel<3><<<grid, THREADS, 0, stream>>>(q.data_ptr<int>(), pp, out.data_ptr<int>(), size_k, N, rows); break;
    case 4: exllama_shuffle_kernel<4><<<grid, THREADS, 0, stream>>>(q.data_ptr<int>(), pp, out.data_ptr<int>(), size_k, N, rows); break;
    default: exllama_shuffle_kernel<8><<<grid, THREADS, 0, stream>>>(q.data_ptr<int>(), pp, out.data_ptr<int>(), size_k, N, rows); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace gptq_vllm
