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
// Work decomposition (kept simple and correct; issue 7 tunes it):
//   block = 4 warps = `ns` 64-column strips x (4/ns) k-phases; block tile = BM (16*MB) rows x 64*ns columns.
//   The K loop runs over k-blocks of 64 rows (4 k-tiles).  The block stages A[BM, 64] in shared memory;
//   warp (strip, phase) handles k-tiles phase, phase + 4/ns, ... of each k-block for its strip.  Partial
//   sums of the k-phases are added through shared memory in a fixed order (deterministic).
//   Split-K across blocks (gridDim.z slices, contiguous ranges of k-blocks) for skinny problems: each
//   slice writes fp32 partials to a torch-allocated workspace [S, M, N] and a second kernel adds them in
//   slice order (no atomics, no locks: deterministic and CUDA-graph safe).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "kernels.h"

namespace gptq_vllm {
namespace marlin {

constexpr int THREADS = 128;
constexpr int KB_ROWS = 64;            // k rows per k-block (4 k-tiles of 16)
constexpr int A_STRIDE = KB_ROWS + 8;  // halves per staged A row: 144 bytes -> fragment loads hit 32 banks
constexpr int DENSE_MIN_M = 128;       // from this M on: dequantize + cuBLAS (measured faster on H200 today)

struct Params {
  const void* A;          // [M, K] fp16/bf16, row-major, 16-byte aligned rows
  const int4* B;          // Marlin words
  const void* scales;     // [NG, N] Marlin-permuted, dtype of A
  const uint32_t* zeros;  // [NG, N*b/32] Marlin zero points, or nullptr (symmetric: z = 2^(b-1))
  const int* gidx;        // [K] group of each row (nondecreasing), or nullptr
  void* C;                // [M, N] output (slices == 1)
  float* ws;              // [slices, M, N] fp32 partials (slices > 1)
  int M, K, N;
  int group_rows;      // rows per group when groups are runs of G rows with G % 16 == 0; 0: one group
  int single_perm;     // scales were permuted with SCALE_PERM_SINGLE (group_size == -1 or >= K)
  int scale_epilogue;  // one group and no g_idx: multiply the fp32 accumulators by the scales at the end
  int ns;              // 64-column strips per block (1, 2, 4); divides N/64
  int kb_per_slice;    // k-blocks per split-K slice
};

// Index of the scale of strip nt, sub-tile s (0..7), column n_in (0..7) inside the sub-tile, i.e. of
// column c = 64*nt + 8*s + n_in, inside a row of the Marlin-permuted scales (marlin.permute_scales):
//   SCALE_PERM (grouped) on runs of 64: position p = 8i + j holds column i + 8j, so column c' = 8s + n_in
//     of the run sits at 8*(c' % 8) + c'/8 = 8*n_in + s.  The 8 scales of a lane (n_in = t/4, s = 0..7)
//     are therefore 8 consecutive halves: one 16-byte load.
//   SCALE_PERM_SINGLE on runs of 32: position 8i + jj holds column 2i + J[jj], J = (0,1,8,9,16,17,24,25);
//     column c' = 8a + 2i + b (a, i < 4, b < 2) sits at 8i + 2a + b; here a = s%4, 2i + b = n_in, and the
//     run is s/4.
__device__ __forceinline__ int scale_pos(int nt, int s, int n_in, bool single) {
  if (!single) return nt * 64 + 8 * n_in + s;
  return nt * 64 + 32 * (s >> 2) + 8 * (n_in >> 1) + 2 * (s & 3) + (n_in & 1);
}

// Zero point of strip nt, sub-tile s, column n_in, from a row of Marlin zero points (marlin.pack_zeros:
// SCALE_PERM on runs of 64, then fields interleaved (0,2,4,6,1,3,5,7) [4-bit] or (0,2,1,3) [8-bit] inside
// each word, then packed along N, field i of word w = position w*(32/b) + i):
//   after SCALE_PERM the zero sits at p = 8*n_in + s of the run (as for scales);
//   4-bit: word 8*nt + p/8 = 8*nt + n_in, field argsort(0,2,4,6,1,3,5,7)[s] = (0,4,1,5,2,6,3,7)[s];
//   8-bit: word 16*nt + p/4 = 16*nt + 2*n_in + s/4, field (0,2,1,3)[s%4] (that interleave is an involution).
template <int BITS>
__device__ __forceinline__ int zero_point(const uint32_t* __restrict__ zrow, int nt, int s, int n_in) {
  if constexpr (BITS == 4) {
    const int field = ((s & 1) << 2) | (s >> 1);  // (0,4,1,5,2,6,3,7)[s]
    return (__ldg(zrow + 8 * nt + n_in) >> (4 * field)) & 0xf;
  } else {
    const int f4 = s & 3;
    const int field = (f4 == 1) ? 2 : (f4 == 2 ? 1 : f4);
    return (__ldg(zrow + 16 * nt + 2 * n_in + (s >> 2)) >> (8 * field)) & 0xff;
  }
}

__device__ __forceinline__ uint32_t word_of(const int4& v, int j) {
  return static_cast<uint32_t>(j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w);
}

// Per-lane cache of the scales / zero offsets of the group in use, for the 8 sub-tiles of its strip at
// the lane's B column n_in = gid.
template <typename T, int BITS>
struct GroupCache {
  using T2 = typename TypeTraits<T>::T2;
  T2 s2[8];     // (s, s)
  T2 off_a[8];  // magic-number offsets, see dequant()
  T2 off_b[8];
  float zf[8];  // zero as float (bf16 8-bit path)

  __device__ __forceinline__ void set_zero(int s, int z) {
    zf[s] = static_cast<float>(z);
    if constexpr (std::is_same<T, half>::value) {
      if constexpr (BITS == 4) {
        off_a[s] = __float2half2_rn(1024.f + z);   // lo halves hold 1024 + q
        off_b[s] = __float2half2_rn(-64.f - z);    // hi halves hold 1024 + 16 q; * 1/16 -> 64 + q
      } else {
        off_a[s] = __float2half2_rn(1024.f + z);   // prmt halves hold 1024 + q
      }
    } else {
      off_a[s] = __float2bfloat162_rn(128.f + z);  // bf16 halves hold 128 + q (4-bit)
    }
  }

  __device__ __forceinline__ void load(const Params& p, int g, int nt, int gid) {
    const T* srow = reinterpret_cast<const T*>(p.scales) + static_cast<int64_t>(g) * p.N;
    if (!p.scale_epilogue) {
      if (!p.single_perm) {
        int4 v = __ldg(reinterpret_cast<const int4*>(srow + scale_pos(nt, 0, gid, false)));
        const T* sv = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int s = 0; s < 8; ++s) s2[s] = T2{sv[s], sv[s]};
      } else {
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          T x = srow[scale_pos(nt, s, gid, true)];
          s2[s] = T2{x, x};
        }
      }
    }
    if (p.zeros != nullptr) {
      const uint32_t* zrow = p.zeros + static_cast<int64_t>(g) * (p.N * BITS / 32);
#pragma unroll
      for (int s = 0; s < 8; ++s) set_zero(s, zero_point<BITS>(zrow, nt, s, gid));
    }
  }
};

// Dequantize the lane's B words of one k-tile into the B fragments of the 8 sub-tiles:
// bf[s][0] = (k 2tig, 2tig+1), bf[s][1] = (k 2tig+8, 2tig+9) at column gid of sub-tile s, value (q - z) [* s].
// All magic-number conversions are exact: q, z < 256 and 1024 + q (fp16) / 128 + q (bf16, q < 16) are
// representable, and the differences are small integers.
template <typename T, int BITS>
__device__ __forceinline__ void dequant(const int4* bq, const GroupCache<T, BITS>& gc, bool apply_scale,
                                        uint32_t (*bf)[2]) {
  using T2 = typename TypeTraits<T>::T2;
  if constexpr (BITS == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t q = word_of(bq[0], j);
      T2 v[4];  // (e0,e1) and (e2,e3) of sub-tiles 2j and 2j+1
      if constexpr (std::is_same<T, half>::value) {
        // lo = (q & 0x000f000f) | 0x64006400 = half2(1024 + nib0, 1024 + nib4): rows r, r+1, column c
        // hi = (q & 0x00f000f0) | 0x64006400 = half2(1024 + 16 nib1, 1024 + 16 nib5): rows r+8, r+9
        // q >> 8 brings nibbles 2,6 (column c+8, rows r, r+1) and 3,7 (rows r+8, r+9) into place.
        const half2 sixteenth = __float2half2_rn(0.0625f);
        uint32_t lo = lop3_and_or(q, 0x000f000fu, 0x64006400u);
        uint32_t hi = lop3_and_or(q, 0x00f000f0u, 0x64006400u);
        v[0] = __hsub2(from_u32<half2>(lo), gc.off_a[2 * j]);
        v[1] = __hfma2(from_u32<half2>(hi), sixteenth, gc.off_b[2 * j]);
        q >>= 8;
        lo = lop3_and_or(q, 0x000f000fu, 0x64006400u);
        hi = lop3_and_or(q, 0x00f000f0u, 0x64006400u);
        v[2] = __hsub2(from_u32<half2>(lo), gc.off_a[2 * j + 1]);
        v[3] = __hfma2(from_u32<half2>(hi), sixteenth, gc.off_b[2 * j + 1]);
      } else {
        // bf16 has 7 mantissa bits: (x & 0x000f000f) | 0x43004300 = bf162(128 + a, 128 + b) for nibbles
        // at bits 0 and 16; shifting q by 0/4/8/12 selects the pairs (0,4) (1,5) (2,6) (3,7).
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          uint32_t x = lop3_and_or(q >> (4 * u), 0x000f000fu, 0x43004300u);
          v[u] = __hsub2(from_u32<__nv_bfloat162>(x), gc.off_a[2 * j + (u >> 1)]);
        }
      }
      if (apply_scale) {
        v[0] = __hmul2(v[0], gc.s2[2 * j]);
        v[1] = __hmul2(v[1], gc.s2[2 * j]);
        v[2] = __hmul2(v[2], gc.s2[2 * j + 1]);
        v[3] = __hmul2(v[3], gc.s2[2 * j + 1]);
      }
      bf[2 * j][0] = as_u32(v[0]);
      bf[2 * j][1] = as_u32(v[1]);
      bf[2 * j + 1][0] = as_u32(v[2]);
      bf[2 * j + 1][1] = as_u32(v[3]);
    }
  } else {
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint32_t q = word_of(bq[s >> 2], s & 3);  // bytes: Q[r,c] Q[r+8,c] Q[r+1,c] Q[r+9,c]
      T2 v0, v1;
      if constexpr (std::is_same<T, half>::value) {
        // prmt builds half2(1024 + byte0, 1024 + byte2) and half2(1024 + byte1, 1024 + byte3).
        v0 = __hsub2(from_u32<half2>(__byte_perm(q, 0x64u, 0x4240)), gc.off_a[s]);
        v1 = __hsub2(from_u32<half2>(__byte_perm(q, 0x64u, 0x4341)), gc.off_a[s]);
      } else {
        const float z = gc.zf[s];
        v0 = __floats2bfloat162_rn(static_cast<float>(q & 0xff) - z, static_cast<float>((q >> 16) & 0xff) - z);
        v1 = __floats2bfloat162_rn(static_cast<float>((q >> 8) & 0xff) - z, static_cast<float>(q >> 24) - z);
      }
      if (apply_scale) {
        v0 = __hmul2(v0, gc.s2[s]);
        v1 = __hmul2(v1, gc.s2[s]);
      }
      bf[s][0] = as_u32(v0);
      bf[s][1] = as_u32(v1);
    }
  }
}

// Slow path for a k-tile whose 16 rows span several groups (row-parallel act-order shards, or group sizes
// that are not multiples of 16): every fragment element gets its own group's scale and zero.
// Element e of a fragment is row 2tig + (0, 1, 8, 9)[e]; its field in the lane's words:
//   4-bit: word s/2, nibble 2*(s%2) + 4*(e&1) + (e>>1)    (from the nibble order listed at the top)
//   8-bit: word s, byte 2*(e&1) + (e>>1)
template <typename T, int BITS>
__device__ __forceinline__ void dequant_rows(const Params& p, const int4* bq, int kt, int nt, int gid, int tig,
                                          uint32_t (*bf)[2]) {
  using TT = TypeTraits<T>;
  const T* scales = reinterpret_cast<const T*>(p.scales);
  float val[8][4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int row = kt * 16 + 2 * tig + ((e & 1) | ((e >> 1) << 3));
    const int g = p.gidx != nullptr ? __ldg(p.gidx + row) : (p.group_rows ? row / p.group_rows : 0);
    const T* srow = scales + static_cast<int64_t>(g) * p.N;
    const uint32_t* zrow = p.zeros != nullptr ? p.zeros + static_cast<int64_t>(g) * (p.N * BITS / 32) : nullptr;
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      uint32_t code;
      if constexpr (BITS == 4) {
        code = (word_of(bq[0], s >> 1) >> (4 * (2 * (s & 1) + 4 * (e & 1) + (e >> 1)))) & 0xf;
      } else {
        code = (word_of(bq[s >> 2], s & 3) >> (8 * (2 * (e & 1) + (e >> 1)))) & 0xff;
      }
      const int z = zrow != nullptr ? zero_point<BITS>(zrow, nt, s, gid) : (1 << (BITS - 1));
      const float sc = TT::to_float(srow[scale_pos(nt, s, gid, p.single_perm)]);
      // Same rounding as the fast path: (q - z) exact, one rounding of the product to T.
      val[s][e] = TT::to_float(TT::from_float((static_cast<float>(static_cast<int>(code) - z)) * sc));
    }
  }
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    bf[s][0] = as_u32(TT::pack(val[s][0], val[s][1]));
    bf[s][1] = as_u32(TT::pack(val[s][2], val[s][3]));
  }
}

// B words of a warp's k-tiles of one k-block (global -> registers): one coalesced 512/1024-byte tile per
// warp and k-tile.  The main loop pipelines these loads one k-block ahead, so that the loads of k-block
// kb+1 are in flight while k-block kb is multiplied.
template <int W4, int TILE_I4>
__device__ __forceinline__ void load_b(const Params& p, int kb, int ns, int kw, int phase, int nstrips, int nt,
                                       int lane, int4 (&dst)[4][W4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i < ns) {
      const int kt = kb * 4 + phase + i * kw;
      const int4* src = p.B + (static_cast<int64_t>(kt) * nstrips + nt) * TILE_I4 + lane * W4;
#pragma unroll
      for (int w = 0; w < W4; ++w) dst[i][w] = __ldg(src + w);
    }
  }
}

template <typename T, int BITS, int MB>
__global__ void __launch_bounds__(THREADS) marlin_gemm_kernel(const Params p) {
  using TT = TypeTraits<T>;
  using T2 = typename TT::T2;
  constexpr int BM = 16 * MB;
  constexpr int W4 = BITS / 4;      // 16-byte words per lane per k-tile
  constexpr int TILE_I4 = 32 * W4;  // 16-byte words per 16x64 tile

  __shared__ __align__(16) T As[BM][A_STRIDE];
  __shared__ float red[2 * MB * 1024];  // k-phase reduction (only when ns <= 2, i.e. >= 2 phases)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;  // mma groupID / thread-in-group
  const int ns = p.ns, kw = 4 / ns;
  const int strip = warp % ns, phase = warp / ns;
  const int nstrips = p.N / 64;
  const int nt = blockIdx.x * ns + strip;
  const int m0 = blockIdx.y * BM;
  const int KB = p.K / KB_ROWS;
  const int kb0 = blockIdx.z * p.kb_per_slice;
  const int kb1 = min(KB, kb0 + p.kb_per_slice);
  const T* A = reinterpret_cast<const T*>(p.A);

  float acc[MB][8][4];
#pragma unroll
  for (int mi = 0; mi < MB; ++mi)
#pragma unroll
    for (int s = 0; s < 8; ++s)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][s][e] = 0.f;

  GroupCache<T, BITS> gc;
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    gc.set_zero(s, 1 << (BITS - 1));  // symmetric: uint4b8 / uint8b128
    gc.s2[s] = TT::pack(1.f, 1.f);
  }
  int g_cur = -1;

  // B words of this warp's k-tiles of one k-block (global -> registers, one coalesced 512/1024-byte tile
  // per warp and k-tile), software-pipelined one k-block ahead so that the loads of k-block kb+1 are in
  // flight while k-block kb is multiplied.
  int4 bq[4][W4], bnext[4][W4];
  if (kb0 < kb1) load_b<W4, TILE_I4>(p, kb0, ns, kw, phase, nstrips, nt, lane, bq);

  for (int kb = kb0; kb < kb1; ++kb) {
    // 1. Prefetch the next k-block's B words.
    if (kb + 1 < kb1) load_b<W4, TILE_I4>(p, kb + 1, ns, kw, phase, nstrips, nt, lane, bnext);
    // 2. Stage A[m0 : m0 + BM, 64 kb : 64 kb + 64] in shared memory (rows past M read as zero).
    __syncthreads();
    for (int id = threadIdx.x; id < BM * 8; id += THREADS) {
      const int r = id >> 3, c8 = id & 7;
      const int row = m0 + r;
      int4 v = make_int4(0, 0, 0, 0);
      if (row < p.M) v = *reinterpret_cast<const int4*>(A + static_cast<int64_t>(row) * p.K + kb * KB_ROWS + c8 * 8);
      *reinterpret_cast<int4*>(&As[r][c8 * 8]) = v;
    }
    __syncthreads();
    // 3. Dequantize and multiply this warp's k-tiles.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (i < ns) {
        const int kk = phase + i * kw;  // k-tile inside the k-block
        const int kt = kb * 4 + kk;
        uint32_t bf[8][2];
        bool per_row = false;
        int g = 0;
        if (p.gidx != nullptr) {
          // g_idx_sorted is nondecreasing: the tile is in one group iff its first and last rows are.
          const int ga = __ldg(p.gidx + kt * 16), gb = __ldg(p.gidx + kt * 16 + 15);
          per_row = ga != gb;
          g = ga;
        } else if (p.group_rows) {
          g = (kt * 16) / p.group_rows;
        }
        if (per_row) {
          dequant_rows<T, BITS>(p, bq[i], kt, nt, gid, tig, bf);
        } else {
          if (g != g_cur) {
            gc.load(p, g, nt, gid);
            g_cur = g;
          }
          dequant<T, BITS>(bq[i], gc, !p.scale_epilogue, bf);
        }
#pragma unroll
        for (int mi = 0; mi < MB; ++mi) {
          if (m0 + mi * 16 < p.M) {
            uint32_t a[4];
            const T* base = &As[mi * 16 + gid][kk * 16 + 2 * tig];
            a[0] = *reinterpret_cast<const uint32_t*>(base);
            a[1] = *reinterpret_cast<const uint32_t*>(base + 8 * A_STRIDE);
            a[2] = *reinterpret_cast<const uint32_t*>(base + 8);
            a[3] = *reinterpret_cast<const uint32_t*>(base + 8 * A_STRIDE + 8);
#pragma unroll
            for (int s = 0; s < 8; ++s) mma_16816<T>(a, bf[s], acc[mi][s]);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int w = 0; w < W4; ++w) bq[i][w] = bnext[i][w];
  }

  // 4. Add the k-phases' partial sums: phase kw-1 stores, phases kw-2 .. 1 add in turn, phase 0 takes it.
  if (kw > 1) {
    for (int ph = kw - 1; ph >= 0; --ph) {
      __syncthreads();
      if (phase == ph) {
#pragma unroll
        for (int mi = 0; mi < MB; ++mi)
#pragma unroll
          for (int s = 0; s < 8; ++s)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float* r = &red[(((strip * MB + mi) * 8 + s) * 4 + e) * 32 + lane];
              if (ph == kw - 1) *r = acc[mi][s][e];
              else if (ph > 0) *r += acc[mi][s][e];
              else acc[mi][s][e] += *r;
            }
      }
    }
  }
  if (phase != 0) return;

  // 5. Epilogue: C fragment element (row gid [+8], column 2tig [+1]) of sub-tile s is output
  //    (m0 + 16 mi + gid [+8], 64 nt + 8 s + 2 tig [+1]).
  float sc[8][2];
#pragma unroll
  for (int s = 0; s < 8; ++s) sc[s][0] = sc[s][1] = 1.f;
  if (p.scale_epilogue) {
    const T* srow = reinterpret_cast<const T*>(p.scales);
#pragma unroll
    for (int s = 0; s < 8; ++s)
#pragma unroll
      for (int c = 0; c < 2; ++c) sc[s][c] = TT::to_float(srow[scale_pos(nt, s, 2 * tig + c, p.single_perm)]);
  }
  const bool direct = gridDim.z == 1;
#pragma unroll
  for (int mi = 0; mi < MB; ++mi) {
#pragma unroll
    for (int half_ = 0; half_ < 2; ++half_) {
      const int row = m0 + mi * 16 + gid + 8 * half_;
      if (row >= p.M) continue;
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const int col = nt * 64 + 8 * s + 2 * tig;
        const float v0 = acc[mi][s][2 * half_] * sc[s][0];
        const float v1 = acc[mi][s][2 * half_ + 1] * sc[s][1];
        if (direct) {
          *reinterpret_cast<T2*>(reinterpret_cast<T*>(p.C) + static_cast<int64_t>(row) * p.N + col) = TT::pack(v0, v1);
        } else {
          *reinterpret_cast<float2*>(p.ws + (static_cast<int64_t>(blockIdx.z) * p.M + row) * p.N + col) =
              make_float2(v0, v1);
        }
      }
    }
  }
}


// Large-M path: dequantize the Marlin weight to a dense [K, N] matrix of a's dtype, then multiply with
// cuBLAS.  One block per 16x64 tile: each thread decodes whole Marlin words (the word -> (row, column) map
// of marlin.TILE_MAP, as in repack.cu) into a shared-memory tile, which is then written out in coalesced
// 16-byte rows.  W[k, n] = T((q - z) * s) in fp32, one rounding (as in the mma path).
template <typename T, int BITS>
__global__ void __launch_bounds__(128) marlin_dequant_kernel(const Params p, T* __restrict__ W, int group_size,
                                                             int single) {
  using TT = TypeTraits<T>;
  constexpr int PF = 32 / BITS;
  constexpr int TW = 1024 / PF;  // words per tile
  __shared__ __align__(16) T tile[16][A_STRIDE];
  const int nt = blockIdx.x, kt = blockIdx.y;
  const int* words = reinterpret_cast<const int*>(p.B) + (static_cast<int64_t>(kt) * (p.N / 64) + nt) * TW;
  const T* scales = reinterpret_cast<const T*>(p.scales);
  for (int j = threadIdx.x; j < TW; j += 128) {
    const uint32_t word = static_cast<uint32_t>(__ldg(words + j));
    int t, sub0;  // lane, first n8 sub-tile of the word
    if constexpr (BITS == 4) {
      t = j / 4;
      sub0 = 2 * (j % 4);  // fields with column offset +8 are in sub-tile sub0 + 1
    } else {
      t = j / 8;
      sub0 = j % 8;
    }
    const int n_in = t / 4;
    const int r = 2 * (t % 4);
#pragma unroll
    for (int i = 0; i < PF; ++i) {
      int dr, sub;
      if constexpr (BITS == 4) {
        dr = ((i & 1) ? 8 : 0) + ((i & 4) ? 1 : 0);
        sub = sub0 + ((i & 2) ? 1 : 0);
      } else {
        dr = ((i & 1) ? 8 : 0) + ((i & 2) ? 1 : 0);
        sub = sub0;
      }
      const int row = 16 * kt + r + dr;
      const int g = p.gidx != nullptr ? __ldg(p.gidx + row) : (single ? 0 : row / group_size);
      const int z = p.zeros != nullptr
                        ? zero_point<BITS>(p.zeros + static_cast<int64_t>(g) * (p.N * BITS / 32), nt, sub, n_in)
                        : (1 << (BITS - 1));
      const float sc = TT::to_float(scales[static_cast<int64_t>(g) * p.N + scale_pos(nt, sub, n_in, single)]);
      const int code = static_cast<int>((word >> (BITS * i)) & ((1u << BITS) - 1u));
      tile[r + dr][8 * sub + n_in] = TT::from_float(static_cast<float>(code - z) * sc);
    }
  }
  __syncthreads();
  const int row = threadIdx.x >> 3, c8 = threadIdx.x & 7;  // 16 rows x 8 chunks of 8 elements
  *reinterpret_cast<int4*>(W + (static_cast<int64_t>(16 * kt + row)) * p.N + 64 * nt + 8 * c8) =
      *reinterpret_cast<const int4*>(&tile[row][8 * c8]);
}

template <typename T, int BITS>
void launch_bits(const Params& p, int mb, dim3 grid, cudaStream_t stream) {
  switch (mb) {
    case 1: marlin_gemm_kernel<T, BITS, 1><<<grid, THREADS, 0, stream>>>(p); break;
    case 2: marlin_gemm_kernel<T, BITS, 2><<<grid, THREADS, 0, stream>>>(p); break;
    default: marlin_gemm_kernel<T, BITS, 4><<<grid, THREADS, 0, stream>>>(p); break;
  }
}

}  // namespace marlin

at::Tensor marlin_gemm(const at::Tensor& a_in, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& qzeros, const std::optional<at::Tensor>& g_idx_sorted,
                       int64_t bits, int64_t group_size) {
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
  TORCH_CHECK(a_in.size(1) == K, "marlin_gemm: a has ", a_in.size(1), " columns, qweight holds K = ", K);
  TORCH_CHECK(N % 64 == 0 && K % 64 == 0, "marlin_gemm: needs N % 64 == 0 and K % 64 == 0 (pad above), got K=",
              K, " N=", N);
  TORCH_CHECK(qweight.size(1) == N * 16 * bits / 32, "marlin_gemm: qweight has ", qweight.size(1),
              " columns, expected N*16*b/32 = ", N * 16 * bits / 32);
  TORCH_CHECK(group_size == -1 || group_size > 0, "marlin_gemm: bad group_size ", group_size);
  TORCH_CHECK(a_in.size(0) < (int64_t(1) << 31) && K < (int64_t(1) << 31) && N < (int64_t(1) << 31),
              "marlin_gemm: too large");

  // The kernel reads A rows with 16-byte loads: contiguous and 16-byte aligned (a fresh copy otherwise).
  at::Tensor a = a_in.contiguous();
  if (reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 != 0) a = a.clone();
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
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(K);
  p.N = static_cast<int>(N);
  p.group_rows = group_rows;
  p.single_perm = single ? 1 : 0;
  p.scale_epilogue = (p.gidx == nullptr && group_rows == 0) ? 1 : 0;

  if (M >= DENSE_MIN_M) {
    // Prefill sizes: dequantize once, multiply with cuBLAS (until issue 7's large-M kernel).
    at::Tensor w = at::empty({K, N}, a.options());
    const dim3 blocks(static_cast<unsigned>(N / 64), static_cast<unsigned>(K / 16));
    const int gs = static_cast<int>(single ? 0 : group_size);
    if (a.scalar_type() == at::kHalf) {
      if (bits == 4) marlin_dequant_kernel<half, 4><<<blocks, 128, 0, stream>>>(p, reinterpret_cast<half*>(w.data_ptr()), gs, single);
      else marlin_dequant_kernel<half, 8><<<blocks, 128, 0, stream>>>(p, reinterpret_cast<half*>(w.data_ptr()), gs, single);
    } else {
      if (bits == 4) marlin_dequant_kernel<__nv_bfloat16, 4><<<blocks, 128, 0, stream>>>(p, reinterpret_cast<__nv_bfloat16*>(w.data_ptr()), gs, single);
      else marlin_dequant_kernel<__nv_bfloat16, 8><<<blocks, 128, 0, stream>>>(p, reinterpret_cast<__nv_bfloat16*>(w.data_ptr()), gs, single);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::matmul_out(out, a, w);
    return out;
  }

  // Tile choice by shape (issue 7 tunes this table on the device).
  const int mb = M <= 16 ? 1 : (M <= 32 ? 2 : 4);
  const int bm = 16 * mb;
  const int nstrips = static_cast<int>(N / 64);
  int ns = M <= 16 ? 1 : (M <= 64 ? 2 : 4);
  while (nstrips % ns) ns /= 2;
  p.ns = ns;
  const int mblocks = static_cast<int>((M + bm - 1) / bm);
  const int kblocks = static_cast<int>(K / KB_ROWS);
  const int64_t base = static_cast<int64_t>(nstrips / ns) * mblocks;
  const int64_t target = 4 * static_cast<int64_t>(sm_count());
  int slices = 1;
  if (base < target) {
    slices = static_cast<int>(std::min<int64_t>({(target + base - 1) / base, kblocks, 32}));
    // keep the fp32 workspace modest
    while (slices > 1 && static_cast<int64_t>(slices) * M * N > (int64_t(1) << 25)) --slices;
  }
  p.kb_per_slice = (kblocks + slices - 1) / slices;
  slices = (kblocks + p.kb_per_slice - 1) / p.kb_per_slice;

  at::Tensor ws;
  if (slices > 1) {
    ws = at::empty({slices, M, N}, a.options().dtype(at::kFloat));
    p.ws = ws.data_ptr<float>();
  } else {
    p.C = out.data_ptr();
  }
  dim3 grid(nstrips / ns, mblocks, slices);
  if (a.scalar_type() == at::kHalf) {
    if (bits == 4) launch_bits<half, 4>(p, mb, grid, stream);
    else launch_bits<half, 8>(p, mb, grid, stream);
  } else {
    if (bits == 4) launch_bits<__nv_bfloat16, 4>(p, mb, grid, stream);
    else launch_bits<__nv_bfloat16, 8>(p, mb, grid, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (slices > 1) reduce_slices(ws, out);
  return out;
}

}  // namespace gptq_vllm
