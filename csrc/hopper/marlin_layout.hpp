// The Marlin weight layout as a CuTe layout: the A operand of CUTLASS's SM90 mixed-input GEMM.
//
// The GEMM is computed swapped, D^T = W^T a^T: CUTLASS's M is our N (output features), its N our M (tokens),
// so the quantized weight is the register-sourced A operand of wgmma and the activations the shared-memory B
// operand.  The weight stays in the Marlin layout the M <= 16 kernels read (formats.md §4.1) - one copy per
// layer - described here as a CuTe layout that CUTLASS's TMA and shared-memory partitioning follow.
//
// A Marlin tile is 16 (k) x 64 (n) codes, contiguous, tiles ordered k-tile-major with the n-tiles of one
// k-tile side by side: tile (kt, nt) starts at code (kt * N/64 + nt) * 1024.  That is exactly
// tile_to_shape(atom, (N, K, L)) with the default column-major tile order, for the atom below.
//
// Inside the tile (gptq_vllm/formats/marlin.py, TILE_MAP): lane t of warp-block w holds one 32-bit word,
// word 4t + w, with the 8 codes at n = 16w + t/4 + 8*m_hi, k = 2(t%4) + k_odd + 8*k_hi.  Those are exactly
// the 8 values lane t of warp w holds in wgmma's register A fragment (ALayout_64x16: m = t/4 + 8 v1 + 16 w,
// k = 2(t%4) + v0 + 8 v2), so a thread's fragment is one aligned 32-bit word (8-bit codes: two words, word
// 8t + 2w + m_hi).  With n = n_lo + 8 n_hi + 16 w (n_lo = t/4) and k = k_odd + 2 t_lo + 8 k_hi (t_lo = t%4):
//   4-bit: code offset 8 * (4t + w) + (k_hi + 2 n_hi + 4 k_odd)
//        = 128 n_lo + 2 n_hi + 8 w  +  4 k_odd + 32 t_lo + k_hi
//   8-bit: code offset 4 * (8t + 2w + n_hi) + (k_hi + 2 k_odd)
//        = 128 n_lo + 4 n_hi + 8 w  +  2 k_odd + 32 t_lo + k_hi
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/numeric_types.h"

namespace gptq_vllm::hopper {

using namespace cute;

template <int BITS>
struct MarlinAtom;

template <>
struct MarlinAtom<4> {
  using type = Layout<Shape<Shape<_8, _2, _4>, Shape<_2, _4, _2>>, Stride<Stride<_128, _2, _8>, Stride<_4, _32, _1>>>;
};

template <>
struct MarlinAtom<8> {
  using type = Layout<Shape<Shape<_8, _2, _4>, Shape<_2, _4, _2>>, Stride<Stride<_128, _4, _8>, Stride<_2, _32, _1>>>;
};

// Stored code type: unsigned GPTQ codes q (the conversion below yields q - 2^(b-1)).
template <int BITS>
using Code = std::conditional_t<BITS == 4, cutlass::uint4b_t, uint8_t>;

// (N, K, L) -> code offset of the whole weight for a 64 x 16 atom, the type CUTLASS takes in place of a stride
// for A.
template <class Atom>
using WeightLayout = decltype(tile_to_shape(Atom{}, Layout<Shape<int, int, int>, Stride<int64_t, _1, int64_t>>{}));

template <class Atom>
WeightLayout<Atom> weight_layout(int n, int k) {
  return tile_to_shape(Atom{}, make_shape(n, k, 1));
}

}  // namespace gptq_vllm::hopper

