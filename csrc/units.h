// The Marlin layout's units per code width, for every kernel that reads them (csrc/marlin, csrc/hopper);
// gptq_vllm/formats/marlin.py (UNIT_TILES, UNIT_CHUNKS, unit_rows) is the definition they follow.
#pragma once

namespace gptq_vllm {

// A unit is unit_tiles() 16-row k-tiles of one 64-column strip; a lane holds unit_chunks() 16-byte chunks of it, and
// BITS 32-bit words per k-tile: 4-bit one chunk per tile, 8-bit two, 2-bit one chunk for two tiles, 3-bit three
// chunks for four tiles (the 8 or 12 bytes of a 2/3-bit k-tile are grouped so that every copy is 16 bytes).
template <int BITS>
__host__ __device__ constexpr int unit_tiles() { return BITS == 2 ? 2 : (BITS == 3 ? 4 : 1); }
template <int BITS>
__host__ __device__ constexpr int unit_chunks() { return BITS == 3 ? 3 : (BITS == 8 ? 2 : 1); }
// Rows of K in one row of the qweight tensor: 16 per k-tile of a unit.
__host__ __device__ constexpr int unit_rows(int bits) {
  return 16 * (bits == 2 ? unit_tiles<2>() : (bits == 3 ? unit_tiles<3>() : 1));
}

}  // namespace gptq_vllm
