// Marlin-layout GEMM kernel templates (included by marlin_gemm.cu and the marlin_inst_*.cu files, which
// instantiate them per dtype and bit width so that the build runs in parallel).  See marlin_gemm.cu.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"

namespace gptq_vllm {
namespace marlin {

constexpr int THREADS = 256;           // 8 warps per block (GEMM and dequant kernels)
constexpr int WARPS = THREADS / 32;
constexpr int A_PAD = 8;               // halves of padding per staged A row: fragment loads hit 32 banks
constexpr int RED_STRIDE = 72;         // floats per row of the partial-sum tile (64 + 8: fewer bank conflicts)
constexpr int A_SMEM_BYTES = 32768;    // staged A chunk: rows x KC halves (KC chosen to fit)
constexpr int DENSE_MIN_M_DEFAULT = 128;  // from this M on: fast dequantize + cuBLAS (tuned on the H200)

struct Params {
  const void* A;          // [M, K] fp16/bf16, row-major, 16-byte aligned rows
  const int4* B;          // Marlin words
  const void* scales;     // [NG, N] Marlin-permuted, dtype of A
  const uint32_t* zeros;  // [NG, N*b/32] Marlin zero points, or nullptr (symmetric: z = 2^(b-1))
  const int* gidx;        // [K] group of each row (nondecreasing), or nullptr
  const int* perm;        // [K] act-order gather: column k of the GEMM's A is a[:, perm[k]] (0 if >= lda), or nullptr
  void* C;                // [M, N] output (slices == 1)
  float* ws;              // [slices, M, N] fp32 partials (slices > 1)
  int M, K, N;
  int lda;                // row stride (and column count) of a
  int tpg_shift;       // log2(group_rows / 16) when that is a power of two, else -1
  int group_rows;      // rows per group when groups are runs of G rows with G % 16 == 0; 0: one group
  int single_perm;     // scales were permuted with SCALE_PERM_SINGLE (group_size == -1 or >= K)
  int scale_epilogue;  // one group and no g_idx: multiply the fp32 accumulators by the scales at the end
  int sb;              // 64-column strips per block (1, 2, 4, 8); divides N/64; 8/sb warps split K in a block
  int kpp;             // k-tiles (16 rows) per split-K part; parts = cluster size x global slices
  int kc;              // A columns staged per chunk (multiple of 128)
  int slices;          // global split-K slices (fp32 workspace + reduce kernel); 1 = write C directly
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

// ---- asynchronous copies (cp.async, sm_80+) ---------------------------------------------------------
__device__ __forceinline__ void cp_async16_cg(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async16_ca(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

// Ring depth (k-tiles in flight per warp) by bit width: 8 x 512 B (4-bit) / 6 x 1 KB (8-bit) per warp.
template <int BITS> struct Ring { static constexpr int D = BITS == 4 ? 8 : 6; };

// Rows of the block tile: MODE 0 = "swapped" (M <= 8: C^T = W^T A^T, the weight fragments are the mma's A
// operand, 8 activation rows its B operand: half the mma count of a 16-row tile), else 16 * MODE rows.
template <int MODE> struct ModeRows { static constexpr int R = MODE == 0 ? 8 : 16 * MODE; };

template <int BITS>
__host__ __device__ constexpr int ring_bytes() { return WARPS * Ring<BITS>::D * 32 * 16 * (BITS / 4); }
template <int BITS>
__host__ __device__ constexpr int sring_bytes() { return WARPS * Ring<BITS>::D * 32 * 16; }

template <int BITS, int MODE>
constexpr size_t max_smem() {
  return static_cast<size_t>(ring_bytes<BITS>() + sring_bytes<BITS>()) +
         static_cast<size_t>(ModeRows<MODE>::R) * (A_SMEM_BYTES / (2 * ModeRows<MODE>::R) + A_PAD) * 2;
}

// ---- the GEMM kernel ------------------------------------------------------------------------------------
// Block = 8 warps = sb strips x kw = 8/sb k-phases; block tile = R rows x 64*sb columns; its k-tiles are the
// range of one split-K part; warp (strip, phase) takes the part's k-tiles phase, phase + kw, ...
// Every warp streams its own B tiles (and, at group starts, its lanes' 8 scales) through a private ring of
// D shared-memory slots filled with cp.async: lane t copies, and later reads back, exactly its own 16/32
// bytes, so a slot needs no barrier; D tiles are always in flight per warp.
// A is staged per chunk of kc columns in shared memory (rows past M are zero), shared by the block's warps.
// Partial sums: k-phases add into a shared-memory tile in a fixed order; split-K parts of one cluster
// (sm_90 thread-block clusters along gridDim.x) are added through distributed shared memory in rank order,
// each rank producing a slice of the output; global slices (gridDim.z) go through the fp32 workspace.
// All orders are fixed: the result is deterministic.
// GEN: general path (g_idx_sorted rows, zero points); GEN = false compiles them out (symmetric, plain groups).
template <typename T, int BITS, int MODE, bool GEN>
__global__ void __launch_bounds__(THREADS, MODE >= 2 ? 1 : 2) marlin_gemm_kernel(const Params p) {
  using TT = TypeTraits<T>;
  using T2 = typename TT::T2;
  constexpr int R = ModeRows<MODE>::R;
  constexpr int D = Ring<BITS>::D;
  constexpr int W4 = BITS / 4;      // 16-byte words per lane per k-tile
  constexpr int TILE_I4 = 32 * W4;  // 16-byte words per 16x64 tile
  constexpr int NACC = MODE == 0 ? 4 : MODE * 8;  // m16n8 accumulators per lane

  extern __shared__ __align__(16) unsigned char smem[];
  int4* ring = reinterpret_cast<int4*>(smem);                                  // [WARPS][D][32][W4]
  int4* sring = reinterpret_cast<int4*>(smem + ring_bytes<BITS>());            // [WARPS][D][32]
  T* As = reinterpret_cast<T*>(smem + ring_bytes<BITS>() + sring_bytes<BITS>());  // [R][kc + A_PAD]
  float* red = reinterpret_cast<float*>(smem);                                 // [sb][R][RED_STRIDE] (reuses ring)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int sb = p.sb, kw = WARPS / sb;
  const int sl = warp % sb, phase = warp / sb;
  const int NS = p.N / 64;
  const int nt = blockIdx.y * sb + sl;
  const int cs = gridDim.x;  // cluster size along x (1 without clusters)
  const int mblock = blockIdx.z / p.slices, gslice = blockIdx.z % p.slices;
  const int m0 = mblock * R;
  const int mv = min(R, p.M - m0);  // valid rows of this block tile
  const int part = gslice * cs + blockIdx.x;
  const int KT = p.K / 16;
  const int kt_beg = part * p.kpp;
  const int kt_end = min(KT, kt_beg + p.kpp);
  const int nj = kt_end > kt_beg + phase ? (kt_end - kt_beg - phase + kw - 1) / kw : 0;
  const int astride = p.kc + A_PAD;
  const bool grouped = (!GEN || p.gidx == nullptr) && p.group_rows > 0;  // scales per group, prefetched in the ring

  int4* my_ring = ring + (warp * D) * 32 * W4 + lane * W4;
  int4* my_sring = sring + (warp * D) * 32 + lane;
  const T* scales = reinterpret_cast<const T*>(p.scales);
  const int tsh = p.tpg_shift, tpg = p.group_rows / 16;
  auto grp = [&](int kt) { return tsh >= 0 ? (kt >> tsh) : kt / tpg; };

  // Issue state (running pointers: no index arithmetic per tile beyond adds).
  const int64_t istride = static_cast<int64_t>(kw) * NS * TILE_I4;
  const int4* isrc = p.B + (static_cast<int64_t>(kt_beg + phase) * NS + nt) * TILE_I4 + lane * W4;
  const T* ssrc = scales + nt * 64 + 8 * gid;
  int ij = 0, ikt = kt_beg + phase, islot = 0, ig = -1;
  auto issue = [&]() {
    if (ij < nj) {
#pragma unroll
      for (int w = 0; w < W4; ++w) cp_async16_cg(my_ring + islot * 32 * W4 + w, isrc + w);
      if (grouped) {
        const int g = grp(ikt);
        if (g != ig) {
          cp_async16_ca(my_sring + islot * 32, ssrc + static_cast<int64_t>(g) * p.N);
          ig = g;
        }
      }
    }
    cp_async_commit();  // one group per call, empty or not: wait_group<D-1> then covers the oldest tile
    ++ij;
    isrc += istride;
    ikt += kw;
    islot = islot + 1 == D ? 0 : islot + 1;
  };

  // 1. Fill the ring, then zero the A rows past M (they stay zero for every chunk).
#pragma unroll
  for (int j = 0; j < D; ++j) issue();
  for (int id = threadIdx.x; id < (R - mv) * (astride / 8); id += THREADS) {
    const int r = mv + id / (astride / 8), c8 = id % (astride / 8);
    *reinterpret_cast<int4*>(As + r * astride + 8 * c8) = make_int4(0, 0, 0, 0);
  }

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
  const T* A = reinterpret_cast<const T*>(p.A);
  const int ct = p.kc / 16;  // k-tiles per chunk (multiple of 8, so chunks start at a phase-0 tile)
  int j = 0, cslot = 0;
  for (int c0 = kt_beg; c0 < kt_end; c0 += ct) {
    // 2. Stage A[m0 : m0 + mv, 16 c0 : 16 min(c0 + ct, kt_end)) (the B ring keeps streaming meanwhile).
    const int cols = 16 * min(ct, kt_end - c0);
    __syncthreads();
    if (p.perm == nullptr) {
      for (int id = threadIdx.x; id < mv * (cols / 8); id += THREADS) {
        const int r = id / (cols / 8), c8 = id % (cols / 8);
        *reinterpret_cast<int4*>(As + r * astride + 8 * c8) =
            __ldg(reinterpret_cast<const int4*>(A + static_cast<int64_t>(m0 + r) * p.lda + 16 * c0 + 8 * c8));
      }
    } else {
      for (int c = threadIdx.x; c < cols; c += THREADS) {
        const int src = __ldg(p.perm + 16 * c0 + c);
        const bool in = static_cast<unsigned>(src) < static_cast<unsigned>(p.lda);
        for (int r = 0; r < mv; ++r)
          As[r * astride + c] = in ? A[static_cast<int64_t>(m0 + r) * p.lda + src] : TT::from_float(0.f);
      }
    }
    __syncthreads();

    // 3. This warp's k-tiles of the chunk.
    const int jend = min(nj, (c0 + ct - kt_beg + kw - 1 - phase) / kw);
    for (; j < jend; ++j) {
      const int kt = kt_beg + phase + j * kw;
      cp_async_wait<D - 1>();
      int4 bq[W4];
#pragma unroll
      for (int w = 0; w < W4; ++w) bq[w] = my_ring[cslot * 32 * W4 + w];
      uint32_t bf[8][2];
      bool per_row = false;
      if (grouped) {
        const int g = grp(kt);
        if (g != g_cur) {
          g_cur = g;
          const int4 sv = my_sring[cslot * 32];
          const T* s8 = reinterpret_cast<const T*>(&sv);
#pragma unroll
          for (int s = 0; s < 8; ++s) gc.s2[s] = T2{s8[s], s8[s]};
          if constexpr (GEN) {
            if (p.zeros != nullptr) {
              const uint32_t* zrow = p.zeros + static_cast<int64_t>(g) * (p.N * BITS / 32);
#pragma unroll
              for (int s = 0; s < 8; ++s) gc.set_zero(s, zero_point<BITS>(zrow, nt, s, gid));
            }
          }
        }
      } else if constexpr (GEN) {
        if (p.gidx != nullptr) {
          const int ga = __ldg(p.gidx + kt * 16), gb = __ldg(p.gidx + kt * 16 + 15);
          per_row = ga != gb;
          if (!per_row && ga != g_cur) {
            gc.load(p, ga, nt, gid);
            g_cur = ga;
          }
        } else if (g_cur < 0) {
          if (p.zeros != nullptr) gc.load(p, 0, nt, gid);  // one group: zeros only (scales in the epilogue)
          g_cur = 0;
        }
      }
      if (GEN && per_row) dequant_rows<T, BITS>(p, bq, kt, nt, gid, tig, bf);
      else dequant<T, BITS>(bq, gc, !p.scale_epilogue, bf);
      // Refill the slot (its words are in registers now).
      issue();
      cslot = cslot + 1 == D ? 0 : cslot + 1;

      const T* ak = As + (kt - c0) * 16 + 2 * tig;
      if constexpr (MODE == 0) {
        uint32_t b[2];
        b[0] = *reinterpret_cast<const uint32_t*>(ak + gid * astride);
        b[1] = *reinterpret_cast<const uint32_t*>(ak + gid * astride + 8);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint32_t a[4] = {bf[2 * q][0], bf[2 * q + 1][0], bf[2 * q][1], bf[2 * q + 1][1]};
          mma_16816<T>(a, b, acc[q]);
        }
      } else {
#pragma unroll
        for (int mi = 0; mi < MODE; ++mi) {
          if (mi * 16 < mv) {
            uint32_t a[4];
            const T* base = ak + (mi * 16 + gid) * astride;
            a[0] = *reinterpret_cast<const uint32_t*>(base);
            a[1] = *reinterpret_cast<const uint32_t*>(base + 8 * astride);
            a[2] = *reinterpret_cast<const uint32_t*>(base + 8);
            a[3] = *reinterpret_cast<const uint32_t*>(base + 8 * astride + 8);
#pragma unroll
            for (int s = 0; s < 8; ++s) mma_16816<T>(a, bf[s], acc[mi * 8 + s]);
          }
        }
      }
    }
  }
  cp_async_wait_all();

  // 4. k-phases add their partial tiles in order 0, 1, ..., kw-1 into red[strip][row][col] (fp32).
  __syncthreads();  // ring and A no longer read
  for (int ph = 0; ph < kw; ++ph) {
    if (phase == ph) {
      float* rs = red + sl * R * RED_STRIDE;
#pragma unroll
      for (int i = 0; i < NACC; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int row, col;
          if constexpr (MODE == 0) {
            row = 2 * tig + (e & 1);
            col = 16 * i + gid + 8 * (e >> 1);
          } else {
            row = (i / 8) * 16 + gid + 8 * (e >> 1);
            col = 8 * (i % 8) + 2 * tig + (e & 1);
          }
          float* r = rs + row * RED_STRIDE + col;
          *r = ph == 0 ? acc[i][e] : *r + acc[i][e];
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
    const int ntc = blockIdx.y * sb + s;
    if (p.scale_epilogue) {
      v0 *= TT::to_float(scales[scale_pos(ntc, col / 8, col % 8, p.single_perm)]);
      v1 *= TT::to_float(scales[scale_pos(ntc, col / 8, col % 8 + 1, p.single_perm)]);
    }
    const int64_t o = static_cast<int64_t>(m0 + row) * p.N + ntc * 64 + col;
    if (p.slices == 1) *reinterpret_cast<T2*>(reinterpret_cast<T*>(p.C) + o) = TT::pack(v0, v1);
    else *reinterpret_cast<float2*>(p.ws + static_cast<int64_t>(gslice) * p.M * p.N + o) = make_float2(v0, v1);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cs > 1) {  // no block leaves while another rank may still read its shared memory
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
  }
#endif
}

// Large-M path: dequantize the Marlin weight to a dense [K, N] matrix of a's dtype, then multiply with cuBLAS.
// One warp per 16x64 tile (8 strips of one k-tile per block): the lane's fragment words are dequantized by
// the GEMM's own dequant() (same rounding: (q - z) exact, one rounding of the product), scattered into a
// per-warp shared-memory tile and written out as 16 rows of 128 coalesced bytes.
template <typename T, int BITS>
__global__ void __launch_bounds__(THREADS) marlin_dequant_kernel(const Params p, T* __restrict__ W) {
  constexpr int W4 = BITS / 4;
  constexpr int TILE_I4 = 32 * W4;
  constexpr int TS = 64 + 8;  // halves per tile row in shared memory
  __shared__ __align__(16) T tile[WARPS][16][TS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int NS = p.N / 64;
  const int nt = blockIdx.x * WARPS + warp, kt = blockIdx.y;
  if (nt >= NS) return;
  int4 bq[W4];
  const int4* src = p.B + (static_cast<int64_t>(kt) * NS + nt) * TILE_I4 + lane * W4;
#pragma unroll
  for (int w = 0; w < W4; ++w) bq[w] = __ldg(src + w);
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
  if (per_row) {
    dequant_rows<T, BITS>(p, bq, kt, nt, gid, tig, bf);
  } else {
    GroupCache<T, BITS> gc;
#pragma unroll
    for (int s = 0; s < 8; ++s) gc.set_zero(s, 1 << (BITS - 1));
    gc.load(p, g, nt, gid);  // p.scale_epilogue is 0 here: the scales are always applied
    dequant<T, BITS>(bq, gc, true, bf);
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

template <typename T, int BITS, int MODE, bool GEN>
void launch_mode(const Params& p, dim3 grid, int cs, size_t smem, cudaStream_t stream) {
  auto kern = marlin_gemm_kernel<T, BITS, MODE, GEN>;
  static bool attr_done[64] = {false};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64 || !attr_done[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(max_smem<BITS, MODE>())));
    if (dev < 64) attr_done[dev] = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cs;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cs > 1 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, p));
}

template <typename T, int BITS, bool GEN>
void launch_gen(const Params& p, int mode, dim3 grid, int cs, size_t smem, cudaStream_t stream) {
  switch (mode) {
    case 0: launch_mode<T, BITS, 0, GEN>(p, grid, cs, smem, stream); break;
    case 1: launch_mode<T, BITS, 1, GEN>(p, grid, cs, smem, stream); break;
    case 2: launch_mode<T, BITS, 2, GEN>(p, grid, cs, smem, stream); break;
    default: launch_mode<T, BITS, 4, GEN>(p, grid, cs, smem, stream); break;
  }
}

// Defined (explicitly instantiated) in marlin_inst_<dtype>_b<bits>.cu, so the kernels build in parallel.
template <typename T, int BITS>
void launch_bits(const Params& p, int mode, dim3 grid, int cs, size_t smem, cudaStream_t stream) {
  if (p.gidx != nullptr || p.zeros != nullptr) launch_gen<T, BITS, true>(p, mode, grid, cs, smem, stream);
  else launch_gen<T, BITS, false>(p, mode, grid, cs, smem, stream);
}

}  // namespace marlin
}  // namespace gptq_vllm
