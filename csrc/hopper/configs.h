// Tile configurations of the Hopper mixed-input GEMM, and its host interface (no CUTLASS, no torch here:
// the dispatcher includes this, the instantiation units hopper_tile_*.cu compile the kernels).
//
// Tiles are written in our terms: W = output features (CUTLASS's M, a multiple of the 64-row Marlin atom),
// T = tokens (CUTLASS's N).  All run CUTLASS's TMA warp-specialized mixed-input mainloop (a producer warp
// loading weights, scales and activations by TMA into a multi-stage pipeline, consumer warpgroups dequantizing
// in registers into wgmma), with one of two schedules S:
//   coop - both consumer warpgroups share each tile (W/2 rows each), with the stream-K tile scheduler, whose
//          decomposition (data-parallel, split-K, stream-K) is chosen per call;
//   pp   - ping-pong: each warpgroup takes its own tile, their mainloops alternate so one warpgroup's
//          epilogue hides under the other's mainloop; the persistent data-parallel scheduler (CUTLASS's
//          ping-pong kernel has no stream-K), so only decompositions 0 and 1 with one split.
// The cluster multicasts the activation tile to C CTAs along W.
#pragma once

#include <cstddef>
#include <cuda_runtime.h>

// X(id, W, T, C, S): a new entry needs one line here and is compiled by its own unit hopper_tile_<name>.cu.
// Names (hopper_configs(), the selection table, the unit): "<W>x<T>_c<C>", plus "_pp" for ping-pong.  The k tile is 64
// (128 bytes of activations): CUTLASS's mixed-input mainloop needs at least four 16-deep wgmma k blocks per tile
// and takes one group's scales per tile, so a group must be a multiple of 64 (group 32 stays on Marlin).
#define GPTQ_HOPPER_CONFIGS(X) \
  X(0, 128, 16, 1, coop)       \
  X(1, 256, 16, 1, coop)       \
  X(2, 128, 32, 2, coop)       \
  X(3, 256, 32, 1, coop)       \
  X(4, 128, 64, 2, coop)       \
  X(5, 256, 64, 2, coop)       \
  X(6, 128, 128, 2, coop)      \
  X(7, 256, 128, 2, coop)      \
  X(8, 128, 256, 2, coop)      \
  X(9, 64, 64, 2, pp)          \
  X(10, 64, 128, 2, pp)        \
  X(11, 128, 128, 2, pp)       \
  X(12, 256, 32, 2, coop)      \
  X(13, 128, 32, 1, coop)      \
  X(14, 64, 256, 2, pp)        \
  X(15, 128, 256, 1, coop)     \
  X(16, 128, 64, 1, coop)

namespace gptq_vllm::hopper {

// The schedules S of the table above.
struct coop {};
struct pp {};

// How the scheduler splits the work: Heuristic lets CUTLASS decide; SplitK uses `splits`.  Ping-pong configs
// take Heuristic or DataParallel (both data-parallel) with one split.
enum class Decomposition : int { Heuristic = 0, DataParallel = 1, SplitK = 2, StreamK = 3 };

struct GemmArgs {
  const void* a;       // activations [m, k], row-major (k contiguous), dtype T
  const void* b;       // Marlin words of the weight [k/16, n*bits/2] (int32)
  const void* scales;  // [k/group, n] plain (n contiguous), dtype T
  const void* zeros;   // [k/group, n]: scale * (2^(bits-1) - z), dtype T; nullptr when symmetric
  void* d;             // output [m, n], row-major, dtype T
  int m, n, k, group_size;  // group_size == k for one group
  int sm_count;
  Decomposition decomposition;
  int splits;
  cudaStream_t stream;
};

// T: cutlass::half_t or cutlass::bfloat16_t; defined in mixed_gemm.cuh, instantiated in inst/.
template <typename T, int BITS, bool ZERO, int CFG>
struct Gemm {
  static size_t workspace_size(const GemmArgs& args);
  // Empty string on success, else why CUTLASS refused or failed (nothing was launched on refusal).
  static const char* run(const GemmArgs& args, void* workspace);
};

}  // namespace gptq_vllm::hopper
