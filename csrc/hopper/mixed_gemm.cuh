// The Hopper mixed-input GEMM kernels: CUTLASS's SM90 collectives assembled for GPTQ weights in the Marlin
// layout and fp16/bf16 activations.  For 4/8-bit tiles (marlin_layout.hpp) the mainloop is CUTLASS's TMA
// warp-specialized mixed-input collective; 2/3-bit units, which it cannot read, take ours (unit_mainloop.hpp),
// written to the same contract.  Either runs in CUTLASS's cooperative or ping-pong kernel with its TMA epilogue and
// its stream-K (cooperative) or persistent (ping-pong) tile scheduler; this file picks the parts and binds the
// arguments.
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
#include "unit_mainloop.hpp"

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

// The mainloop of a width: CUTLASS's mixed-input collective on the Marlin tiles (4/8 bit; Atom: the 64 (n) x 16 (k)
// weight atom, the Marlin one unless a tuning experiment passes another), ours on the units (2/3 bit).
template <typename T, int BITS, bool ZERO, int CFG, class Atom, int EPILOGUE_SMEM, bool UNITS = (BITS < 4)>
struct MainloopOf {
  using Q = Code<BITS>;
  using ElementA = std::conditional_t<ZERO, cute::tuple<Q, T, T>, cute::tuple<Q, T>>;
  using type = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementA, WeightLayout<std::conditional_t<std::is_void_v<Atom>, typename MarlinAtom<BITS>::type, Atom>>,
      128 / cutlass::sizeof_bits<Q>::value,
      T, cutlass::layout::ColumnMajor, 128 / cutlass::sizeof_bits<T>::value,
      float, typename Config<CFG>::Tile, typename Config<CFG>::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<EPILOGUE_SMEM>,
      typename Config<CFG>::Sched::Kernel>::CollectiveOp;
};
template <typename T, int BITS, bool ZERO, int CFG, class Atom, int EPILOGUE_SMEM>
struct MainloopOf<T, BITS, ZERO, CFG, Atom, EPILOGUE_SMEM, true> {
  using type = UnitMainloop<T, BITS, ZERO, typename Config<CFG>::Tile, typename Config<CFG>::Cluster,
                            typename Config<CFG>::Sched::Kernel, EPILOGUE_SMEM>;
};

template <typename T, int BITS, bool ZERO, int CFG, class Atom = void>
struct Kernel {
  using Tile = typename Config<CFG>::Tile;
  using Cluster = typename Config<CFG>::Cluster;
  using Sched = typename Config<CFG>::Sched;
  static constexpr bool kUnits = BITS < 4;
  // Activations: CUTLASS's B operand, K-major ([tokens, k] row-major).  Output: D^T, column-major
  // in CUTLASS's (features, tokens) terms = [tokens, features] row-major.
  using LayoutD = cutlass::layout::ColumnMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlign,  // no C operand
      T, LayoutD, kAlign, typename Sched::Epilogue>::CollectiveOp;

  using Mainloop =
      typename MainloopOf<T, BITS, ZERO, CFG, Atom, static_cast<int>(sizeof(typename Epilogue::SharedStorage))>::type;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                          typename Sched::TileScheduler>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static typename Adapter::Arguments arguments(const GemmArgs& g) {
    using StrideB = typename GemmKernel::StrideB;
    using StrideD = typename GemmKernel::StrideD;
    const StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, make_shape(g.m, g.k, 1));
    const StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, make_shape(g.n, g.m, 1));
    typename Adapter::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {g.n, g.m, g.k, 1};
    if constexpr (kUnits) {
      args.mainloop = {static_cast<const uint8_t*>(g.b), static_cast<const T*>(g.a), sb, static_cast<const T*>(g.scales),
                       static_cast<const T*>(g.zeros), g.group_size};
    } else {
      using QP = typename Mainloop::ElementA const*;
      using StrideS = typename Mainloop::StrideScale;
      const StrideS ss = cutlass::make_cute_packed_stride(StrideS{}, make_shape(g.n, g.k / g.group_size, 1));
      const auto wl = weight_layout<std::conditional_t<std::is_void_v<Atom>, typename MarlinAtom<BITS>::type, Atom>>(g.n, g.k);
      if constexpr (ZERO) {
        args.mainloop = {static_cast<QP>(g.b), wl, static_cast<const T*>(g.a), sb, static_cast<const T*>(g.scales), ss,
                         g.group_size, static_cast<const T*>(g.zeros)};
      } else {
        args.mainloop = {static_cast<QP>(g.b), wl, static_cast<const T*>(g.a), sb, static_cast<const T*>(g.scales), ss,
                         g.group_size};
      }
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

// Instantiates config CFG at width B for both activation types, with and without zero points; per unit: the 4/8-bit
// Marlin tiles (hopper_tile_<name>.cu), the 2/3-bit units (hopper_units_<name>.cu).
#define GPTQ_HOPPER_INSTANTIATE_TYPES(B, CFG)                               \
  template struct gptq_vllm::hopper::Gemm<cutlass::half_t, B, false, CFG>;      \
  template struct gptq_vllm::hopper::Gemm<cutlass::half_t, B, true, CFG>;       \
  template struct gptq_vllm::hopper::Gemm<cutlass::bfloat16_t, B, false, CFG>;  \
  template struct gptq_vllm::hopper::Gemm<cutlass::bfloat16_t, B, true, CFG>;
#define GPTQ_HOPPER_INSTANTIATE(CFG) GPTQ_HOPPER_INSTANTIATE_TYPES(4, CFG) GPTQ_HOPPER_INSTANTIATE_TYPES(8, CFG)
#define GPTQ_HOPPER_INSTANTIATE_UNITS(CFG) GPTQ_HOPPER_INSTANTIATE_TYPES(2, CFG) GPTQ_HOPPER_INSTANTIATE_TYPES(3, CFG)
