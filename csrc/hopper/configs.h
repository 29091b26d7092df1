// Tile configurations of the Hopper mixed-input GEMM, and its host interface (no CUTLASS, no torch here:
// the dispatcher includes this, the instantiation units in inst/ compile the kernels).
//
// Tiles are written in our terms: W = output features (CUTLASS's M, a multiple of the 64-row Marlin atom),
// T = tokens (CUTLASS's N).  All run CUTLASS's TMA warp-specialized cooperative mainloop (a producer warp
// loading weights, scales and activations by TMA into a multi-stage pipeline, two consumer warpgroups
// dequantizing in registers into wgmma) with the stream-K tile scheduler, whose decomposition (data-parallel,
// split-K, stream-K) is chosen per call.  The cluster multicasts the activation tile to C CTAs along W.
#pragma once

#include <cstddef>
#include <cuda_runtime.h>

// X(id, W, T, C): a new entry needs one line here and is compiled by the unit inst/tile_<W>x<T>.cu.
#define GPTQ_HOPPER_CONFIGS(X) \
  X(0, 128, 16, 1)             \
  X(1, 256, 16, 1)             \
  X(2, 128, 32, 2)             \
  X(3, 256, 32, 1)             \
  X(4, 128, 64, 2)             \
  X(5, 256, 64, 2)             \
  X(6, 128, 128, 2)            \
  X(7, 256, 128, 2)            \
  X(8, 128, 256, 2)

namespace gptq_vllm::hopper {

// How the scheduler splits the work: Heuristic lets CUTLASS decide; SplitK uses `splits`.
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
