// Host side of the Hopper mixed-input GEMM (torch op mygptq_cuda::hopper_gemm): checks, the output and
// workspace allocation, and the dispatch to the instantiated kernels (mixed_gemm.cuh, hopper_tile_*.cu).
// The weight is read in place in the Marlin layout (4/8-bit tiles, 2/3-bit units); the scales (and zero points)
// come plain, [groups, N].
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>

#include "../kernels.h"
#include "../units.h"
#include "configs.h"
#include "marlin_layout.hpp"

namespace gptq_vllm {
namespace {

using hopper::GemmArgs;

template <typename T, int BITS, bool ZERO>
const char* dispatch(const GemmArgs& g, int config, const at::Tensor& like) {
  size_t bytes = 0;
  switch (config) {
#define GPTQ_HOPPER_WS(ID, W, TT, C, S) \
  case ID: bytes = hopper::Gemm<T, BITS, ZERO, ID>::workspace_size(g); break;
    GPTQ_HOPPER_CONFIGS(GPTQ_HOPPER_WS)
#undef GPTQ_HOPPER_WS
    default: return "unknown config";
  }
  // Stream-K / split-K partials and their flags: a fresh torch allocation each call (graph-safe).
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  void* w = bytes ? ws.data_ptr() : nullptr;
  switch (config) {
#define GPTQ_HOPPER_RUN(ID, W, TT, C, S) \
  case ID: return hopper::Gemm<T, BITS, ZERO, ID>::run(g, w);
    GPTQ_HOPPER_CONFIGS(GPTQ_HOPPER_RUN)
#undef GPTQ_HOPPER_RUN
    default: return "unknown config";
  }
}

template <typename T, int BITS>
const char* dispatch_zero(const GemmArgs& g, int config, const at::Tensor& like) {
  return g.zeros != nullptr ? dispatch<T, BITS, true>(g, config, like) : dispatch<T, BITS, false>(g, config, like);
}

template <typename T>
const char* dispatch_bits(const GemmArgs& g, int bits, int config, const at::Tensor& like) {
  switch (bits) {
    case 2: return dispatch_zero<T, 2>(g, config, like);
    case 3: return dispatch_zero<T, 3>(g, config, like);
    case 4: return dispatch_zero<T, 4>(g, config, like);
    default: return dispatch_zero<T, 8>(g, config, like);
  }
}

// Which configs are ping-pong (data-parallel only), by config id.
#define GPTQ_HOPPER_PP(ID, W, T, C, S) std::is_same_v<hopper::S, hopper::pp>,
constexpr bool kPingpong[] = {GPTQ_HOPPER_CONFIGS(GPTQ_HOPPER_PP)};
#undef GPTQ_HOPPER_PP
constexpr int kConfigs = sizeof(kPingpong) / sizeof(kPingpong[0]);
// Weight rows (features) per tile, by config id.
#define GPTQ_HOPPER_W(ID, W, T, C, S) W,
constexpr int kTileFeatures[] = {GPTQ_HOPPER_CONFIGS(GPTQ_HOPPER_W)};
#undef GPTQ_HOPPER_W

}  // namespace

at::Tensor hopper_tile_offsets(int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "hopper_tile_offsets: bits must be 4 or 8");
  at::Tensor out = at::empty({64, 16}, at::kLong);
  auto o = out.accessor<int64_t, 2>();
  auto fill = [&](auto atom) {
    for (int n = 0; n < 64; ++n)
      for (int k = 0; k < 16; ++k) o[n][k] = atom(n, k);
  };
  if (bits == 4) fill(typename hopper::MarlinAtom<4>::type{});
  else fill(typename hopper::MarlinAtom<8>::type{});
  return out;
}

std::vector<std::string> hopper_configs() {
  std::vector<std::string> names;
#define GPTQ_HOPPER_NAME(ID, W, T, C, S) names.push_back(std::string(#W "x" #T "_c" #C) + (kPingpong[ID] ? "_pp" : ""));
  GPTQ_HOPPER_CONFIGS(GPTQ_HOPPER_NAME)
#undef GPTQ_HOPPER_NAME
  return names;
}

at::Tensor hopper_gemm(const at::Tensor& a_in, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size, int64_t config,
                       int64_t decomposition, int64_t splits, const std::optional<at::Tensor>& perm) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "hopper_gemm: bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(a_in.is_cuda() && a_in.dim() == 2 && a_in.is_contiguous(),
              "hopper_gemm: a must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(a_in.scalar_type() == at::kHalf || a_in.scalar_type() == at::kBFloat16,
              "hopper_gemm: a must be float16 or bfloat16");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "hopper_gemm: qweight must be contiguous int32 Marlin words [K/rows, N*rows*b/32]");
  const int64_t rows = unit_rows(static_cast<int>(bits));
  const int64_t M = a_in.size(0), K = qweight.size(0) * rows;
  const int64_t N = qweight.size(1) * 32 / (rows * bits);
  const at::cuda::OptionalCUDAGuard guard(a_in.device());
  const bool has_perm = perm.has_value() && perm->defined() && perm->numel() > 0;
  TORCH_CHECK(has_perm ? a_in.size(1) <= K : a_in.size(1) == K, "hopper_gemm: a has ", a_in.size(1),
              " columns, qweight holds K = ", K, has_perm ? " (with perm: at most K)" : "");
  const at::Tensor a = !has_perm ? a_in
                     : gather_columns(a_in, reinterpret_cast<uintptr_t>(perm->data_ptr()) % 16 ? perm->clone() : *perm, K);
  TORCH_CHECK(K % 64 == 0 && N % 64 == 0, "hopper_gemm: K and N must be multiples of 64, got K = ", K, ", N = ", N);
  TORCH_CHECK(config >= 0 && config < kConfigs, "hopper_gemm: no config ", config);
  // The unit mainloop copies whole tiles of units (unit_mainloop.hpp).
  TORCH_CHECK(bits >= 4 || N % kTileFeatures[config] == 0, "hopper_gemm: ", bits, "-bit units need N to be a multiple of ",
              "config ", hopper_configs()[config], "'s ", kTileFeatures[config], " features, got N = ", N);
  const int64_t G = group_size <= 0 || group_size >= K ? K : group_size;
  TORCH_CHECK(G == K || G % 64 == 0, "hopper_gemm: group size must be a multiple of 64 (the k tile) or -1, got ",
              group_size);
  TORCH_CHECK(scales.scalar_type() == a.scalar_type() && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == K / G && scales.size(1) == N,
              "hopper_gemm: scales must be contiguous [", K / G, ", ", N, "] in a's dtype");
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == a.scalar_type() && zeros->is_contiguous() && zeros->sizes() == scales.sizes(),
                "hopper_gemm: zeros must be contiguous, shaped and typed like scales");
  }
  TORCH_CHECK(decomposition >= 0 && decomposition <= 3, "hopper_gemm: decomposition must be 0..3");
  TORCH_CHECK(splits >= 1, "hopper_gemm: splits must be >= 1");
  TORCH_CHECK(!kPingpong[config] || (decomposition <= 1 && splits == 1),
              "hopper_gemm: ping-pong config ", hopper_configs()[config],
              " runs data-parallel only (decomposition 0 or 1, one split)");
  TORCH_CHECK(sm90a_code_runs(), "hopper_gemm: needs a compute-capability 9.0 GPU and a build with sm_90a code");

  at::Tensor out = at::empty({M, N}, a.options());
  if (M == 0) return out;
  GemmArgs g{a.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.has_value() ? zeros->data_ptr() : nullptr,
             out.data_ptr(), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(G),
             sm_count(), static_cast<hopper::Decomposition>(decomposition), static_cast<int>(splits),
             at::cuda::getCurrentCUDAStream()};
  const char* err = a.scalar_type() == at::kHalf
                        ? dispatch_bits<cutlass::half_t>(g, static_cast<int>(bits), static_cast<int>(config), a)
                        : dispatch_bits<cutlass::bfloat16_t>(g, static_cast<int>(bits), static_cast<int>(config), a);
  TORCH_CHECK(err[0] == '\0', "hopper_gemm (config ", hopper_configs()[config], ", M = ", M, ", K = ", K, ", N = ", N,
              "): ", err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace gptq_vllm
