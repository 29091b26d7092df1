// Shared helpers for the gptq_vllm CUDA kernels (issue 4).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace gptq_vllm {

// ---- element types ----------------------------------------------------------------------------------
template <typename T> struct TypeTraits;
template <> struct TypeTraits<half> {
  using T2 = half2;
  static __device__ __forceinline__ T2 pack(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ float to_float(half x) { return __half2float(x); }
  static __device__ __forceinline__ half from_float(float x) { return __float2half_rn(x); }
};
template <> struct TypeTraits<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ T2 pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename V> __device__ __forceinline__ uint32_t as_u32(V v) { return *reinterpret_cast<uint32_t*>(&v); }
template <typename V> __device__ __forceinline__ V from_u32(uint32_t u) { return *reinterpret_cast<V*>(&u); }

// d = (a & b) | c in one instruction (lop3 with immLut (0xf0 & 0xcc) | 0xaa).
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm volatile("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"((0xf0 & 0xcc) | 0xaa));
  return d;
}

// Tensor-core mma m16n8k16, fp32 accumulate.  Fragments (PTX ISA, lane = 4*gid + tig):
//   A (row-major 16x16): a[0] = (row gid,   k 2tig..2tig+1)  a[1] = (row gid+8, same k)
//                        a[2] = (row gid,   k 2tig+8..+9)    a[3] = (row gid+8, k 2tig+8..+9)
//   B (col-major 16x8):  b[0] = (k 2tig..2tig+1, col gid)    b[1] = (k 2tig+8..+9, col gid)
//   C (16x8 fp32):       c[0..1] = (row gid, cols 2tig..+1)  c[2..3] = (row gid+8, cols 2tig..+1)
template <typename T>
__device__ __forceinline__ void mma_16816(const uint32_t* a, const uint32_t* b, float* c);
template <>
__device__ __forceinline__ void mma_16816<half>(const uint32_t* a, const uint32_t* b, float* c) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(const uint32_t* a, const uint32_t* b, float* c) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Read field i (b bits) of a little-endian bitstream of int32 words (formats.md §1.2): bits [b*i, b*i+b).
// Works for every b in {2,3,4,8}; a 3-bit field may straddle two words.
__device__ __forceinline__ uint32_t bitstream_field(const int* __restrict__ words, int64_t stride, int i, int b) {
  const int bit = b * i;
  const int w = bit >> 5, sh = bit & 31;
  uint32_t v = static_cast<uint32_t>(__ldg(words + static_cast<int64_t>(w) * stride)) >> sh;
  if (sh + b > 32) v |= static_cast<uint32_t>(__ldg(words + static_cast<int64_t>(w + 1) * stride)) << (32 - sh);
  return v & ((1u << b) - 1u);
}

}  // namespace gptq_vllm
