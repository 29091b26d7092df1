// The mainloop of the Hopper GEMM for 2- and 3-bit weights: a collective in CUTLASS's SM90 form (the same
// contract as its TMA warp-specialized mainloops, so CUTLASS's cooperative / ping-pong kernels, tile schedulers
// and TMA epilogue run it unchanged) that reads the weight in our 2/3-bit Marlin units as the M <= 16 kernels do.
//
// Why not CUTLASS's mixed-input collective (which handles int2): its weights reach shared memory by TMA through a
// CuTe layout recast to bytes, and no layout in which a thread's wgmma fragment is a few whole bytes survives that
// recast for 2-bit codes (docs/kernels.md, "2- and 3-bit"); 3-bit has no CUTLASS code type.  A unit's bytes need
// no layout at all: the W-wide tile of a stage is W/64 consecutive units per unit row, so the producer moves them
// with one bulk copy per unit row (cp.async.bulk, no tensor map), beside the activation tile (TMA, multicast along
// the cluster) and the stage's scale row.
//
// Geometry (gptq_vllm/formats/marlin.py is the definition).  A stage is 64 rows of K, four k-tiles: one 3-bit unit
// row (4 k-tiles) or two 2-bit unit rows (2 k-tiles each).  wgmma's register A fragment of warp w in a warpgroup
// covers rows 16w .. 16w + 15 of its 64 weight columns (one unit strip): register j holds the pair of k rows
// (2 tig + 8 (j / 2), + 1) of column 16w + gid + 8 (j % 2), i.e. the unit's pair p = 2 s + b with n8 sub-tile
// s = 2w + j % 2 and k block b = j / 2:  p = 4w + 2 (j % 2) + j / 2, "pair group" w of the k-tile.
//
// Where a warp's pairs sit: 3-bit units keep each pair group (the four pairs p = 4g .. 4g + 3 of every k-tile of
// the unit, which warp g supplies) in its own three lane words 4c + g, at bit positions that depend only on the
// k-tile (marlin.py), so a thread loads its warp's three words of a stage at a per-warp offset and decodes every k
// block with constant shifts and masks: the same code in every warp, as wgmma needs (a branch on the warp index
// between a wgmma and its wait makes ptxas serialize the wgmmas, C7513).  2-bit units keep a k-tile's pairs in its
// own two words (word p / 8, bit 2 (p % 8)): a warp's four pairs of a k-tile are one byte of one word, chosen by a
// per-warp word offset and a shift by 0 or 8 (`WarpPairs`).  A pair then costs one lop3 and one HFMA2 (fp16,
// fields in place) or a shift, a lop3 and one HSUB2.
// The loop is CUTLASS's mixed-input one: first and last k tiles peeled, no branch between the steady loop's wgmmas;
// with those branches the 3-bit kernel took 1.13x as long at M = 64 (geometric mean).  A version in which warp w
// decoded all 16 pairs of k-tile w with constant positions and exchanged them through shared memory took 1.17x /
// 1.07x the time at 2 / 3 bits (docs/kernels.md, "2- and 3-bit").
#pragma once

#include "cute/arch/copy_sm90_tma.hpp"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/builders/sm90_common.inl"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/gemm.h"
#include "cutlass/pipeline/pipeline.hpp"

#include "../common.cuh"  // lop3_and_or
#include "../units.h"

namespace gptq_vllm::hopper {

using namespace cute;

// Dispatch tag: CUTLASS's GemmUniversal picks the kernel by Schedule, as for its own mainloops.
template <int Stages_, class ClusterShape_, class KernelSchedule>
struct MainloopSm90Units {
  static constexpr int Stages = Stages_;
  using ClusterShape = ClusterShape_;
  using ArchTag = cutlass::arch::Sm90;
  using Schedule = KernelSchedule;
};

namespace unit_detail {

template <class T>
struct Magic;
// (x & mask) | OR = T2(B + a, B + b) for small fields a, b at bits 0 and 16, B = 1024 (fp16) or 128 (bf16), exact.
template <>
struct Magic<cutlass::half_t> {
  static constexpr uint32_t OR = 0x64006400u;  // half2(1024, 1024)
  using T2 = __half2;
};
template <>
struct Magic<cutlass::bfloat16_t> {
  static constexpr uint32_t OR = 0x43004300u;  // bf162(128, 128)
  using T2 = __nv_bfloat162;
};

// T2(B + 2^(b-1), B + 2^(b-1)): subtracting it leaves q - 2^(b-1), exact.
template <class T, int BITS>
constexpr uint32_t sub_bits() {
  if constexpr (cute::is_same_v<T, cutlass::half_t>) {
    constexpr uint32_t h = 0x6400u + (1u << (BITS - 1));  // 1024 + m: fp16 steps by 1 in [1024, 2048)
    return h | (h << 16);
  } else {
    constexpr uint32_t h = 0x4300u + (1u << (BITS - 1));  // 128 + m: bf16 steps by 1 in [128, 256)
    return h | (h << 16);
  }
}

// Byte offset of a lane's word x within a unit: word x sits in the lane's chunk x / 4 (chunks are 32 lanes x 16
// bytes apart), at word x % 4 of it.
CUTLASS_HOST_DEVICE constexpr int unit_word_offset(int x) { return 512 * (x / 4) + 4 * (x % 4); }

// 2-bit: where warp `warp` of a consumer warpgroup finds its pairs p_j = 4 warp + 2 (j % 2) + j / 2 (fragment
// register j) in a k-tile's two lane words: all four in word warp / 2, at bits 8 (warp % 2) + 2 (p_j % 4).  The
// thread loads only that word, and `shift8` moves odd warps' byte down.
struct WarpPairs {
  uint32_t shift8;
  int word;
};

CUTLASS_DEVICE WarpPairs warp_pairs(int warp) { return {8u * uint32_t(warp % 2), warp / 2}; }

// T2(q - 2^(b-1)) of the 3-bit field at bits L .. L + 2 of both halves of x, exact.  fp16 keeps a field inside its
// 10-bit mantissa (L <= 7) in place: (x & mask) | 1024 = 1024 + q 2^L, and one HFMA2 by 2^-L finishes it (the
// Marlin kernels' trick).
template <class T, int L>
CUTLASS_DEVICE uint32_t field3(uint32_t x) {
  using M = Magic<T>;
  using T2 = typename M::T2;
  T2 r;
  if constexpr (cute::is_same_v<T, cutlass::half_t> && L + 3 <= 10) {
    const uint32_t v = lop3_and_or(x, 0x00070007u << L, M::OR);
    r = __hfma2(from_u32<T2>(v), __float2half2_rn(1.f / (1 << L)), __float2half2_rn(-(1024.f / (1 << L) + 4)));
  } else {
    r = __hsub2(from_u32<T2>(lop3_and_or(x >> L, 0x00070007u, M::OR)), from_u32<T2>(sub_bits<T, 3>()));
  }
  return reinterpret_cast<const uint32_t&>(r);
}

// The four pairs (codes at bits 0 and 16, rows k and k + 1) of the warp in k-tile KB of a stage, as T2(q - 2^(b-1)),
// exact; out[j] is fragment register j's pair f_j = 2 (j % 2) + j / 2 of the warp's group.
// 2-bit: w[KB] is the warp's word of k-tile KB.  3-bit: w[0..2] are the group's three words of the stage's unit
// (marlin.py): k-tile c < 3 in w[c] at bits 3f; k-tile 3's pairs f < 3 at bit 12 of w[f], pair 3 spread over bit 15 of
// the three words.  The shifts by 9 are the same expressions in k-tiles c and 3, computed once.
template <class T, int BITS, int KB>
CUTLASS_DEVICE void decode_pairs(const uint32_t* w, const WarpPairs& wp, uint32_t (&out)[4]) {
  using M = Magic<T>;
  using T2 = typename M::T2;
  if constexpr (BITS == 2) {
    const uint32_t src = w[KB] >> wp.shift8;
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int x = 2 * (2 * (j % 2) + j / 2);  // bit of pair p_j % 4 within the byte
      T2 r;
      if constexpr (cute::is_same_v<T, cutlass::half_t>) {
        // (1024 + q 2^x) 2^-x - (1024 2^-x + 2) = q - 2, every term exact.
        const uint32_t v = lop3_and_or(src, 0x00030003u << x, M::OR);
        r = __hfma2(from_u32<T2>(v), __float2half2_rn(1.f / (1 << x)), __float2half2_rn(-(1024.f / (1 << x) + 2)));
      } else {
        r = __hsub2(from_u32<T2>(lop3_and_or(src >> x, 0x00030003u, M::OR)), from_u32<T2>(sub_bits<T, 2>()));
      }
      out[j] = reinterpret_cast<const uint32_t&>(r);
    }
  } else {
    uint32_t q[4];  // pairs f = 0..3 of the group
    if constexpr (KB < 3) {
      q[0] = field3<T, 0>(w[KB]);
      q[1] = field3<T, 3>(w[KB]);
      q[2] = field3<T, 6>(w[KB]);
      q[3] = field3<T, 0>(w[KB] >> 9);
    } else {
      CUTLASS_PRAGMA_UNROLL
      for (int f = 0; f < 3; ++f) q[f] = field3<T, 3>(w[f] >> 9);
      uint32_t m = lop3_and_or(w[0] >> 15, 0x00010001u, M::OR);
      m = lop3_and_or(w[1] >> 14, 0x00020002u, m);
      m = lop3_and_or(w[2] >> 13, 0x00040004u, m);
      const T2 r = __hsub2(from_u32<T2>(m), from_u32<T2>(sub_bits<T, 3>()));
      q[3] = reinterpret_cast<const uint32_t&>(r);
    }
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < 4; ++j) out[j] = q[2 * (j % 2) + j / 2];
  }
}

// s (q - 2^(b-1)) (+ zero term) for both halves of a decoded pair: the product rounds once, as in the Marlin kernels
// and the reference; zero points follow formats/hopper.py (W = s (q - 2^(b-1)) + s (2^(b-1) - z)).
template <class T, bool ZERO>
CUTLASS_DEVICE uint32_t scaled(uint32_t q, uint32_t scale, uint32_t zero) {
  using T2 = typename Magic<T>::T2;
  T2 r;
  if constexpr (ZERO) {
    r = __hfma2(from_u32<T2>(q), from_u32<T2>(scale), from_u32<T2>(zero));
  } else {
    r = __hmul2(from_u32<T2>(q), from_u32<T2>(scale));
  }
  return reinterpret_cast<const uint32_t&>(r);
}

}  // namespace unit_detail

// T: cutlass::half_t / bfloat16_t; TileShape (W, T, 64) in CUTLASS's (M, N, K) = (features, tokens, k);
// EpilogueSmem: the bytes the epilogue keeps in shared memory (the stage count takes the rest).
template <class T, int BITS, bool ZERO, class TileShape_, class ClusterShape, class KernelSchedule, int EpilogueSmem>
struct UnitMainloop {
  using TileShape = TileShape_;
  static constexpr int kTileW = size<0>(TileShape{});
  static constexpr int kTileT = size<1>(TileShape{});
  static constexpr int kTileK = size<2>(TileShape{});
  static_assert(kTileK == 64 && kTileW % 64 == 0, "64-row stages of whole unit strips");

  static constexpr int kUnitTiles = unit_tiles<BITS>();    // k-tiles per unit
  static constexpr int kUnitChunks = unit_chunks<BITS>();  // 16-byte chunks per lane (512 bytes per warp)
  static constexpr int kUnitBytes = kUnitChunks * 512;
  static constexpr int kUnitRowsPerStage = kTileK / (16 * kUnitTiles);  // 3-bit: 1, 2-bit: 2
  static constexpr int kStrips = kTileW / 64;
  static constexpr int kRowBytes = kStrips * kUnitBytes;  // one unit row of the tile: contiguous in memory
  static constexpr int kWeightBytes = kUnitRowsPerStage * kRowBytes;
  static constexpr int kScaleRows = ZERO ? 2 : 1;  // the scale row, then the zero-term row
  static constexpr int kScaleBytes = kScaleRows * kTileW * int(sizeof(T));
  static constexpr int kActBytes = kTileT * kTileK * int(sizeof(T));
  // Per stage: the tensors and the pipeline's two barriers.
  static constexpr int kStageBytes = kWeightBytes + kScaleBytes + kActBytes + 16;

  static constexpr int Stages = (cutlass::gemm::collective::detail::sm90_smem_capacity_bytes - EpilogueSmem) / kStageBytes;
  static_assert(Stages >= 2, "the tile leaves room for fewer than two stages");

  using DispatchPolicy = MainloopSm90Units<Stages, ClusterShape, KernelSchedule>;
  using ArchTag = cutlass::arch::Sm90;
  using ElementA = uint8_t;  // unit bytes: read by bulk copy, not through a CuTe layout
  using StrideA = cute::Stride<int64_t, cute::Int<1>, int64_t>;
  using ElementB = T;
  using StrideB = cutlass::gemm::TagToStrideB_t<cutlass::layout::ColumnMajor>;  // activations [tokens, k]
  using GmemTiledCopyA = void;
  using GmemTiledCopyB = decltype(cutlass::gemm::collective::detail::sm90_cluster_shape_to_tma_atom(
      shape<0>(ClusterShape{})));

  static constexpr bool kCooperative =
      cute::is_base_of_v<cutlass::gemm::KernelTmaWarpSpecializedCooperative, KernelSchedule>;
  using AtomLayoutMNK = cute::conditional_t<kCooperative, Layout<Shape<_2, _1, _1>>, Layout<Shape<_1, _1, _1>>>;
  using TiledMma = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<T, T, float, TileShape, GMMA::Major::K, GMMA::Major::K>(), AtomLayoutMNK{}));
  using ElementAccumulator = float;

  using SmemLayoutAtomB = decltype(cutlass::gemm::collective::detail::ss_smem_selector<
                                   GMMA::Major::K, T, Int<kTileT>, Int<kTileK>>());
  using SmemLayoutB = decltype(tile_to_shape(SmemLayoutAtomB{}, make_shape(Int<kTileT>{}, Int<kTileK>{}, Int<Stages>{})));

  using MainloopPipeline = cutlass::PipelineTmaAsync<Stages>;
  using PipelineState = cutlass::PipelineState<Stages>;
  using PipelineParams = typename MainloopPipeline::Params;
  static constexpr int NumProducerThreadEvents = 1;

  struct SharedStorage {
    struct TensorStorage {
      alignas(1024) cute::ArrayEngine<T, cute::cosize_v<SmemLayoutB>> smem_B;
      alignas(128) cute::ArrayEngine<uint8_t, kWeightBytes * Stages> smem_W;
      alignas(128) cute::ArrayEngine<T, kScaleRows * kTileW * Stages> smem_S;
    } tensors;
    using PipelineStorage = typename MainloopPipeline::SharedStorage;
    PipelineStorage pipeline;
  };
  using TensorStorage = typename SharedStorage::TensorStorage;
  using PipelineStorage = typename SharedStorage::PipelineStorage;

  struct Arguments {
    const uint8_t* weight = nullptr;  // the Marlin units, [K / rows, N * rows * b / 32] int32 words
    const T* ptr_B = nullptr;         // activations
    StrideB dB{};
    const T* scales = nullptr;  // [K / G, N] plain
    const T* zeros = nullptr;   // [K / G, N] zero terms (ZERO only)
    int group_size = 0;         // rows per group (K for one group)
  };

  struct Params {
    using TMA_B = decltype(make_tma_copy_B_sm90(
        GmemTiledCopyB{},
        make_tensor(static_cast<const T*>(nullptr), repeat_like(StrideB{}, int32_t(0)), StrideB{}),
        SmemLayoutB{}(_, _, cute::Int<0>{}), TileShape{}, ClusterShape{}));
    TMA_B tma_load_b;
    const uint8_t* weight;
    const T* scales;
    const T* zeros;
    int64_t row_stride;  // bytes of one unit row of the whole weight: N / 64 units
    int n;
    int group_size;
    uint32_t tma_transaction_bytes = kWeightBytes + kScaleBytes + kActBytes;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void*) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    Tensor tensor_b = make_tensor(args.ptr_B, make_layout(make_shape(N, K, L), args.dB));
    auto tma_load_b = make_tma_copy_B_sm90(GmemTiledCopyB{}, tensor_b, SmemLayoutB{}(_, _, cute::Int<0>{}),
                                           TileShape{}, ClusterShape{});
    return {tma_load_b, args.weight, args.scales, args.zeros, int64_t(M / 64) * kUnitBytes, int(M),
            args.group_size};
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    // Whole tiles along the features (a bulk copy has no bounds), whole stages and groups along K, and TMA's
    // 16-byte alignment of the activation rows.
    return M % kTileW == 0 && K % kTileK == 0 && args.group_size % kTileK == 0 && K % args.group_size == 0 &&
           K % 8 == 0 && (ZERO == (args.zeros != nullptr));
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& p) {
    cute::prefetch_tma_descriptor(p.tma_load_b.get_tma_descriptor());
  }

  // The kernel's contract: (A tiles (BLK_M, BLK_K, m, k, l), B tiles (BLK_N, BLK_K, n, k, l)).  A is only counted
  // (the producer addresses units itself); B is the TMA view of the activations.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& p) const {
    using X = Underscore;
    auto [M, N, K, L] = problem_shape_MNKL;
    Tensor gA_mkl = local_tile(make_identity_tensor(make_shape(M, K, L)), TileShape{}, make_coord(_, _, _),
                               Step<_1, X, _1>{});
    Tensor mB_nkl = p.tma_load_b.get_tma_tensor(make_shape(N, K, L));
    Tensor gB_nkl = local_tile(mB_nkl, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});
    return cute::make_tuple(gA_mkl, gB_nkl);
  }

  // Producer: per stage the activation tile (TMA), the tile's unit rows and its scale row (bulk copies), all
  // completing on the stage's barrier.
  template <class TensorA, class TensorB, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB> const& load_inputs, BlockCoord const& blk_coord,
                           KTileIterator k_tile_iter, int k_tile_count, int, uint32_t block_rank_in_cluster,
                           TensorStorage& shared) {
    if (!cute::elect_one_sync()) return;
    Tensor sB = make_tensor(make_smem_ptr(shared.smem_B.begin()), SmemLayoutB{});
    constexpr uint32_t cluster_x = size<0>(ClusterShape{});
    const uint32_t cluster_m = block_rank_in_cluster % cluster_x, cluster_n = block_rank_in_cluster / cluster_x;
    auto block_tma_b = p.tma_load_b.get_slice(cluster_m);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    Tensor tBgB = block_tma_b.partition_S(get<1>(load_inputs)(_, _, n_coord, _, l_coord));
    Tensor tBsB = block_tma_b.partition_D(sB);
    uint16_t mcast_mask_b = 0;
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      auto block_layout = Layout<ClusterShape>{};
      for (int m = 0; m < size<0>(block_layout); ++m) {
        mcast_mask_b |= uint16_t(1) << block_layout(m, cluster_n, Int<0>{});
      }
    }
    // One thread issues every copy of the tile, and a narrow tile's stage holds only a few hundred cycles of MMAs:
    // the sources advance by constant steps (a work unit's k tiles are consecutive), so the loop has no multiply or
    // division.  Groups are whole stages (can_implement): the scale row moves every `stages_per_group` stages.  The
    // loop keeps offsets, not pointers: the producer warp runs on CUTLASS's reduced register budget, and the base
    // pointers stay kernel parameters (held pointers spilled in the zero-point builds).
    const int64_t w0 = int64_t(m_coord) * kTileW;  // first feature of the tile
    const int kt0 = *k_tile_iter;
    const int64_t w_step = kUnitRowsPerStage * p.row_stride;
    int64_t w_off = kt0 * w_step + w0 / 64 * kUnitBytes;  // bytes into the weight
    const int stages_per_group = p.group_size / kTileK;
    int stages_left = stages_per_group - kt0 % stages_per_group;  // in the current group
    int64_t s_off = int64_t(kt0 / stages_per_group) * p.n + w0;  // elements into the scales (and zero terms)
    for (int kt = kt0; k_tile_count > 0; --k_tile_count, ++kt) {
      pipeline.producer_acquire(smem_pipe_write);
      uint64_t* bar = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      copy(p.tma_load_b.with(*bar, mcast_mask_b), tBgB(_, _, _, kt), tBsB(_, _, _, stage));
      uint8_t* w_dst = shared.smem_W.begin() + stage * kWeightBytes;
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < kUnitRowsPerStage; ++r) {
        SM90_BULK_COPY_G2S::copy(p.weight + w_off + r * p.row_stride, bar, w_dst + r * kRowBytes, kRowBytes);
      }
      T* s = shared.smem_S.begin() + stage * kScaleRows * kTileW;
      SM90_BULK_COPY_G2S::copy(p.scales + s_off, bar, s, kTileW * int(sizeof(T)));
      if constexpr (ZERO) SM90_BULK_COPY_G2S::copy(p.zeros + s_off, bar, s + kTileW, kTileW * int(sizeof(T)));
      w_off += w_step;
      if (--stages_left == 0) {
        stages_left = stages_per_group;
        s_off += p.n;
      }
      ++smem_pipe_write;
    }
  }

  CUTLASS_DEVICE void load_tail(MainloopPipeline pipeline, PipelineState smem_pipe_write) {
    if (cute::elect_one_sync()) pipeline.producer_tail(smem_pipe_write);
  }

  // Consumer.  Registers per thread: the wgmma A fragments (tCrA), and the thread's words and scales of the stage.
  // Fragments live in kFragBuffers buffers, k block kb in buffer kb % kFragBuffers; a buffer is rewritten once the
  // wgmma that read it last has retired: wgmmas are committed one k block at a time and at most kFragBuffers - 1
  // stay in flight, so right after issuing k block kb the one that last read buffer (kb + 1) % kFragBuffers is done -
  // as in CUTLASS's mixed-input mainloop.  Four buffers (one per k block, 3 wgmmas in flight) everywhere except
  // two m blocks of a 128+ wide token tile: there 128 accumulators plus four buffers exceed the consumer's 232
  // registers and ptxas serializes every wgmma (C7512), so two buffers (1 in flight).  Measured on an H100
  // (docs/kernels.md): two buffers 1.13x (2-bit 256x128_c2) and 1.33-1.42x (128x128_c2_pp) faster than serialized.
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared, Params const&) {
    Tensor sB = make_tensor(make_smem_ptr(shared.smem_B.begin()), SmemLayoutB{});
    const int warp_group = __shfl_sync(0xffffffff, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto wg_mma = tiled_mma.get_slice(warp_group * cutlass::NumThreadsPerWarpGroup);
    Tensor tCrB = wg_mma.make_fragment_B(wg_mma.partition_B(sB));  // descriptors (MMA, MMA_N, MMA_K, PIPE)

    // Which 64-column strip of the tile each of the thread's m blocks covers, read off the MMA's own partition.
    auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
    Tensor tCcA = thr_mma.partition_A(make_identity_tensor(make_shape(Int<kTileW>{}, Int<kTileK>{})));
    constexpr int kMmaM = size<1>(tCcA);
    constexpr int kBlocks = size<2>(tCcA);
    static_assert(size<0>(tCcA) == 8 && kBlocks == 4, "8 values per wgmma k block, 4 k blocks per stage");
    static_assert(decltype(size<1>(accum))::value == kMmaM, "accumulator m blocks");
    constexpr int kFragBuffers = (kMmaM == 2 && kTileT >= 128) ? 2 : kBlocks;
    Tensor tCrA = make_tensor<T>(make_layout(make_shape(Int<8>{}, Int<kMmaM>{}, Int<kFragBuffers>{})));
    Tensor frag = recast<uint32_t>(tCrA);  // (4, MMA_M, buffers): register j of m block i, k block kb % buffers

    const int lane = cutlass::canonical_lane_idx();
    const int warp = cutlass::canonical_warp_idx() % 4;  // rows 16 warp .. of each m block
    const unit_detail::WarpPairs pairs = unit_detail::warp_pairs(warp);
    int strip[kMmaM];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kMmaM; ++i) strip[i] = get<0>(tCcA(0, i, 0)) / 64;

    // The thread's words of a stage, per m block: 2-bit its warp's word of each k block's k-tile (k block kb: unit row
    // kb / 2, k-tile kb % 2, lane word 2 (kb % 2) + warp / 2); 3-bit its warp's group words 4c + warp (c = 0..2) of
    // the stage's one unit.  Byte offsets from the lane's first chunk of the m block's unit in the stage.
    constexpr int kStageWords = BITS == 2 ? kBlocks : 3;
    int offset[kStageWords];
    CUTLASS_PRAGMA_UNROLL
    for (int x = 0; x < kStageWords; ++x) {
      offset[x] = BITS == 2 ? (x / kUnitTiles) * kRowBytes + unit_detail::unit_word_offset(2 * (x % kUnitTiles) + pairs.word)
                            : unit_detail::unit_word_offset(4 * x + warp);
    }
    uint32_t words[kMmaM][kStageWords];
    uint32_t scale[kMmaM][2], zero[kMmaM][2];

    // The thread's words, scales (and zero terms) of stage `stage`.
    auto fetch = [&](int stage) {
      const T* sbase = shared.smem_S.begin() + stage * kScaleRows * kTileW;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kMmaM; ++i) {
        const uint8_t* lane_unit = shared.smem_W.begin() + stage * kWeightBytes + strip[i] * kUnitBytes + lane * 16;
        CUTLASS_PRAGMA_UNROLL
        for (int x = 0; x < kStageWords; ++x) words[i][x] = *reinterpret_cast<const uint32_t*>(lane_unit + offset[x]);
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {
          const int col = 64 * strip[i] + 16 * warp + lane / 4 + 8 * h;
          const uint32_t sc = reinterpret_cast<const uint16_t&>(sbase[col]);
          scale[i][h] = sc | (sc << 16);
          if constexpr (ZERO) {
            const uint32_t z = reinterpret_cast<const uint16_t&>(sbase[kTileW + col]);
            zero[i][h] = z | (z << 16);
          } else {
            zero[i][h] = 0;
          }
        }
      }
    };

    // Fragments of k block kb from the fetched words.
    auto convert = [&](auto kb_c) {
      constexpr int kb = decltype(kb_c)::value;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < kMmaM; ++i) {
        uint32_t q[4];
        unit_detail::decode_pairs<T, BITS, kb>(words[i], pairs, q);
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < 4; ++j)
          frag(j, i, kb % kFragBuffers) = unit_detail::scaled<T, ZERO>(q[j], scale[i][j % 2], zero[i][j % 2]);
      }
    };

    PipelineState smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);

    // One k tile (stage): its 4 k blocks, converting each next one under the wgmmas in flight.  As in CUTLASS's
    // mixed-input mainloop the first and last tiles are peeled (RELEASE: a previous stage to give back; NEXT: a next
    // stage to load), so the steady-state loop has no branch between its wgmmas.
    auto mma_tile = [&](auto release_c, auto next_c) {
      constexpr bool kRelease = decltype(release_c)::value, kNext = decltype(next_c)::value;
      const int read_stage = smem_pipe_read.index();
      ++smem_pipe_read;
      cutlass::ConsumerToken token{cutlass::BarrierStatus::WaitAgain};
      warpgroup_fence_operand(accum);
      cute::for_each(make_int_sequence<kBlocks>{}, [&](auto kb_c) {
        constexpr int kb = decltype(kb_c)::value;
        warpgroup_arrive();
        cute::gemm(tiled_mma, tCrA(_, _, kb % kFragBuffers), tCrB(_, _, kb, read_stage), accum);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        warpgroup_commit_batch();
        if constexpr (kNext && kb == 0) token = pipeline.consumer_try_wait(smem_pipe_read);
        if constexpr (kNext && kb + 1 == kBlocks) {
          // The next stage's words and scales load while the wait runs (this stage's are all converted).
          pipeline.consumer_wait(smem_pipe_read, token);
          fetch(smem_pipe_read.index());
        }
        warpgroup_wait<kFragBuffers - 1>();
        if constexpr (kb + 1 < kBlocks) {
          convert(Int<kb + 1>{});
        } else {
          // The previous stage's wgmmas have all retired: its buffers go back to the producer.  (Released one k
          // block earlier, where they have retired too, the release makes ptxas serialize the wgmmas, C7513.)
          if constexpr (kRelease) {
            pipeline.consumer_release(smem_pipe_release);
            ++smem_pipe_release;
          }
          if constexpr (kNext) convert(Int<0>{});
        }
      });
      warpgroup_fence_operand(accum);
    };

    pipeline.consumer_wait(smem_pipe_read);
    fetch(smem_pipe_read.index());
    convert(Int<0>{});
    if (k_tile_count == 1) {
      mma_tile(cute::false_type{}, cute::false_type{});
      return;
    }
    mma_tile(cute::false_type{}, cute::true_type{});
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 2; --k_tile_count) mma_tile(cute::true_type{}, cute::true_type{});
    mma_tile(cute::true_type{}, cute::false_type{});
  }

  // After mma: all wgmmas retired, the last stage released (mma released every earlier one).
  CUTLASS_DEVICE void mma_tail(MainloopPipeline pipeline, PipelineState smem_pipe_release, int k_tile_count) {
    smem_pipe_release.advance(k_tile_count - 1);
    warpgroup_wait<0>();
    pipeline.consumer_release(smem_pipe_release);
  }

};

}  // namespace gptq_vllm::hopper
