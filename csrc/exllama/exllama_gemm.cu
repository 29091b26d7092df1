// ExLlama-layout GEMM for 2/3/4/8-bit GPTQ weights:  C[M, N] = A[M, K] @ W,  W[k, n] = s[g(k), n] * (q - z).
//
// Layout (formats.md §5, gptq_vllm/formats/exllama.py PLACEMENTS): qweight [packed_length(K), N] int32 is the
// GPTQ qweight (rows already in act-order `perm` order) with the fields of each block of 32 codes along K
// reordered in place.  A block of 32 codes is b words of one column (2, 3, 4 or 8 words); code i of the
// block (k = 32*blk + i) is at:
//   2-bit: word i/16, field f = (l even ? l/2 : 8 + l/2), l = i%16, bits [2f, 2f+2)
//   4-bit: word i/8,  field f = (l even ? l/2 : 4 + l/2), l = i%8,  bits [4f, 4f+4)
//   8-bit: word i/4,  byte i%4
//   3-bit: i < 30: word j = i/10, l = i%10, m = l/2: bits [3m, 3m+3) for even l, [16+3m, 16+3m+3) for odd l;
//          i = 30, 31: bit j of the code is bit 15 (code 30) or bit 31 (code 31) of word j, j = 0..2.
// Zeros are exact (GPTQ v2) codes packed along N (bitpack.pack_cols): zero of column n is the b-bit field
// at bit b*n of its row's bitstream.  Scales [NG, N] plain.  Group of row k: g_idx_sorted[k], else k / G,
// else 0 (G = -1).
//
// Two paths:
//   M <= SMALL_M: one thread per output column, a block of 128 columns x MT rows; A staged in shared memory
//     as fp32; split-K over blocks of 32 rows with fp32 partials reduced in slice order (deterministic).
//   M > SMALL_M: dequantize W to a torch-allocated [K, N] tensor of a's dtype (exactly the reference's
//     rounding) and multiply with at::matmul (cuBLAS) on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common.cuh"
#include "../kernels.h"

namespace gptq_vllm {
namespace exllama {

constexpr int THREADS = 128;
constexpr int MT = 8;        // rows of A per block (small-M path)
constexpr int CB_CHUNK = 4;  // code blocks (of 32 rows) of A staged per shared-memory chunk
constexpr int SMALL_M = 16;

// Decode the 32 codes of one block of column n (words at q[0], q[stride], ...) into codes[32].
// Only the first `valid` words exist (the last block of a K that is not a multiple of 32 is cut short
// after the word holding row K-1; bitpack pads to 32/b codes for b = 2, 4, 8): the rest read as 0.
template <int BITS>
__device__ __forceinline__ void decode_block(const int* __restrict__ q, int64_t stride, int valid, uint32_t* codes) {
  uint32_t w[BITS];
#pragma unroll
  for (int i = 0; i < BITS; ++i) w[i] = i < valid ? static_cast<uint32_t>(__ldg(q + i * stride)) : 0u;
  if constexpr (BITS == 3) {
#pragma unroll
    for (int i = 0; i < 30; ++i) {
      const int j = i / 10, l = i % 10, m = l >> 1;
      codes[i] = (w[j] >> ((l & 1) ? 16 + 3 * m : 3 * m)) & 7u;
    }
    codes[30] = ((w[0] >> 15) & 1u) | (((w[1] >> 15) & 1u) << 1) | (((w[2] >> 15) & 1u) << 2);
    codes[31] = ((w[0] >> 31) & 1u) | (((w[1] >> 31) & 1u) << 1) | (((w[2] >> 31) & 1u) << 2);
  } else if constexpr (BITS == 8) {
#pragma unroll
    for (int i = 0; i < 32; ++i) codes[i] = (w[i >> 2] >> (8 * (i & 3))) & 0xffu;
  } else {
    constexpr int PF = 32 / BITS;  // codes per word
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      const int l = i % PF;
      const int f = (l & 1) ? PF / 2 + (l >> 1) : (l >> 1);
      codes[i] = (w[i / PF] >> (BITS * f)) & ((1u << BITS) - 1u);
    }
  }
}

struct Params {
  const void* A;       // [M, K]
  const int* Q;        // [packed_length(K), N]
  const int* Z;        // [NG, packed_length(N)] or nullptr (z = 2^(b-1))
  const void* S;       // [NG, N]
  const int* gidx;     // [K] or nullptr
  void* C;             // [M, N] (slices == 1) or W [K, N] (dequant kernel)
  float* ws;           // [slices, M, N]
  int M, K, N;
  int G;               // rows per group, 0 = one group
  int zstride;         // words per row of Z
  int qrows;           // rows of Q
  int cb_per_slice;
};

template <int BITS>
__device__ __forceinline__ int group_of(const Params& p, int k) {
  return p.gidx != nullptr ? __ldg(p.gidx + k) : (p.G ? k / p.G : 0);
}

template <int BITS>
__device__ __forceinline__ int zero_of(const Params& p, int g, int n) {
  if (p.Z == nullptr) return 1 << (BITS - 1);
  return static_cast<int>(bitstream_field(p.Z + static_cast<int64_t>(g) * p.zstride, 1, n, BITS));
}

template <typename T, int BITS>
__global__ void __launch_bounds__(THREADS) exllama_small_m_kernel(const Params p) {
  using TT = TypeTraits<T>;
  __shared__ float As[MT][CB_CHUNK * 32];
  const int n = blockIdx.x * THREADS + threadIdx.x;
  const int m0 = blockIdx.y * MT;
  const int CB = (p.K + 31) / 32;
  const int cb0 = blockIdx.z * p.cb_per_slice;
  const int cb1 = min(CB, cb0 + p.cb_per_slice);
  const T* A = reinterpret_cast<const T*>(p.A);
  const T* S = reinterpret_cast<const T*>(p.S);

  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  int g_cur = -1;
  float s = 0.f, z = 0.f;

  for (int c0 = cb0; c0 < cb1; c0 += CB_CHUNK) {
    const int k0 = c0 * 32;
    __syncthreads();
    for (int id = threadIdx.x; id < MT * CB_CHUNK * 32; id += THREADS) {
      const int r = id / (CB_CHUNK * 32), kk = id % (CB_CHUNK * 32);
      const int row = m0 + r, k = k0 + kk;
      As[r][kk] = (row < p.M && k < p.K && (c0 + kk / 32) < cb1)
                      ? TT::to_float(A[static_cast<int64_t>(row) * p.K + k])
                      : 0.f;
    }
    __syncthreads();
    if (n < p.N) {
      for (int c = c0; c < min(cb1, c0 + CB_CHUNK); ++c) {
        uint32_t codes[32];
        decode_block<BITS>(p.Q + static_cast<int64_t>(c) * BITS * p.N + n, p.N, p.qrows - c * BITS, codes);
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int k = c * 32 + i;
          if (k < p.K) {
            const int g = group_of<BITS>(p, k);
            if (g != g_cur) {  // uniform across the block: every thread is at the same k
              g_cur = g;
              s = TT::to_float(S[static_cast<int64_t>(g) * p.N + n]);
              z = static_cast<float>(zero_of<BITS>(p, g, n));
            }
            // fp32 weight, as the reference matmul (dequantize in fp32, fp32 accumulation).
            const float w = (static_cast<float>(codes[i]) - z) * s;
#pragma unroll
            for (int m = 0; m < MT; ++m) acc[m] = fmaf(As[m][k - k0], w, acc[m]);
          }
        }
      }
    }
  }
  if (n >= p.N) return;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int row = m0 + m;
    if (row >= p.M) break;
    if (gridDim.z == 1) {
      reinterpret_cast<T*>(p.C)[static_cast<int64_t>(row) * p.N + n] = TT::from_float(acc[m]);
    } else {
      p.ws[(static_cast<int64_t>(blockIdx.z) * p.M + row) * p.N + n] = acc[m];
    }
  }
}

// W[k, n] = T((q - z) * s) for one block of 32 rows per thread (coalesced along n).
template <typename T, int BITS>
__global__ void __launch_bounds__(THREADS) exllama_dequant_kernel(const Params p) {
  using TT = TypeTraits<T>;
  const int n = blockIdx.x * THREADS + threadIdx.x;
  const int c = blockIdx.y;
  if (n >= p.N) return;
  const T* S = reinterpret_cast<const T*>(p.S);
  T* W = reinterpret_cast<T*>(p.C);
  uint32_t codes[32];
  decode_block<BITS>(p.Q + static_cast<int64_t>(c) * BITS * p.N + n, p.N, p.qrows - c * BITS, codes);
  int g_cur = -1;
  float s = 0.f, z = 0.f;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int k = c * 32 + i;
    if (k < p.K) {
      const int g = group_of<BITS>(p, k);
      if (g != g_cur) {
        g_cur = g;
        s = TT::to_float(S[static_cast<int64_t>(g) * p.N + n]);
        z = static_cast<float>(zero_of<BITS>(p, g, n));
      }
      W[static_cast<int64_t>(k) * p.N + n] = TT::from_float((static_cast<float>(codes[i]) - z) * s);
    }
  }
}

template <typename T>
void launch(const Params& p, int bits, bool small, dim3 grid, cudaStream_t stream) {
#define GPTQ_VLLM_EXL_CASE(B)                                                    \
  case B:                                                                        \
    if (small) exllama_small_m_kernel<T, B><<<grid, THREADS, 0, stream>>>(p);    \
    else exllama_dequant_kernel<T, B><<<grid, THREADS, 0, stream>>>(p);          \
    break;
  switch (bits) {
    GPTQ_VLLM_EXL_CASE(2)
    GPTQ_VLLM_EXL_CASE(3)
    GPTQ_VLLM_EXL_CASE(4)
    GPTQ_VLLM_EXL_CASE(8)
    default: TORCH_CHECK(false, "exllama_gemm: bits must be 2, 3, 4 or 8");
  }
#undef GPTQ_VLLM_EXL_CASE
}

inline int64_t packed_length(int64_t n, int64_t bits) {
  // bitpack.packed_length: whole blocks of 32/b codes in one word (b = 2, 4, 8) or 32 codes in 3 words
  return bits == 3 ? (n + 31) / 32 * 3 : (n + 32 / bits - 1) / (32 / bits);
}

}  // namespace exllama

at::Tensor exllama_gemm(const at::Tensor& a_in, const at::Tensor& qweight, const std::optional<at::Tensor>& qzeros,
                        const at::Tensor& scales, const std::optional<at::Tensor>& g_idx_sorted, int64_t bits,
                        int64_t group_size) {
  using namespace exllama;
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "exllama_gemm: bits must be 2, 3, 4 or 8");
  TORCH_CHECK(a_in.is_cuda() && a_in.dim() == 2, "exllama_gemm: a must be a 2-D CUDA tensor");
  TORCH_CHECK(a_in.scalar_type() == at::kHalf || a_in.scalar_type() == at::kBFloat16,
              "exllama_gemm: a must be float16 or bfloat16");
  TORCH_CHECK(scales.scalar_type() == a_in.scalar_type() && scales.dim() == 2 && scales.is_contiguous(),
              "exllama_gemm: scales must be contiguous [NG, N] of a's dtype");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "exllama_gemm: qweight must be contiguous int32");
  const at::Tensor a = a_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = scales.size(1), NG = scales.size(0);
  TORCH_CHECK(qweight.size(1) == N && qweight.size(0) == packed_length(K, bits), "exllama_gemm: qweight shape ",
              qweight.sizes(), " does not match K=", K, " N=", N, " bits=", bits);
  TORCH_CHECK(group_size == -1 || group_size > 0, "exllama_gemm: bad group_size ", group_size);
  const bool has_g = g_idx_sorted.has_value() && g_idx_sorted->defined() && g_idx_sorted->numel() > 0;
  if (has_g) {
    TORCH_CHECK(g_idx_sorted->scalar_type() == at::kInt && g_idx_sorted->dim() == 1 && g_idx_sorted->size(0) == K &&
                    g_idx_sorted->is_contiguous(),
                "exllama_gemm: g_idx_sorted must be contiguous int32 [K]");
  } else if (group_size != -1 && group_size < K) {
    TORCH_CHECK(NG >= (K + group_size - 1) / group_size, "exllama_gemm: ", NG, " scale rows for K=", K, " G=",
                group_size);
  }
  const bool has_z = qzeros.has_value() && qzeros->defined() && qzeros->numel() > 0;
  if (has_z) {
    TORCH_CHECK(qzeros->scalar_type() == at::kInt && qzeros->dim() == 2 && qzeros->size(0) == NG &&
                    qzeros->size(1) == packed_length(N, bits) && qzeros->is_contiguous(),
                "exllama_gemm: qzeros must be contiguous int32 [NG, packed_length(N)]");
  }
  at::Tensor out = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();

  c10::cuda::CUDAGuard guard(a.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Params p{};
  p.A = a.data_ptr();
  p.Q = qweight.data_ptr<int>();
  p.qrows = static_cast<int>(qweight.size(0));
  p.Z = has_z ? qzeros->data_ptr<int>() : nullptr;
  p.zstride = static_cast<int>(packed_length(N, bits));
  p.S = scales.data_ptr();
  p.gidx = has_g ? g_idx_sorted->data_ptr<int>() : nullptr;
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(K);
  p.N = static_cast<int>(N);
  p.G = (group_size == -1 || group_size >= K) ? 0 : static_cast<int>(group_size);
  const int CB = static_cast<int>((K + 31) / 32);
  const int nblocks = static_cast<int>((N + THREADS - 1) / THREADS);

  if (M > SMALL_M) {
    at::Tensor w = at::empty({K, N}, a.options());
    p.C = w.data_ptr();
    if (a.scalar_type() == at::kHalf) launch<half>(p, static_cast<int>(bits), false, dim3(nblocks, CB), stream);
    else launch<__nv_bfloat16>(p, static_cast<int>(bits), false, dim3(nblocks, CB), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::matmul_out(out, a, w);
    return out;
  }
  const int mblocks = static_cast<int>((M + MT - 1) / MT);
  const int64_t base = static_cast<int64_t>(nblocks) * mblocks;
  const int64_t target = 4 * static_cast<int64_t>(sm_count());
  int slices = 1;
  if (base < target) slices = static_cast<int>(std::min<int64_t>({(target + base - 1) / base, (CB + 3) / 4, 64}));
  p.cb_per_slice = (CB + slices - 1) / slices;
  p.cb_per_slice = (p.cb_per_slice + CB_CHUNK - 1) / CB_CHUNK * CB_CHUNK;
  slices = (CB + p.cb_per_slice - 1) / p.cb_per_slice;
  const at::Tensor ws = bind_output(p, slices, out);
  dim3 grid(nblocks, mblocks, slices);
  if (a.scalar_type() == at::kHalf) launch<half>(p, static_cast<int>(bits), true, grid, stream);
  else launch<__nv_bfloat16>(p, static_cast<int>(bits), true, grid, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (slices > 1) reduce_slices(ws, out);
  return out;
}

}  // namespace gptq_vllm
