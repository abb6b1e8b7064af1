// Warp-level tensor-core MMA (mma.sync m16n8k16, fp32 accumulate) for the decode kernel, whose
// A operand has at most 8 real rows (query heads of one KV head): rows 8-15 of A are zero and
// rows 8-15 of the result are dropped inside the asm, so they cost no registers.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 * g + t:
//   A (16 x 16, row-major): a0 = A[g][2t, 2t+1], a2 = A[g][2t+8, 2t+9] (a1, a3: rows g+8, zero here)
//   B (16 x 8, column):     b0 = B[2t, 2t+1][g],  b1 = B[2t+8, 2t+9][g]
//   C (16 x 8):             c0, c1 = C[g][2t], C[g][2t+1]  (c2, c3: rows g+8, dropped)
// Each 32-bit register holds two 16-bit elements, the lower index in the low half.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace vllm_duo {

// c[0..1] += A[g] . B[:, 2t .. 2t+1] over k = 16, for A with rows 8-15 zero.
template <typename T>
__device__ __forceinline__ void mma_rows8(float (&c)[2], uint32_t a0, uint32_t a2, uint32_t b0,
                                          uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>);
  const uint32_t zero = 0;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n .reg .f32 d2, d3;\n"
        " mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, d2, d3}, {%2, %3, %4, %3},"
        " {%5, %6}, {%0, %1, %7, %7};\n}\n"
        : "+f"(c[0]), "+f"(c[1])
        : "r"(a0), "r"(zero), "r"(a2), "r"(b0), "r"(b1), "f"(0.f));
  } else {
    asm volatile(
        "{\n .reg .f32 d2, d3;\n"
        " mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, d2, d3}, {%2, %3, %4, %3},"
        " {%5, %6}, {%0, %1, %7, %7};\n}\n"
        : "+f"(c[0]), "+f"(c[1])
        : "r"(a0), "r"(zero), "r"(a2), "r"(b0), "r"(b1), "f"(0.f));
  }
}

// Two floats as one register of two 16-bit elements (lo in the low half), round to nearest.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// The 16-bit element e (0 or 1) of x and of y, as one register (x's in the low half).
__device__ __forceinline__ uint32_t pair16(uint32_t x, uint32_t y, int e) {
  return __byte_perm(x, y, e ? 0x7632 : 0x5410);
}

// Elements 2w and 2w+1 of an 8-element cache vector as one register of two 16-bit elements: the
// vector's own word for a 2-byte cache; for fp8 e4m3 the two bytes converted to fp16 (exact).
template <typename C>
__device__ __forceinline__ uint32_t word16(const CacheVec<C>& v, int w) {
  if constexpr (sizeof(C) == 2) {
    return reinterpret_cast<const uint32_t*>(&v)[w];
  } else {
    const uint32_t x = w < 2 ? v.x : v.y;
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(
        static_cast<__nv_fp8x2_storage_t>(x >> (16 * (w & 1))), __NV_E4M3);
    return uint32_t(h.x) | (uint32_t(h.y) << 16);
  }
}

}  // namespace vllm_duo
