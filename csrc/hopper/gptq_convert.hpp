// GPTQ code conversion for CUTLASS's SM90 mixed-input collective (included after its headers).
#pragma once

#include "cutlass/gemm/collective/collective_builder.hpp"  // brings the mixed-input utilities in their context

#include "../common.cuh"  // lop3_and_or

// Conversion of stored codes to the MMA type, a customization point of CUTLASS's mixed-input collective
// (LayoutAwareConvertImpl is chosen by source/destination type and the register layout of the values, which
// mirrors their order in shared memory).  GPTQ semantics: code q -> q - 2^(b-1), exact; the collective then
// multiplies by the group scale (one rounding, as the Marlin kernels and the reference) or, for zero points,
// computes scale * (q - 2^(b-1)) + zero with zero = scale * (2^(b-1) - z).  Each value pair's positions are read
// from the register layout at compile time.
namespace cutlass {

namespace gptq_hopper_detail {

template <class T>
struct Magic;
// 4-bit: (x & 0x000f000f) | OR = T2(BIAS + a, BIAS + b) for nibbles a, b at bits 0 and 16 (exact).
template <>
struct Magic<cutlass::half_t> {
  static constexpr uint32_t OR = 0x64006400u;     // half2(1024, 1024)
  static constexpr uint32_t SUB4 = 0x64086408u;   // half2(1032, 1032): 1024 + 8
};
template <>
struct Magic<cutlass::bfloat16_t> {
  static constexpr uint32_t OR = 0x43004300u;     // bf162(128, 128)
  static constexpr uint32_t SUB4 = 0x43084308u;   // bf162(136, 136): 128 + 8
};

template <class T>
CUTLASS_DEVICE uint32_t sub2(uint32_t x, uint32_t y) {
  if constexpr (cute::is_same_v<T, cutlass::half_t>) {
    __half2 r = __hsub2(reinterpret_cast<const __half2&>(x), reinterpret_cast<const __half2&>(y));
    return reinterpret_cast<uint32_t&>(r);
  } else {
    __nv_bfloat162 r = __hsub2(reinterpret_cast<const __nv_bfloat162&>(x), reinterpret_cast<const __nv_bfloat162&>(y));
    return reinterpret_cast<uint32_t&>(r);
  }
}

// The pair of values 2J, 2J + 1 of a 4-bit source register q, as T2(v - 8, v' - 8).  The source position of each
// value is read from the (static) register layout at compile time; in the Marlin atom a register's pairs sit at
// nibbles (p, p + 4), p = 0..3, i.e. 16 bits apart, so one lop3 (mask and magic exponent at once) makes a pair.
// fp16 takes the Marlin kernels' trick: nibble p = 1 stays in place as 1024 + 16 v and one HFMA2 by 1/16 and
// -(64 + 8) finishes it, and p = 2, 3 do the same on q >> 8 (shared by both): 9 instructions per register, where
// a shift, mask, or and subtraction per pair took 15 (SASS of the 256x32 kernel).  bf16 has a 7-bit mantissa, which
// 128 + 16 v overflows, so each of its pairs is shifted down first.
template <class T, class LayoutIn, int J>
CUTLASS_DEVICE uint32_t gptq_pair4(uint32_t q, uint32_t q8) {
  using M = Magic<T>;
  constexpr int p0 = decltype(LayoutIn{}(cute::Int<2 * J>{}))::value;
  constexpr int p1 = decltype(LayoutIn{}(cute::Int<2 * J + 1>{}))::value;
  static_assert(p1 == p0 + 4 && p0 < 4, "a value pair at nibbles p and p + 4 of one register (the Marlin atom)");
  if constexpr (cute::is_same_v<T, cutlass::half_t>) {
    const uint32_t src = p0 >= 2 ? q8 : q;
    if constexpr (p0 % 2 == 0) return sub2<T>(gptq_vllm::lop3_and_or(src, 0x000f000fu, M::OR), M::SUB4);
    const uint32_t x = gptq_vllm::lop3_and_or(src, 0x00f000f0u, M::OR);
    const __half2 r = __hfma2(reinterpret_cast<const __half2&>(x), __float2half2_rn(1.f / 16), __float2half2_rn(-72.f));
    return reinterpret_cast<const uint32_t&>(r);
  } else {
    return sub2<T>(gptq_vllm::lop3_and_or(q >> (4 * p0), 0x000f000fu, M::OR), M::SUB4);
  }
}

template <class T, class LayoutIn, class R, int... J>
CUTLASS_DEVICE void gptq_pairs4(uint32_t q, R& r, std::integer_sequence<int, J...>) {
  const uint32_t q8 = q >> 8;  // nibbles 2, 3 of each half (fp16 pairs at p = 2, 3)
  ((r[J] = gptq_pair4<T, LayoutIn, J>(q, q8)), ...);
}

// Generic in the source register layout (the collective picks the converter by the exact layout types); the
// destination is the MMA's compact order.
template <class T, class LayoutIn>
struct GptqConvert4 {
  template <class EngineIn, class EngineOut, class LayoutOut>
  CUTLASS_DEVICE static void convert(cute::Tensor<EngineIn, LayoutIn> const& src,
                                     cute::Tensor<EngineOut, LayoutOut>& dst) {
    constexpr int N = cute::size_v<LayoutIn>;
    static_assert(N == 8 && cute::cosize_v<LayoutIn> == 8, "8 codes of one 32-bit register");
    const uint32_t q = cute::recast<uint32_t>(src)(0);
    auto&& r = cute::recast<cutlass::AlignedArray<uint32_t, N / 2, 4 * N / 2>>(dst)(0);
    gptq_pairs4<T, LayoutIn>(q, r, std::make_integer_sequence<int, N / 2>{});
  }
};

template <class T, class LayoutIn>
struct GptqConvert8 {
  template <class EngineIn, class EngineOut, class LayoutOut>
  CUTLASS_DEVICE static void convert(cute::Tensor<EngineIn, LayoutIn> const& src,
                                     cute::Tensor<EngineOut, LayoutOut>& dst) {
    constexpr int N = cute::size_v<LayoutIn>;
    static_assert(N % 2 == 0);
    auto&& r = cute::recast<cutlass::AlignedArray<uint32_t, N / 2, 4 * N / 2>>(dst)(0);
    CUTLASS_PRAGMA_UNROLL
    for (int j = 0; j < N / 2; ++j) {
      const uint32_t a = uint32_t(uint8_t(src(2 * j))), b = uint32_t(uint8_t(src(2 * j + 1)));
      if constexpr (cute::is_same_v<T, cutlass::half_t>) {
        // half2(1024 + a, 1024 + b) - (1024 + 128): exact for bytes a, b.
        r[j] = sub2<T>(a | (b << 16) | 0x64006400u, 0x64806480u);
      } else {
        // bf16 holds integers up to 256 exactly, not 128 + 255: through fp32.
        __nv_bfloat162 v = __floats2bfloat162_rn(float(int(a)) - 128.f, float(int(b)) - 128.f);
        r[j] = reinterpret_cast<uint32_t&>(v);
      }
    }
  }
};

}  // namespace gptq_hopper_detail

template <class LayoutIn, class LayoutOut>
struct LayoutAwareConvertImpl<cutlass::uint4b_t, cutlass::half_t, LayoutIn, LayoutOut>
    : gptq_hopper_detail::GptqConvert4<cutlass::half_t, LayoutIn> {};
template <class LayoutIn, class LayoutOut>
struct LayoutAwareConvertImpl<cutlass::uint4b_t, cutlass::bfloat16_t, LayoutIn, LayoutOut>
    : gptq_hopper_detail::GptqConvert4<cutlass::bfloat16_t, LayoutIn> {};
template <class LayoutIn, class LayoutOut>
struct LayoutAwareConvertImpl<uint8_t, cutlass::half_t, LayoutIn, LayoutOut>
    : gptq_hopper_detail::GptqConvert8<cutlass::half_t, LayoutIn> {};
template <class LayoutIn, class LayoutOut>
struct LayoutAwareConvertImpl<uint8_t, cutlass::bfloat16_t, LayoutIn, LayoutOut>
    : gptq_hopper_detail::GptqConvert8<cutlass::bfloat16_t, LayoutIn> {};

}  // namespace cutlass
