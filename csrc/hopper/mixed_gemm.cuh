// The Hopper mixed-input GEMM kernels: CUTLASS's SM90 collectives assembled for GPTQ weights in the Marlin
// layout (marlin_layout.hpp) and fp16/bf16 activations.  Nothing here is a hand-written mainloop: the
// mainloop is CUTLASS's TMA warp-specialized mixed-input collective (cooperative or ping-pong kernel), the
// epilogue its TMA epilogue, the tile scheduler its stream-K (cooperative) or persistent (ping-pong) one;
// this file picks the parts and binds the arguments.
#pragma once

#include "configs.h"
#include "marlin_layout.hpp"

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "gptq_convert.hpp"

namespace gptq_vllm::hopper {

using namespace cute;

// CUTLASS's parts for each schedule of configs.h.
template <class S>
struct Schedule;
template <>
struct Schedule<coop> {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileScheduler = cutlass::gemm::StreamKScheduler;
};
template <>
struct Schedule<pp> {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
  using TileScheduler = cutlass::gemm::PersistentScheduler;
};

template <int CFG>
struct Config;
#define GPTQ_HOPPER_CONFIG_TYPE(ID, W, T, C, S)                         \
  template <>                                                           \
  struct Config<ID> {                                                   \
    using Tile = Shape<Int<W>, Int<T>, _64>; /* k: 128 bytes of T */    \
    using Cluster = Shape<Int<C>, _1, _1>;                              \
    using Sched = Schedule<S>;                                          \
  };
GPTQ_HOPPER_CONFIGS(GPTQ_HOPPER_CONFIG_TYPE)
#undef GPTQ_HOPPER_CONFIG_TYPE

// Atom: the 64 (n) x 16 (k) weight atom, the Marlin one unless a tuning experiment passes another.
template <typename T, int BITS, bool ZERO, int CFG, class Atom = typename MarlinAtom<BITS>::type>
struct Kernel {
  using Tile = typename Config<CFG>::Tile;
  using Cluster = typename Config<CFG>::Cluster;
  using Sched = typename Config<CFG>::Sched;
  using Q = Code<BITS>;
  using LayoutA = WeightLayout<Atom>;
  // Activations: CUTLASS's B operand, K-major ([tokens, k] row-major).  Output: D^T, column-major
  // in CUTLASS's (features, tokens) terms = [tokens, features] row-major.
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::ColumnMajor;
  static constexpr int kAlignA = 128 / cutlass::sizeof_bits<Q>::value;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlign,  // no C operand
      T, LayoutD, kAlign, typename Sched::Epilogue>::CollectiveOp;

  using ElementA = std::conditional_t<ZERO, cute::tuple<Q, T, T>, cute::tuple<Q, T>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, LayoutA, kAlignA,
      T, LayoutB, kAlign,
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Sched::Kernel>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                          typename Sched::TileScheduler>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static typename Adapter::Arguments arguments(const GemmArgs& g) {
    using StrideB = typename GemmKernel::StrideB;
    using StrideD = typename GemmKernel::StrideD;
    using StrideS = typename Mainloop::StrideScale;
    const int groups = g.k / g.group_size;
    const StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(g.m, g.k, 1));
    const StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(g.n, g.m, 1));
    const StrideS ss = cutlass::make_cute_packed_stride(StrideS{}, make_shape(g.n, groups, 1));
    using QP = typename Mainloop::ElementA const*;
    typename Adapter::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {g.n, g.m, g.k, 1};
    if constexpr (ZERO) {
      args.mainloop = {static_cast<QP>(g.b), weight_layout<Atom>(g.n, g.k), static_cast<const T*>(g.a), sb,
                       static_cast<const T*>(g.scales), ss, g.group_size, static_cast<const T*>(g.zeros)};
    } else {
      args.mainloop = {static_cast<QP>(g.b), weight_layout<Atom>(g.n, g.k), static_cast<const T*>(g.a), sb,
                       static_cast<const T*>(g.scales), ss, g.group_size};
    }
    args.epilogue = {{1.f, 0.f}, nullptr, sd, static_cast<T*>(g.d), sd};
    args.hw_info.device_id = 0;
    args.hw_info.sm_count = g.sm_count;
    if constexpr (std::is_same_v<typename Sched::TileScheduler, cutlass::gemm::StreamKScheduler>) {
      auto& s = args.scheduler;
      s.splits = g.splits;
      s.decomposition_mode = static_cast<decltype(s.decomposition_mode)>(static_cast<int>(g.decomposition));
    }
    return args;
  }
};

// Workspace bytes and launch of one assembled kernel K (a Kernel<...>).
template <class K>
size_t kernel_workspace_size(const GemmArgs& g) {
  return K::Adapter::get_workspace_size(K::arguments(g));
}

template <class K>
const char* run_kernel(const GemmArgs& g, void* workspace) {
  typename K::Adapter gemm;
  const auto args = K::arguments(g);
  if (K::Adapter::can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot implement this problem";
  if (gemm.initialize(args, workspace, g.stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
  if (gemm.run(g.stream) != cutlass::Status::kSuccess) return "CUTLASS launch failed";
  return "";
}

template <typename T, int BITS, bool ZERO, int CFG>
size_t Gemm<T, BITS, ZERO, CFG>::workspace_size(const GemmArgs& g) {
  return kernel_workspace_size<Kernel<T, BITS, ZERO, CFG>>(g);
}

template <typename T, int BITS, bool ZERO, int CFG>
const char* Gemm<T, BITS, ZERO, CFG>::run(const GemmArgs& g, void* workspace) {
  return run_kernel<Kernel<T, BITS, ZERO, CFG>>(g, workspace);
}

}  // namespace gptq_vllm::hopper

// Instantiates config CFG for both activation types, both widths, with and without zero points.
#define GPTQ_HOPPER_INSTANTIATE(CFG)                                        \
  template struct gptq_vllm::hopper::Gemm<cutlass::half_t, 4, false, CFG>;      \
  template struct gptq_vllm::hopper::Gemm<cutlass::half_t, 4, true, CFG>;       \
  template struct gptq_vllm::hopper::Gemm<cutlass::half_t, 8, false, CFG>;      \
  template struct gptq_vllm::hopper::Gemm<cutlass::half_t, 8, true, CFG>;       \
  template struct gptq_vllm::hopper::Gemm<cutlass::bfloat16_t, 4, false, CFG>;  \
  template struct gptq_vllm::hopper::Gemm<cutlass::bfloat16_t, 4, true, CFG>;   \
  template struct gptq_vllm::hopper::Gemm<cutlass::bfloat16_t, 8, false, CFG>;  \
  template struct gptq_vllm::hopper::Gemm<cutlass::bfloat16_t, 8, true, CFG>;
