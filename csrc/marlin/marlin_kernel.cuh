// Marlin-layout GEMM kernel templates (included by marlin_gemm.cu and the marlin_inst_*.cu files, which
// instantiate them per dtype and bit width so that the build runs in parallel).  See marlin_gemm.cu.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common.cuh"
#include "../kernels.h"
#include "../units.h"

namespace gptq_vllm {
namespace marlin {

constexpr int THREADS = 256;           // 8 warps per block (GEMM and dequant kernels)
constexpr int WARPS = THREADS / 32;
constexpr int A_PAD = 8;               // halves of padding per staged A row (kc is a multiple of 128): rows r, r+1
                                       // are 16 B apart mod 128 B, so the 8 row addresses of an ldmatrix phase hit
                                       // 32 distinct banks
constexpr int RED_STRIDE = 72;         // floats per row of the partial-sum tile (64 + 8: fewer bank conflicts)
constexpr int A_SMEM_BYTES = 32768;    // one staged A chunk: rows x KC halves (KC chosen to fit), 2 blocks per SM
constexpr int A_SMEM_BYTES_WIDE = 131072;  // all A buffers of 32/64-row tiles (1 block per SM): one chunk of >= 1024
                                           // columns, so that it holds a run for each of 8 k-phases, or two of half that
constexpr int A_BUFS_MAX = 2;          // A buffers: with two, the next chunk's copies fly while this one is used
constexpr int DENSE_MIN_M_DEFAULT = 128;  // from this M on: fast dequantize + cuBLAS (tuned on the H200)
// Act-order: the GEMM gathers A while staging it only at M = 1 and K <= STAGED_GATHER_MAX_K (every strip block
// repeats that gather); otherwise a gather kernel runs first (~2 us).  Measured on the H200 for the 8 Llama
// shapes at M = 1, 2, 4, 8 (docs/kernel-tuning.md run 18): staged wins only at M = 1 with K <= 8192, ties at
// K = 14336, loses 7.8 vs 1.9 us at K = 28672 and at every M >= 2 on the long-K shapes.
constexpr int STAGED_GATHER_MAX_K = 16384;

struct Params {
  const void* A;          // [M, K] fp16/bf16, row-major, 16-byte aligned rows
  const int4* B;          // Marlin words
  const void* scales;     // [NG, N] Marlin-permuted, dtype of A
  const uint32_t* zeros;  // [NG, N*b/32] Marlin zero points, or nullptr (symmetric: z = 2^(b-1))
  const int* gidx;        // [K] group of each row (nondecreasing), or nullptr
  const int* perm;        // [K] act-order gather (16-byte aligned): column k of A is a[:, perm[k]] (0 if >= lda), or nullptr
  void* C;                // [M, N] output (slices == 1)
  float* ws;              // [slices, M, N] fp32 partials (slices > 1)
  int M, K, N;
  int lda;                // row stride (and column count) of a
  int tpg_shift;       // log2(group_rows / 16) when that is a power of two, else -1
  int group_rows;      // rows per group when groups are runs of G rows with G % 16 == 0; 0: one group
  int single_perm;     // scales were permuted with SCALE_PERM_SINGLE (group_size == -1 or >= K)
  int scale_epilogue;  // one group and no g_idx: multiply the fp32 accumulators by the scales at the end
  int sb;              // 64-column strips per block (1, 2, 4, 8); divides N/64; 8/sb warps split K in a block
  int kpp;             // k-tiles (16 rows) per split-K part, a multiple of RUN; parts = cluster size x global slices
  int kc;              // A columns staged per chunk (multiple of 128)
  int nbuf;            // A buffers (1 or 2): with 2, chunk j + 1 is copied while chunk j is multiplied
  int slices;          // global split-K slices (fp32 workspace + reduce kernel); 1 = write C directly
};

// ---- weight layout per code width (gptq_vllm/formats/marlin.py) ---------------------------------------------
// Units (units.h: unit_tiles() k-tiles of a strip, unit_chunks() 16-byte chunks per lane) (ku, nt) are ordered
// k-unit-major, as Marlin's tiles: unit (ku, nt) starts at int4 (ku * N/64 + nt) * 32 C.
// int4 index of lane t's chunk c inside a unit: 8-bit Marlin is lane-major (lane t's 32 bytes at 32 t); the
// 2/3-bit units are chunk-major (chunk c of all 32 lanes is 512 contiguous bytes: one coalesced warp-wide copy).
template <int BITS>
__host__ __device__ constexpr int chunk_index(int lane, int c) { return BITS == 8 ? 2 * lane + c : 32 * c + lane; }
// The lane's 4 * unit_chunks() words of one unit, in chunk_index order: from global memory (read-only path) or
// from a warp's ring slot in shared memory.
template <int BITS, bool GLOBAL>
__device__ __forceinline__ void load_unit_words(const int4* __restrict__ unit, int lane, uint32_t* uw) {
#pragma unroll
  for (int c = 0; c < unit_chunks<BITS>(); ++c) {
    int4 v;
    if constexpr (GLOBAL) v = __ldg(unit + chunk_index<BITS>(lane, c));
    else v = unit[chunk_index<BITS>(lane, c)];
    uw[4 * c] = v.x; uw[4 * c + 1] = v.y; uw[4 * c + 2] = v.z; uw[4 * c + 3] = v.w;
  }
}
// Zero points of 2/3-bit weights use the 4-bit Marlin zero-point packing (formats/marlin.py ZERO_BITS).
template <int BITS>
__host__ __device__ constexpr int zero_bits() { return BITS == 8 ? 8 : 4; }

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
  if constexpr (zero_bits<BITS>() == 4) {
    const int field = ((s & 1) << 2) | (s >> 1);  // (0,4,1,5,2,6,3,7)[s]
    return (__ldg(zrow + 8 * nt + n_in) >> (4 * field)) & 0xf;
  } else {
    const int f4 = s & 3;
    const int field = (f4 == 1) ? 2 : (f4 == 2 ? 1 : f4);
    return (__ldg(zrow + 16 * nt + 2 * n_in + (s >> 2)) >> (8 * field)) & 0xff;
  }
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
      off_a[s] = __float2half2_rn(1024.f + z);     // lo halves / prmt halves / 2-3-bit fields hold 1024 + q
      if constexpr (BITS == 4) off_b[s] = __float2half2_rn(-64.f - z);  // hi halves hold 1024 + 16 q; * 1/16 -> 64 + q
    } else {
      off_a[s] = __float2bfloat162_rn(128.f + z);  // bf16 halves hold 128 + q (2/3/4-bit)
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
      const uint32_t* zrow = p.zeros + static_cast<int64_t>(g) * (p.N * zero_bits<BITS>() / 32);
#pragma unroll
      for (int s = 0; s < 8; ++s) set_zero(s, zero_point<BITS>(zrow, nt, s, gid));
    }
  }
};

// 2/3-bit fields (formats/marlin.py): a pair of codes (rows k, k+1 of one column) sits at the same bit offset L of
// the low and the high 16-bit half of a word, so or-ing the field into the mantissa of a magic number (fp16 1024
// = 0x6400, bf16 128 = 0x4300) converts both at once.  All results are exact small integers.
//   fp16_field: compile-time zero Z and L + W <= 10: the field stays in place (1024 + 2^L c) and one fma with
//               2^-L undoes the offset, as the 4-bit path's hi nibble: one lop3 + one HFMA2 per pair.
//   shifted_field: any dtype and zero (off = magic + z, from GroupCache): shift, lop3, subtract.
template <int W, int L, int Z>
__device__ __forceinline__ half2 fp16_field(uint32_t x) {
  static_assert(L + W <= 10, "the field must stay inside the fp16 mantissa");
  const uint32_t m = lop3_and_or(x, (((1u << W) - 1u) << L) * 0x00010001u, 0x64006400u);
  return __hfma2(from_u32<half2>(m), __float2half2_rn(1.f / (1 << L)),
                 __float2half2_rn(-(1024.f / (1 << L) + static_cast<float>(Z))));
}
template <typename T, int W, int L>
__device__ __forceinline__ typename TypeTraits<T>::T2 shifted_field(uint32_t x, typename TypeTraits<T>::T2 off) {
  constexpr uint32_t MAGIC = std::is_same<T, half>::value ? 0x64006400u : 0x43004300u;
  const uint32_t m = lop3_and_or(x >> L, ((1u << W) - 1u) * 0x00010001u, MAGIC);
  return __hsub2(from_u32<typename TypeTraits<T>::T2>(m), off);
}

// Dequantize the lane's B words of k-tile unit_tile of its unit (uw: the unit's lane words; 4/8 bit: one k-tile per
// unit) into the B fragments of the 8 sub-tiles:
// bf[s][0] = (k 2tig, 2tig+1), bf[s][1] = (k 2tig+8, 2tig+9) at column gid of sub-tile s, value (q - z) [* s].
// All magic-number conversions are exact: q, z < 256 and 1024 + q (fp16) / 128 + q (bf16, q < 16) are
// representable, and the differences are small integers.  SYM: the zero is 2^(BITS-1) at compile time (the lean
// instantiation), which lets the 2/3-bit fp16 path use fp16_field.  unit_tile is a compile-time constant at every
// call (the run loop steps by whole units), so the 3-bit word choice costs nothing.
template <typename T, int BITS, bool SYM = false>
__device__ __forceinline__ void dequant(const uint32_t* uw, int unit_tile, const GroupCache<T, BITS>& gc,
                                        bool apply_scale, uint32_t (*bf)[2]) {
  using T2 = typename TypeTraits<T>::T2;
  constexpr bool FP16_SYM = SYM && std::is_same<T, half>::value;
  constexpr int Z = 1 << (BITS - 1);
  const uint32_t* q = uw + unit_tile * BITS;  // 2/4/8 bit: the k-tile's own BITS words
  if constexpr (BITS == 2) {
    // Lane word j (0, 1): pair p = 8j + i (i = 0..7) at bit 2i of each half = sub-tile 4j + i/2, rows + 8 (i % 2).
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t hi = q[j] >> 8;  // pairs 4..7 of the word, for the fp16 fields
      T2 v[8];
      if constexpr (FP16_SYM) {
        v[0] = fp16_field<2, 0, Z>(q[j]); v[1] = fp16_field<2, 2, Z>(q[j]);
        v[2] = fp16_field<2, 4, Z>(q[j]); v[3] = fp16_field<2, 6, Z>(q[j]);
        v[4] = fp16_field<2, 0, Z>(hi);   v[5] = fp16_field<2, 2, Z>(hi);
        v[6] = fp16_field<2, 4, Z>(hi);   v[7] = fp16_field<2, 6, Z>(hi);
      } else {
        v[0] = shifted_field<T, 2, 0>(q[j], gc.off_a[4 * j]);      v[1] = shifted_field<T, 2, 2>(q[j], gc.off_a[4 * j]);
        v[2] = shifted_field<T, 2, 4>(q[j], gc.off_a[4 * j + 1]);  v[3] = shifted_field<T, 2, 6>(q[j], gc.off_a[4 * j + 1]);
        v[4] = shifted_field<T, 2, 8>(q[j], gc.off_a[4 * j + 2]);  v[5] = shifted_field<T, 2, 10>(q[j], gc.off_a[4 * j + 2]);
        v[6] = shifted_field<T, 2, 12>(q[j], gc.off_a[4 * j + 3]); v[7] = shifted_field<T, 2, 14>(q[j], gc.off_a[4 * j + 3]);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int s = 4 * j + i / 2;
        bf[s][i & 1] = as_u32(apply_scale ? __hmul2(v[i], gc.s2[s]) : v[i]);
      }
    }
  } else if constexpr (BITS == 3) {
    // Pair group g (pairs p = 4g + f, sub-tile p/2, rows + 8 (p % 2)) lives in lane words 4c + g, c = 0..2:
    // k-tile v < 3 in word 4v + g at bits 3f (f = 0..3); k-tile 3: pairs f < 3 at bit 12 of word 4f + g, pair 3
    // spread over bit 15 of each half of the three words (its code bit c in word 4c + g).
    T2 v3[16];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      const int p = 4 * g;
      if (unit_tile < 3) {
        const uint32_t x = uw[4 * unit_tile + g];
        if constexpr (FP16_SYM) {
          v3[p] = fp16_field<3, 0, Z>(x);
          v3[p + 1] = fp16_field<3, 3, Z>(x);
          v3[p + 2] = fp16_field<3, 6, Z>(x);
          v3[p + 3] = fp16_field<3, 0, Z>(x >> 9);
        } else {
          v3[p] = shifted_field<T, 3, 0>(x, gc.off_a[p / 2]);
          v3[p + 1] = shifted_field<T, 3, 3>(x, gc.off_a[p / 2]);
          v3[p + 2] = shifted_field<T, 3, 6>(x, gc.off_a[p / 2 + 1]);
          v3[p + 3] = shifted_field<T, 3, 9>(x, gc.off_a[p / 2 + 1]);
        }
      } else {
#pragma unroll
        for (int f = 0; f < 3; ++f) {
          if constexpr (FP16_SYM) v3[p + f] = fp16_field<3, 3, Z>(uw[4 * f + g] >> 9);
          else v3[p + f] = shifted_field<T, 3, 12>(uw[4 * f + g], gc.off_a[(p + f) / 2]);
        }
        constexpr uint32_t MAGIC = std::is_same<T, half>::value ? 0x64006400u : 0x43004300u;
        uint32_t m = lop3_and_or(uw[g] >> 15, 0x00010001u, MAGIC);
        m = lop3_and_or(uw[4 + g] >> 14, 0x00020002u, m);
        m = lop3_and_or(uw[8 + g] >> 13, 0x00040004u, m);
        v3[p + 3] = __hsub2(from_u32<T2>(m), gc.off_a[p / 2 + 1]);
      }
    }
#pragma unroll
    for (int p = 0; p < 16; ++p) {
      const int s = p / 2;
      bf[s][p & 1] = as_u32(apply_scale ? __hmul2(v3[p], gc.s2[s]) : v3[p]);
    }
  } else if constexpr (BITS == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t w = q[j];
      T2 v[4];  // (e0,e1) and (e2,e3) of sub-tiles 2j and 2j+1
      if constexpr (std::is_same<T, half>::value) {
        // lo = (w & 0x000f000f) | 0x64006400 = half2(1024 + nib0, 1024 + nib4): rows r, r+1, column c
        // hi = (w & 0x00f000f0) | 0x64006400 = half2(1024 + 16 nib1, 1024 + 16 nib5): rows r+8, r+9
        // w >> 8 brings nibbles 2,6 (column c+8, rows r, r+1) and 3,7 (rows r+8, r+9) into place.
        const half2 sixteenth = __float2half2_rn(0.0625f);
        uint32_t lo = lop3_and_or(w, 0x000f000fu, 0x64006400u);
        uint32_t hi = lop3_and_or(w, 0x00f000f0u, 0x64006400u);
        v[0] = __hsub2(from_u32<half2>(lo), gc.off_a[2 * j]);
        v[1] = __hfma2(from_u32<half2>(hi), sixteenth, gc.off_b[2 * j]);
        w >>= 8;
        lo = lop3_and_or(w, 0x000f000fu, 0x64006400u);
        hi = lop3_and_or(w, 0x00f000f0u, 0x64006400u);
        v[2] = __hsub2(from_u32<half2>(lo), gc.off_a[2 * j + 1]);
        v[3] = __hfma2(from_u32<half2>(hi), sixteenth, gc.off_b[2 * j + 1]);
      } else {
        // bf16 has 7 mantissa bits: (x & 0x000f000f) | 0x43004300 = bf162(128 + a, 128 + b) for nibbles
        // at bits 0 and 16; shifting w by 0/4/8/12 selects the pairs (0,4) (1,5) (2,6) (3,7).
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          uint32_t x = lop3_and_or(w >> (4 * u), 0x000f000fu, 0x43004300u);
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
      const uint32_t w = q[s];  // bytes: Q[r,c] Q[r+8,c] Q[r+1,c] Q[r+9,c]
      T2 v0, v1;
      if constexpr (std::is_same<T, half>::value) {
        // prmt builds half2(1024 + byte0, 1024 + byte2) and half2(1024 + byte1, 1024 + byte3).
        v0 = __hsub2(from_u32<half2>(__byte_perm(w, 0x64u, 0x4240)), gc.off_a[s]);
        v1 = __hsub2(from_u32<half2>(__byte_perm(w, 0x64u, 0x4341)), gc.off_a[s]);
      } else {
        const float z = gc.zf[s];
        v0 = __floats2bfloat162_rn(static_cast<float>(w & 0xff) - z, static_cast<float>((w >> 16) & 0xff) - z);
        v1 = __floats2bfloat162_rn(static_cast<float>((w >> 8) & 0xff) - z, static_cast<float>(w >> 24) - z);
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

// The code of fragment element e (row 2tig + (0, 1, 8, 9)[e]) of sub-tile s in k-tile unit_tile of the lane's unit
// words uw (the field orders above and in marlin_gemm.cu): h = e & 1 selects the 16-bit half, b = e >> 1 the rows + 8.
template <int BITS>
__device__ __forceinline__ uint32_t fragment_code(const uint32_t* uw, int unit_tile, int s, int e) {
  const int h = e & 1, b = e >> 1;
  const uint32_t* q = uw + unit_tile * BITS;
  if constexpr (BITS == 2) {
    const int p = 2 * s + b;
    return (q[p >> 3] >> (2 * (p & 7) + 16 * h)) & 0x3;
  } else if constexpr (BITS == 3) {
    const int p = 2 * s + b, g = p / 4, f = p % 4;
    if (unit_tile < 3) return (uw[4 * unit_tile + g] >> (3 * f + 16 * h)) & 0x7;
    if (f < 3) return (uw[4 * f + g] >> (12 + 16 * h)) & 0x7;
    const int bit = 15 + 16 * h;
    return ((uw[g] >> bit) & 1) | (((uw[4 + g] >> bit) & 1) << 1) | (((uw[8 + g] >> bit) & 1) << 2);
  } else if constexpr (BITS == 4) {
    return (q[s >> 1] >> (4 * (2 * (s & 1) + 4 * h + b))) & 0xf;
  } else {
    return (q[s] >> (8 * (2 * h + b))) & 0xff;
  }
}

// Slow path for a k-tile whose 16 rows span several groups (row-parallel act-order shards, or group sizes
// that are not multiples of 16): every fragment element gets its own group's scale and zero.
template <typename T, int BITS>
__device__ __forceinline__ void dequant_rows(const Params& p, const uint32_t* uw, int unit_tile, int kt, int nt,
                                          int gid, int tig,
                                          uint32_t (*bf)[2]) {
  using TT = TypeTraits<T>;
  const T* scales = reinterpret_cast<const T*>(p.scales);
  float val[8][4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int row = kt * 16 + 2 * tig + ((e & 1) | ((e >> 1) << 3));
    const int g = p.gidx != nullptr ? __ldg(p.gidx + row) : (p.group_rows ? row / p.group_rows : 0);
    const T* srow = scales + static_cast<int64_t>(g) * p.N;
    const uint32_t* zrow =
        p.zeros != nullptr ? p.zeros + static_cast<int64_t>(g) * (p.N * zero_bits<BITS>() / 32) : nullptr;
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint32_t code = fragment_code<BITS>(uw, unit_tile, s, e);
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

// ---- asynchronous copies (cp.async, sm_80+) ---------------------------------------------------------
// Shared-memory operands are 32-bit shared-window addresses, computed once per thread: the slot offsets
// then fold into the instructions' immediates.  `bytes` < 16 zero-fills the rest (0: nothing is read).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16_cg(uint32_t s, const void* gmem, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async16_ca(uint32_t s, const void* gmem, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Four 8x8 matrices of 16-bit values from shared memory: lane l gives the address of row l % 8 of matrix l / 8
// (16 contiguous bytes); lane 4 gid + tig receives, of each matrix, row gid, columns 2 tig and 2 tig + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr) : "memory");
}

// A warp's unit of work: a run of RUN consecutive k-tiles (128 rows) of one strip.  Its ring holds one run
// (RUN slots), so the next run streams in while this one is consumed, and a group of >= 128 rows (aligned)
// never changes inside a run: the group test and the scale load happen once per run.
constexpr int RUN = 8;

// The block tile has R = 8 * MB rows (MB = 1, 2, 4 or 8; larger M loops over m-blocks of R rows) and is
// computed "swapped": C^T = W^T A^T, the weight fragments are the mma's A operand (16 columns of C) and 8
// activation rows its B operand, 4 mma per k-tile and m8 block.  A warp dequantizes each of its weight
// tiles once per block tile, so wider tiles share that work over more rows; they hold 16 MB fp32
// accumulators per lane, hence one block per SM (255 registers) for MB >= 4 (WIDE).
template <int MB>
__host__ __device__ constexpr bool wide() { return MB >= 4; }
// Bytes of one A buffer (before padding): 8/16-row tiles keep a 32 KB chunk per buffer (a second buffer only
// where two blocks still fit on an SM, which the host checks); wide tiles split their 128 KB.
__host__ __device__ constexpr int a_buffer_bytes(int rows, int nbuf) {
  return rows >= 32 ? A_SMEM_BYTES_WIDE / nbuf : A_SMEM_BYTES;
}

template <int BITS>
__host__ __device__ constexpr int ring_bytes() { return WARPS * (RUN / unit_tiles<BITS>()) * 32 * 16 * unit_chunks<BITS>(); }
__host__ __device__ constexpr int sring_bytes() { return WARPS * 32 * 16; }  // one 8-scale slot per lane

// Shared memory of a launch: the B ring, the scale ring and nbuf A buffers of rows x (kc + A_PAD) halves (the
// partial-sum tile reuses all of it at the end).
__host__ __device__ constexpr size_t gemm_smem(int rings, int rows, int kc, int nbuf) {
  return static_cast<size_t>(rings) + static_cast<size_t>(nbuf) * rows * (kc + A_PAD) * 2;
}
template <int BITS, int MB>
constexpr size_t max_smem() {
  return gemm_smem(ring_bytes<BITS>() + sring_bytes(), 8 * MB, a_buffer_bytes(8 * MB, A_BUFS_MAX) / (2 * 8 * MB),
                   A_BUFS_MAX);
}

// Staged A layout (mma.sync loop): row-major, row r of a buffer at r * (kc + A_PAD) halves.  The operands of a
// row for a pair of k-tiles (32 columns) are 4 matrices of 8 rows x 8 columns, one ldmatrix.x4: matrix j holds
// k-tile j / 2, columns 8 (j % 2) .. + 7, i.e. lane (gid, tig) receives k = 2 tig, 2 tig + 1 (+ 8) of row gid,
// the mma.m16n8k16 B fragment of the swapped product.

// ---- wgmma (sm_90a) ---------------------------------------------------------------------------------------
// WG kernels (64-row tiles, lean mode) replace the 32 mma.sync per k-tile and warp by 4 asynchronous
// wgmma.m64n64k16 per warpgroup: the weight fragments stay the A operand, from registers (a warp's 16 rows of
// the m64 tile have exactly the mma.m16n8k16 A layout, so warp w of the warpgroup supplies 16 columns of its own
// strip), and the staged activations are the B operand, read from shared memory by the tensor cores.  Its
// N = 64 columns are the tile's 64 rows of A, and the accumulator of wgmma q holds, per warp, what the 8 mma
// accumulators acc[4 mb + q] of the mma.sync loop hold (same row/column per register), so everything after
// the loop is shared.
//
// Staged layout (wg_pos): wgmma reads B in core matrices of 8 rows of A x 8 k (128 contiguous bytes, row-major).
// k-tile t of a chunk is 64 x 16 halves at 1024 t; the core matrix of rows 8g..8g+7 and k 8h..8h+7 sits at
// 64 (2g + h): neighbours along k are 128 bytes apart (the descriptor's leading byte offset), along the rows
// 256 bytes (its stride byte offset).
constexpr int WG_ROWS = 64;
constexpr int WG_BUFS = 2;  // fragment buffers: wgmma groups of WG_BUFS - 1 earlier tiles stay in flight
__device__ __forceinline__ int wg_pos(int r, int c) {
  return (c >> 4) * 16 * WG_ROWS + (((r >> 3) << 1) | ((c >> 3) & 1)) * 64 + (r & 7) * 8 + (c & 7);
}
// Shared-memory matrix descriptor: start address, leading / stride byte offsets (all >> 4), no swizzle.
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3ffff) >> 4) | (static_cast<uint64_t>(128 >> 4) << 16) |
         (static_cast<uint64_t>(256 >> 4) << 32);
}
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPTQ_VLLM_WGMMA 1
#endif
__device__ __forceinline__ void wg_fence() {
#ifdef GPTQ_VLLM_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#ifdef GPTQ_VLLM_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wg_wait() {
#ifdef GPTQ_VLLM_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy stores to shared memory made visible to the tensor cores' (async proxy) reads.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef GPTQ_VLLM_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// d[8 j + e] (j = m8 block of A rows, e = mma accumulator element) += W^T-fragment a x staged B at desc.
#define GPTQ_VLLM_WGMMA_64(TYPE)                                                                \
  asm volatile(                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                           \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                 \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "                      \
      "{%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"                                                \
      : "+f"(acc[0 + Q][0]), "+f"(acc[0 + Q][1]), "+f"(acc[0 + Q][2]), "+f"(acc[0 + Q][3]),     \
        "+f"(acc[4 + Q][0]), "+f"(acc[4 + Q][1]), "+f"(acc[4 + Q][2]), "+f"(acc[4 + Q][3]),     \
        "+f"(acc[8 + Q][0]), "+f"(acc[8 + Q][1]), "+f"(acc[8 + Q][2]), "+f"(acc[8 + Q][3]),     \
        "+f"(acc[12 + Q][0]), "+f"(acc[12 + Q][1]), "+f"(acc[12 + Q][2]), "+f"(acc[12 + Q][3]), \
        "+f"(acc[16 + Q][0]), "+f"(acc[16 + Q][1]), "+f"(acc[16 + Q][2]), "+f"(acc[16 + Q][3]), \
        "+f"(acc[20 + Q][0]), "+f"(acc[20 + Q][1]), "+f"(acc[20 + Q][2]), "+f"(acc[20 + Q][3]), \
        "+f"(acc[24 + Q][0]), "+f"(acc[24 + Q][1]), "+f"(acc[24 + Q][2]), "+f"(acc[24 + Q][3]), \
        "+f"(acc[28 + Q][0]), "+f"(acc[28 + Q][1]), "+f"(acc[28 + Q][2]), "+f"(acc[28 + Q][3])  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
template <typename T, int Q>
__device__ __forceinline__ void wgmma_64(float (&acc)[32][4], const uint32_t (&a)[4], uint64_t desc) {
#ifdef GPTQ_VLLM_WGMMA
  if constexpr (std::is_same<T, half>::value) GPTQ_VLLM_WGMMA_64("f16");
  else GPTQ_VLLM_WGMMA_64("bf16");
#else
  __trap();
#endif
}
#undef GPTQ_VLLM_WGMMA_64

// Act-order gather of 8 consecutive columns: src = perm[8 c8 .. 8 c8 + 7] (two 16-byte loads), then
// v[j] = arow[src[j]], 0 where src[j] >= lda (the padded rows of K_pad), 8 independent loads in flight.
struct Perm8 {
  int src[8];
  __device__ __forceinline__ explicit Perm8(const int* __restrict__ perm8) {
    const int4 lo = __ldg(reinterpret_cast<const int4*>(perm8)), hi = __ldg(reinterpret_cast<const int4*>(perm8) + 1);
    src[0] = lo.x; src[1] = lo.y; src[2] = lo.z; src[3] = lo.w;
    src[4] = hi.x; src[5] = hi.y; src[6] = hi.z; src[7] = hi.w;
  }
};
// GLOBAL = false: arow is a row staged in shared memory (no __ldg there).
template <typename T, bool GLOBAL = true>
__device__ __forceinline__ void gather8(const T* __restrict__ arow, const Perm8& pm, int lda, T (&v)[8]) {
  const int* src = pm.src;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    v[j] = static_cast<unsigned>(src[j]) >= static_cast<unsigned>(lda) ? TypeTraits<T>::from_float(0.f)
           : GLOBAL                                                  ? __ldg(arow + src[j])
                                                                     : arow[src[j]];
}

// The gather alone, for the batch sizes where the GEMM stages A without it: out[m, k] = a[m, perm[k]] (0 past
// lda).  Block (m, y) writes slice y of output row m, each thread 8 columns with one 16-byte store.  ROW: the
// block first copies row m of a into shared memory with coalesced 16-byte loads, so the scattered reads hit
// shared memory instead of fetching a 32-byte L2 sector per 2-byte value (at M = 1024, K = 28672 that was
// 205 us of a 701 us GEMM); without ROW (a row larger than shared memory) they go to L2.  Several slices per
// row keep the SMs busy at small M; each slice stages the whole row, an L2 hit after the first.
template <typename T, bool ROW>
__global__ void __launch_bounds__(THREADS) gather_columns_kernel(const T* __restrict__ a, int lda, const int* __restrict__ perm,
                                                           int K, T* __restrict__ out) {
  extern __shared__ int4 row_smem[];
  const int m = blockIdx.x;  // rows on x: M may exceed 65535
  const T* arow = a + static_cast<int64_t>(m) * lda;
  const int groups = K / 8, per_slice = (groups + gridDim.y - 1) / gridDim.y;
  const int beg = blockIdx.y * per_slice + threadIdx.x;
  const int end = min(groups, static_cast<int>(blockIdx.y + 1) * per_slice);
  // The first item's permutation entries are read before the row is staged, so that the two reads overlap: at small
  // M a thread has one item, and the kernel is a chain of dependent reads (K > 0: the index is in range).
  Perm8 pm(perm + 8 * min(beg, groups - 1));
  if constexpr (ROW) {
    if (lda % 8 == 0 && reinterpret_cast<uintptr_t>(arow) % 16 == 0) {
      for (int i = threadIdx.x; i < lda / 8; i += THREADS) row_smem[i] = __ldg(reinterpret_cast<const int4*>(arow) + i);
    } else {
      for (int i = threadIdx.x; i < lda; i += THREADS) reinterpret_cast<T*>(row_smem)[i] = __ldg(arow + i);
    }
    __syncthreads();
  }
  for (int c8 = beg; c8 < end; c8 += THREADS) {
    if (c8 != beg) pm = Perm8(perm + 8 * c8);
    T v[8];
    if constexpr (ROW) gather8<T, false>(reinterpret_cast<const T*>(row_smem), pm, lda, v);
    else gather8(arow, pm, lda, v);
    *reinterpret_cast<int4*>(out + static_cast<int64_t>(m) * K + 8 * c8) = *reinterpret_cast<const int4*>(v);
  }
}

// ---- the GEMM kernel ------------------------------------------------------------------------------------
// Block = 8 warps = sb strips x kw = 8/sb k-phases; block tile = R rows x 64*sb columns; its k-tiles are the
// range of one split-K part (a multiple of RUN tiles); warp (strip, phase) takes the part's runs phase,
// phase + kw, ...  Every warp streams its own B tiles (and, per run, its lanes' 8 group scales) through a
// private ring of RUN shared-memory slots filled with cp.async: lane t copies, and later reads back, exactly
// its own 16/32 bytes, so a slot needs no barrier.  The loop over a run is unrolled: slot u is tile u of the
// run, and right after slot u is read, tile u of the warp's next run is issued into it.
// A is staged per chunk of kc columns in shared memory (rows past M and columns past K are zero), shared by
// the block's warps.  Partial sums: k-phases add into a shared-memory tile in a fixed order; split-K parts of
// one cluster (sm_90 thread-block clusters along gridDim.x) are added through distributed shared memory in
// rank order, each rank producing a slice of the output; global slices (gridDim.z) go through the fp32
// workspace.  All orders are fixed: the result is deterministic.
// GEN = false: symmetric, no g_idx, one group per run (groups of a multiple of 128 rows, power-of-two tiles) or
// a single group; the run's scales arrive through the ring.  For MB <= 4 they multiply the fp32 sums of each
// run (exact products, 16 MB FFMA per run instead of 16 HMUL2 per tile: the run's second set of sums fits the
// one-block-per-SM register budget up to 32 rows, 215-232 registers); 64-row tiles have no registers for it and
// multiply the weights instead (16 HMUL2 per tile against 32 mma).
// GEN = true: g_idx_sorted rows, zero points, any group size (per-tile group test, scales per element).
// WG: the wgmma loop (see above; MB = 8, lean mode, sb >= 4 so that the 4 warps of a warpgroup share k-phase).
// SOLO: compiled for one block per SM (no 128-register cap), for 16-row launches that fit in one wave anyway.
template <typename T, int BITS, int MB, bool GEN, bool WG = false, bool SOLO = false>
__global__ void __launch_bounds__(THREADS, wide<MB>() || SOLO ? 1 : 2) marlin_gemm_kernel(const Params p) {
  static_assert(!WG || (MB * 8 == WG_ROWS && !GEN), "wgmma tiles: 64 rows, lean mode");
  using TT = TypeTraits<T>;
  using T2 = typename TT::T2;
  constexpr int R = 8 * MB;
  constexpr bool FOLD = !GEN && MB <= 4;       // scales applied to the fp32 sums of a run
  constexpr int UT = unit_tiles<BITS>();        // k-tiles per unit (one ring slot)
  constexpr int UC = unit_chunks<BITS>();       // 16-byte chunks per lane per unit
  constexpr int UNIT_I4 = 32 * UC;              // 16-byte chunks per unit
  constexpr int SLOTS = RUN / UT;               // ring slots (units) per run
  constexpr int STEP = UT > 2 ? UT : 2;         // k-tiles per step of the run loop: a unit, at least a tile pair
  constexpr int NACC = 4 * MB;                  // m16n8 accumulators per lane
  constexpr int UNROLL_STEPS = GEN ? 1 : RUN / STEP;

  extern __shared__ __align__(16) unsigned char smem[];
  int4* ring = reinterpret_cast<int4*>(smem);                                     // [WARPS][SLOTS][UNIT_I4]
  int4* sring = reinterpret_cast<int4*>(smem + ring_bytes<BITS>());               // [WARPS][32]
  T* As = reinterpret_cast<T*>(smem + ring_bytes<BITS>() + sring_bytes());        // [nbuf][R][kc + A_PAD]
  float* red = reinterpret_cast<float*>(smem);                                    // [sb][R][RED_STRIDE] (reuse)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int sb = p.sb, kw = WARPS / sb;
  const int sl = warp % sb, phase = warp / sb;
  const int NS = p.N / 64;
  // Grid (cluster ranks, m-blocks, strip blocks x global slices): the m-blocks of one strip block are
  // launched next to each other, so all but the first read its B tiles from L2.
  const int sblock = blockIdx.z / p.slices;
  const int nt = sblock * sb + sl;
  const int cs = gridDim.x;  // cluster size along x (1 without clusters)
  const int mblock = blockIdx.y, gslice = blockIdx.z % p.slices;
  const int m0 = mblock * R;
  const int mv = min(R, p.M - m0);  // valid rows of this block tile
  const int part = gslice * cs + blockIdx.x;
  const int KT = p.K / 16;
  const int kt_beg = part * p.kpp;
  const int kt_end = min(KT, kt_beg + p.kpp);
  const int nruns = kt_end > kt_beg ? (kt_end - kt_beg + RUN - 1) / RUN : 0;
  const int nr = nruns > phase ? (nruns - phase + kw - 1) / kw : 0;  // this warp's runs
  const int astride = p.kc + A_PAD;
  const int abuf = R * astride;  // halves per A buffer
  const bool ring_scales = !GEN && !p.scale_epilogue;  // one group per run: its scales ride in the ring
  const T* scales = reinterpret_cast<const T*>(p.scales);

  const int4* my_ring = ring + warp * SLOTS * UNIT_I4;  // slot x at my_ring + x * UNIT_I4 (chunk_index inside)
  const int4* my_sring = sring + warp * 32 + lane;
  const uint32_t ring_s = smem_addr(my_ring), sring_s = smem_addr(my_sring);
  // This lane's ldmatrix row address in m8 block 0 of a buffer (see the staged A layout): row lane % 8, columns
  // 8 (lane / 8) ..; m8 block mb adds 8 mb rows, tile u of a run 16 u columns.
  const uint32_t a_lane = 2 * ((lane & 7) * astride + 8 * (lane >> 3));

  // Issue state: the warp's next run to stream (first k-tile ikt), running pointers.
  const int64_t ustride = static_cast<int64_t>(NS) * UNIT_I4;  // int4s between units of a strip
  const int64_t rstride = static_cast<int64_t>(SLOTS) * kw * ustride;
  const int4* isrc = p.B + static_cast<int64_t>((kt_beg + RUN * phase) / UT) * ustride + nt * UNIT_I4;
  const T* ssrc = scales + nt * 64 + 8 * gid;
  int ikt = kt_beg + RUN * phase, irun = 0;
  auto issue = [&](int x) {  // unit x of the next run into slot x (zero-filled past K or past the last run)
    const bool ok = irun < nr && ikt + x * UT < kt_end;
#pragma unroll
    for (int c = 0; c < UC; ++c) {
      const int ci = chunk_index<BITS>(lane, c);
      cp_async16_cg(ring_s + (x * UNIT_I4 + ci) * 16, ok ? isrc + x * ustride + ci : p.B, ok ? 16 : 0);
    }
    if (x == 0 && ring_scales) {
      const int g = ikt >> p.tpg_shift;
      cp_async16_ca(sring_s, ok ? ssrc + static_cast<int64_t>(g) * p.N : scales, ok ? 16 : 0);
    }
    cp_async_commit();  // one group per unit: wait_group<SLOTS-1> then covers the oldest unit
    if (x == SLOTS - 1) {
      ++irun;
      ikt += RUN * kw;
      isrc += rstride;
    }
  };

  float acc[NACC][4];
#pragma unroll
  for (int i = 0; i < NACC; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;

  GroupCache<T, BITS> gc;
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    gc.set_zero(s, 1 << (BITS - 1));
    gc.s2[s] = TT::pack(1.f, 1.f);
  }
  int g_cur = -1;
  uint32_t bfs[WG ? WG_BUFS : 1][8][2];  // dequantized weight fragments of a k-tile
  const uint32_t as_s = smem_addr(As);
  const T* A = reinterpret_cast<const T*>(p.A);
  const int ct = p.kc / 16;  // k-tiles per chunk (a multiple of RUN)

  // 1. A is staged per chunk of ct k-tiles into buffer (chunk index) % nbuf: rows m0 .. m0 + mv by cp.async, 16
  //    bytes per copy and all of a thread's copies in flight at once, the columns past the part's last k-tile up
  //    to the end of its last run zero-filled by the same copies; act-order at M = 1 gathers through perm instead
  //    (8 columns per item: 8 independent loads in flight per thread).  Either way one cp.async group per chunk,
  //    so that waiting for it can leave the B ring's newer groups in flight (step 2).
  auto stage = [&](int c0, int b) {
    const int cols = 16 * min(ct, kt_end - c0);
    const int c8s = min(p.kc, (cols + 16 * RUN - 1) / (16 * RUN) * (16 * RUN)) / 8;  // to the end of the last run
    const T* src = A + static_cast<int64_t>(m0) * p.lda + 16 * c0;
    if (WG || p.perm == nullptr) {
      const uint32_t dst = as_s + 2 * b * abuf;
      for (int id = threadIdx.x; id < mv * c8s; id += THREADS) {
        // WG: consecutive threads take consecutive rows (16 bytes apart in wg_pos); else consecutive columns.
        const int r = WG ? id % mv : id / c8s, c8 = WG ? id / mv : id % c8s;
        const bool in = 8 * c8 < cols;
        cp_async16_cg(dst + 2 * (WG ? wg_pos(r, 8 * c8) : r * astride + 8 * c8),
                      in ? src + static_cast<int64_t>(r) * p.lda + 8 * c8 : p.A, in ? 16 : 0);
      }
    } else {
      T* dst = As + b * abuf;
      for (int c8 = threadIdx.x; c8 < c8s; c8 += THREADS) {
        const bool in = 8 * c8 < cols;
        const Perm8 pm(p.perm + (in ? 16 * c0 + 8 * c8 : 0));
        for (int r = 0; r < mv; ++r) {
          alignas(16) T v[8];
          if (in) gather8(src - 16 * c0 + static_cast<int64_t>(r) * p.lda, pm, p.lda, v);
          else *reinterpret_cast<int4*>(v) = make_int4(0, 0, 0, 0);
          *reinterpret_cast<int4*>(dst + r * astride + 8 * c8) = *reinterpret_cast<const int4*>(v);
        }
      }
    }
    cp_async_commit();
  };
  // The first chunk, then the B ring (its SLOTS groups are newer), then the A rows past M, which stay zero in
  // every buffer.
  stage(kt_beg, 0);
#pragma unroll
  for (int x = 0; x < SLOTS; ++x) issue(x);
  for (int id = threadIdx.x; id < p.nbuf * (R - mv) * (astride / 8); id += THREADS) {
    const int b = id / ((R - mv) * (astride / 8)), rem = id % ((R - mv) * (astride / 8));
    const int r = mv + rem / (astride / 8), c8 = rem % (astride / 8);
    if constexpr (WG) {
      if (8 * c8 < p.kc) *reinterpret_cast<int4*>(As + b * abuf + wg_pos(r, 8 * c8)) = make_int4(0, 0, 0, 0);
    } else {
      *reinterpret_cast<int4*>(As + b * abuf + r * astride + 8 * c8) = make_int4(0, 0, 0, 0);
    }
  }

  int i = 0;           // this warp's run index
  int ring_after = 1;  // whether a run's SLOTS ring groups were committed after this chunk's A group
  for (int c0 = kt_beg, j = 0; c0 < kt_end; c0 += ct, ++j) {
    // 2. This chunk's A: wait for its group (leaving the ring's newest groups, and the next chunk's copies, in
    //    flight), then a block barrier for everyone's copies.  With one buffer the chunk is staged here, after
    //    every warp has left the previous one.
    const int b = j % p.nbuf;
    if constexpr (WG) wg_wait<0>();  // the tensor cores no longer read the previous chunk
    __syncthreads();                 // no warp reads the previous chunk's buffer any more
    const bool ahead = p.nbuf == 2 && c0 + ct < kt_end;
    if (p.nbuf == 1 && j > 0) {
      stage(c0, 0);
      cp_async_wait<0>();
    } else {
      if (ahead) stage(c0 + ct, b ^ 1);  // flies while this chunk is multiplied
      if (!ring_after) cp_async_wait<0>();
      else if (ahead) cp_async_wait<SLOTS + 1>();
      else cp_async_wait<SLOTS>();
    }
    if constexpr (WG) fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads the async one
    __syncthreads();
    const uint32_t a_s = as_s + 2 * b * abuf;

    // 3. This warp's runs inside the chunk.
    const int i_first = i;
    for (; i < nr; ++i) {
      const int kt0 = kt_beg + RUN * (phase + i * kw);
      if (kt0 >= c0 + ct) break;
      const int aoff = (kt0 - c0) * 16;  // the run's tile 0 in the chunk
      float sf[8];  // FOLD: the run's scales at the lane's column gid of sub-tiles 0..7
      float part_acc[FOLD ? NACC : 1][4];
      if constexpr (FOLD) {
#pragma unroll
        for (int q = 0; q < NACC; ++q)
#pragma unroll
          for (int e = 0; e < 4; ++e) part_acc[q][e] = 0.f;
      }
      uint32_t af[MB][4];  // A operands of a tile pair (see the staged A layout)
      uint32_t uw[4 * UC];  // the lane's words of the current unit
      // Fully unrolled in the lean swapped modes (slot offsets become immediates); by steps (a tile pair or a
      // unit) elsewhere, where the wider state (zero points, 32-128 accumulators) would otherwise spill.
#pragma unroll UNROLL_STEPS
      for (int st = 0; st < RUN / STEP; ++st) {
#pragma unroll
        for (int t = 0; t < STEP; ++t) {
          const int u = STEP * st + t;  // tile of the run; its unit is slot u / UT
          if (u % UT == 0) {
            cp_async_wait<SLOTS - 1>();
            load_unit_words<BITS, false>(my_ring + (u / UT) * UNIT_I4, lane, uw);
          }
          if constexpr (!GEN) {
            if (u == 0 && ring_scales) {
              const int4 sv = *my_sring;
              const T* s8 = reinterpret_cast<const T*>(&sv);
#pragma unroll
              for (int s = 0; s < 8; ++s) {
                if constexpr (FOLD) sf[s] = TT::to_float(s8[s]);
                else gc.s2[s] = T2{s8[s], s8[s]};
              }
            }
          }
          if (u % 2 == 0 && !WG) {
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) ldmatrix_x4(af[mb], a_s + a_lane + 2 * (8 * mb * astride + aoff + 16 * u));
          }
          // Refill the slot (its words are in registers now) with the same unit of the next run.
          if (u % UT == 0) issue(u / UT);

          // WG: tile u's fragments stay in use by its wgmma until WG_BUFS tiles later (RUN % WG_BUFS == 0).
          uint32_t(&bf)[8][2] = bfs[WG ? u % WG_BUFS : 0];
          bool per_row = false;
          if constexpr (GEN) {
            const int kt = min(kt0 + u, kt_end - 1);  // tiles past K multiply zero columns of A
            if (p.gidx != nullptr) {
              const int ga = __ldg(p.gidx + kt * 16), gb = __ldg(p.gidx + kt * 16 + 15);
              per_row = ga != gb;
              if (!per_row && ga != g_cur) {
                gc.load(p, ga, nt, gid);
                g_cur = ga;
              }
            } else {
              const int g = p.group_rows == 0 ? 0 : (p.tpg_shift >= 0 ? kt >> p.tpg_shift : kt / (p.group_rows / 16));
              if (g != g_cur) {
                gc.load(p, g, nt, gid);  // scales (unless in the epilogue) and zero points
                g_cur = g;
              }
            }
            if (per_row) dequant_rows<T, BITS>(p, uw, u % UT, kt, nt, gid, tig, bf);
          }
          if (!per_row) dequant<T, BITS, !GEN>(uw, u % UT, gc, !FOLD && !p.scale_epilogue, bf);

          if constexpr (WG) {
            const uint64_t desc = wg_desc(a_s + 2 * (aoff + 16 * u) * WG_ROWS);
            wg_fence();  // the fragments (and, on the first tile, the zeroed accumulators) are written
            wgmma_64<T, 0>(acc, {bf[0][0], bf[1][0], bf[0][1], bf[1][1]}, desc);
            wgmma_64<T, 1>(acc, {bf[2][0], bf[3][0], bf[2][1], bf[3][1]}, desc);
            wgmma_64<T, 2>(acc, {bf[4][0], bf[5][0], bf[4][1], bf[5][1]}, desc);
            wgmma_64<T, 3>(acc, {bf[6][0], bf[7][0], bf[6][1], bf[7][1]}, desc);
            wg_commit();
            wg_wait<WG_BUFS - 1>();  // the oldest tile's wgmma done: its buffer is free for the next tile
          } else {
            const int h = 2 * (u % 2);  // this tile's words in the pair's operands
#pragma unroll
            for (int mb = 0; mb < MB; ++mb) {
              const uint32_t b[2] = {af[mb][h], af[mb][h + 1]};
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                const uint32_t a[4] = {bf[2 * q][0], bf[2 * q + 1][0], bf[2 * q][1], bf[2 * q + 1][1]};
                if constexpr (FOLD) mma_16816<T>(a, b, part_acc[mb * 4 + q]);
                else mma_16816<T>(a, b, acc[mb * 4 + q]);
              }
            }
          }
        }
      }
      if constexpr (FOLD) {
        // Row n of a swapped accumulator is column 16q + gid (+8 for e >= 2): sub-tile 2q (2q + 1).
#pragma unroll
        for (int q = 0; q < NACC; ++q)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float s = ring_scales ? sf[2 * (q % 4) + (e >> 1)] : 1.f;
            acc[q][e] = fmaf(part_acc[q][e], s, acc[q][e]);
          }
      }
    }
    ring_after = i > i_first;
  }
  cp_async_wait_all();
  if constexpr (WG) wg_wait<0>();

  // 4. k-phases add their partial tiles in order 0, 1, ..., kw-1 into red[strip][row][col] (fp32).
  __syncthreads();  // ring and A no longer read
  for (int ph = 0; ph < kw; ++ph) {
    if (phase == ph) {
      float* rs = red + sl * R * RED_STRIDE;
#pragma unroll
      for (int q = 0; q < NACC; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // C^T fragment: its row is column n of C, its column row m of C.
          const int row = 8 * (q / 4) + 2 * tig + (e & 1);
          const int col = 16 * (q % 4) + gid + 8 * (e >> 1);
          float* r = rs + row * RED_STRIDE + col;
          *r = ph == 0 ? acc[q][e] : *r + acc[q][e];
        }
    }
    __syncthreads();
  }

  // 5. Output: the block's tile, or (cluster) the rank's slice of the tile summed over the ranks in order.
  const int pairs = sb * mv * 32;  // column pairs of the valid rows
  int lo = 0, hi = pairs;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cs > 1) {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
    const int per = (pairs + cs - 1) / cs;
    lo = blockIdx.x * per;
    hi = min(pairs, lo + per);
  }
#endif
  for (int id = lo + threadIdx.x; id < hi; id += THREADS) {
    const int s = id / (mv * 32), rem = id % (mv * 32);
    const int row = rem / 32, col = 2 * (rem % 32);
    const int off = (s * R + row) * RED_STRIDE + col;
    float v0, v1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (cs > 1) {
      v0 = 0.f;
      v1 = 0.f;
      for (int r = 0; r < cs; ++r) {
        uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(red + off)), remote;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(r));
        float x0, x1;
        asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n" : "=f"(x0), "=f"(x1) : "r"(remote));
        v0 += x0;
        v1 += x1;
      }
    } else
#endif
    {
      v0 = red[off];
      v1 = red[off + 1];
    }
    const int ntc = sblock * sb + s;
    if (p.scale_epilogue) {
      v0 *= TT::to_float(scales[scale_pos(ntc, col / 8, col % 8, p.single_perm)]);
      v1 *= TT::to_float(scales[scale_pos(ntc, col / 8, col % 8 + 1, p.single_perm)]);
    }
    const int64_t o = static_cast<int64_t>(m0 + row) * p.N + ntc * 64 + col;
    if (p.slices == 1) *reinterpret_cast<T2*>(reinterpret_cast<T*>(p.C) + o) = TT::pack(v0, v1);
    else *reinterpret_cast<float2*>(p.ws + static_cast<int64_t>(gslice) * p.M * p.N + o) = make_float2(v0, v1);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // No block leaves while another rank may still read its shared memory.  A relaxed arrive: this thread's remote
  // loads were consumed by the stores above, so they are done, and nothing is published here; a release arrive
  // compiles to MEMBAR.ALL.GPU, which made every block wait for its output stores' acknowledgements (2-5 % of the
  // time at M <= 32 on the small shapes, docs/kernel-tuning.md).
  if (cs > 1) asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
#endif
}

// Large-M path: dequantize the Marlin weight to a dense [K, N] matrix of a's dtype, then multiply with cuBLAS.
// One warp per 16x64 tile (8 strips of one k-tile per block; a 2/3-bit warp reads its tile's unit and keeps its
// tile's words): the lane's fragment words are dequantized by
// the GEMM's own dequant() (same rounding: (q - z) exact, one rounding of the product), scattered into a
// per-warp shared-memory tile and written out as 16 rows of 128 coalesced bytes.
template <typename T, int BITS>
__global__ void __launch_bounds__(THREADS) marlin_dequant_kernel(const Params p, T* __restrict__ W) {
  constexpr int UT = unit_tiles<BITS>(), UC = unit_chunks<BITS>();
  constexpr int TS = 64 + 8;  // halves per tile row in shared memory
  __shared__ __align__(16) T tile[WARPS][16][TS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int NS = p.N / 64;
  const int nt = blockIdx.x * WARPS + warp, kt = blockIdx.y;
  if (nt >= NS) return;
  uint32_t uw[4 * UC];
  load_unit_words<BITS, true>(p.B + (static_cast<int64_t>(kt / UT) * NS + nt) * (32 * UC), lane, uw);
  uint32_t bf[8][2];
  bool per_row = false;
  int g = 0;
  if (p.gidx != nullptr) {
    const int ga = __ldg(p.gidx + kt * 16), gb = __ldg(p.gidx + kt * 16 + 15);
    per_row = ga != gb;
    g = ga;
  } else if (p.group_rows) {
    g = (kt * 16) / p.group_rows;
  }
  GroupCache<T, BITS> gc;
  if (!per_row) {
#pragma unroll
    for (int s = 0; s < 8; ++s) gc.set_zero(s, 1 << (BITS - 1));
    gc.load(p, g, nt, gid);  // p.scale_epilogue is 0 here: the scales are always applied
  }
  // The k-tile's place in its unit as a compile-time constant, as in the GEMM (3-bit words are chosen by it).
#pragma unroll
  for (int v = 0; v < UT; ++v) {
    if (v != kt % UT) continue;
    if (per_row) dequant_rows<T, BITS>(p, uw, v, kt, nt, gid, tig, bf);
    else dequant<T, BITS>(uw, v, gc, true, bf);
  }
  // bf[s][h] = (rows 2tig + 8h, 2tig + 8h + 1; column 8s + gid)
#pragma unroll
  for (int s = 0; s < 8; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t v = bf[s][h];
      tile[warp][2 * tig + 8 * h][8 * s + gid] = from_u32<typename TypeTraits<T>::T2>(v).x;
      tile[warp][2 * tig + 8 * h + 1][8 * s + gid] = from_u32<typename TypeTraits<T>::T2>(v).y;
    }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = lane + 32 * i, row = idx / 8, c8 = idx % 8;
    *reinterpret_cast<int4*>(W + static_cast<int64_t>(16 * kt + row) * p.N + 64 * nt + 8 * c8) =
        *reinterpret_cast<const int4*>(&tile[warp][row][8 * c8]);
  }
}

// Kernel `kern` with its shared-memory limit raised to `bytes` (once per device).
template <auto kern>
void allow_smem(size_t bytes) {
  static bool done[64] = {false};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64 || !done[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    if (dev < 64) done[dev] = true;
  }
}

__host__ inline cudaLaunchConfig_t launch_config(dim3 grid, int cs, size_t smem, cudaStream_t stream,
                                                 cudaLaunchAttribute* cluster) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cluster->id = cudaLaunchAttributeClusterDimension;
  cluster->val.clusterDim.x = cs;
  cluster->val.clusterDim.y = 1;
  cluster->val.clusterDim.z = 1;
  cfg.attrs = cluster;
  cfg.numAttrs = cs > 1 ? 1 : 0;
  return cfg;
}

// Whether a launch of `kern` (one block per SM) runs in one wave: its blocks, or its clusters of cs blocks, all
// resident at once.  A cluster's blocks share one GPC, so fewer blocks than SMs need not all fit (8b.down at
// M = 16, 16 clusters of 8 on 132 SMs, ran 22 % slower at one block per SM).
template <auto kern, int BITS, int MB>
bool one_wave(dim3 grid, int cs) {
  static int resident[64][4] = {};  // 1 + resident clusters, per device and log2(cs); 0: not asked yet
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const int lg = cs >= 8 ? 3 : cs >= 4 ? 2 : cs >= 2 ? 1 : 0;
  int n = dev < 64 ? resident[dev][lg] - 1 : -1;
  if (n < 0) {
    allow_smem<kern>(max_smem<BITS, MB>());
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = launch_config(dim3(cs), cs, max_smem<BITS, MB>(), nullptr, &attr);
    if (cs > 1) C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, kern, &cfg));
    else n = sm_count();
    if (dev < 64) resident[dev][lg] = n + 1;
  }
  return static_cast<int64_t>(grid.x) * grid.y * grid.z <= static_cast<int64_t>(n) * cs;
}

template <typename T, int BITS, int MB, bool GEN, bool WG, bool SOLO>
void launch_kernel(const Params& p, dim3 grid, int cs, size_t smem, cudaStream_t stream) {
  constexpr auto kern = marlin_gemm_kernel<T, BITS, MB, GEN, WG, SOLO>;
  allow_smem<kern>(max_smem<BITS, MB>());
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config(grid, cs, smem, stream, &attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, p));
}

// 16-row tiles: under the two-blocks-per-SM cap (128 registers) their run loop compiles to 842 instructions between
// its first and last HMMA (fp16 4-bit), without it to 812 in 146 registers.  Where one block per SM runs the launch
// in one wave anyway, the SOLO build is up to 6 % faster (docs/kernel-tuning.md); where it would take two waves
// (more blocks than SMs, or clusters that do not all fit at once) the capped build keeps two blocks per SM.
// solo: 0 decides so; 1 / -1 force the SOLO / capped build (the tuning override, and the tests comparing the two).
template <typename T, int BITS, int MB, bool GEN, bool WG = false>
void launch_mb(const Params& p, int solo, dim3 grid, int cs, size_t smem, cudaStream_t stream) {
  if constexpr (MB == 2) {
    if (solo > 0 || (solo == 0 && one_wave<marlin_gemm_kernel<T, BITS, MB, GEN, WG, true>, BITS, MB>(grid, cs)))
      return launch_kernel<T, BITS, MB, GEN, WG, true>(p, grid, cs, smem, stream);
  }
  launch_kernel<T, BITS, MB, GEN, WG, false>(p, grid, cs, smem, stream);
}

// The lean instantiation needs one group per run: a single group, or groups of a power-of-two multiple of RUN
// k-tiles (g128, g256, ...) with runs starting at multiples of RUN (kpp is one).
__host__ inline bool needs_general(const Params& p) {
  const bool run_groups = p.group_rows == 0 || (p.tpg_shift >= 3);
  return p.gidx != nullptr || p.zeros != nullptr || !run_groups;
}

// Defined (explicitly instantiated) in marlin_inst_<dtype>_b<bits>.cu, so the kernels build in parallel.
// wg: the wgmma loop (mb == 8, lean mode only; the caller checks wgmma_supported()); solo: see launch_mb.
template <typename T, int BITS>
void launch_bits(const Params& p, int mb, bool wg, int solo, dim3 grid, int cs, size_t smem, cudaStream_t stream) {
  const bool gen = needs_general(p);
  if (wg && mb == 8 && !gen) return launch_mb<T, BITS, 8, false, true>(p, solo, grid, cs, smem, stream);
  switch (mb) {
    case 1: return gen ? launch_mb<T, BITS, 1, true>(p, solo, grid, cs, smem, stream) : launch_mb<T, BITS, 1, false>(p, solo, grid, cs, smem, stream);
    case 2: return gen ? launch_mb<T, BITS, 2, true>(p, solo, grid, cs, smem, stream) : launch_mb<T, BITS, 2, false>(p, solo, grid, cs, smem, stream);
    case 4: return gen ? launch_mb<T, BITS, 4, true>(p, solo, grid, cs, smem, stream) : launch_mb<T, BITS, 4, false>(p, solo, grid, cs, smem, stream);
    default: return gen ? launch_mb<T, BITS, 8, true>(p, solo, grid, cs, smem, stream) : launch_mb<T, BITS, 8, false>(p, solo, grid, cs, smem, stream);
  }
}

}  // namespace marlin
}  // namespace gptq_vllm
