// Device helpers shared by the vllm-duo kernels: vectors of 8 cache elements (16 bytes of 2-byte
// floats, 8 bytes of fp8 e4m3), their conversions, and warp/block reductions. Every K/V/q access
// goes through `load16`/`load_vec` so the compiler emits one LDG.E.128 (fp8: LDG.E.64) per 8
// elements.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

namespace vllm_duo {

constexpr int kVec = 8;  // elements per vector access: 16 bytes of 2-byte floats, 8 of fp8
constexpr int kWarp = 32;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Read-only 16-byte load through the non-coherent path (the kernels never write what they read).
__device__ __forceinline__ uint4 load16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// kVec elements of a cache of element type T, as one register vector.
template <typename T>
using CacheVec = std::conditional_t<sizeof(T) == 2, uint4, uint2>;

template <typename T>
__device__ __forceinline__ CacheVec<T> load_vec(const T* p) {
  if constexpr (sizeof(T) == 2)
    return load16(p);
  else
    return __ldg(reinterpret_cast<const uint2*>(p));
}

// 16 bytes global -> shared without passing through registers (zero-filled when !valid, which
// reads nothing), grouped by commit and waited for with wait<N> (all but the newest N groups).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
__device__ __forceinline__ void to_float8(const CacheVec<T>& raw, float (&f)[kVec]);

template <>
__device__ __forceinline__ void to_float8<__nv_bfloat16>(const uint4& raw, float (&f)[kVec]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <>
__device__ __forceinline__ void to_float8<__half>(const uint4& raw, float (&f)[kVec]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// Exact (e4m3 fits in fp16): one cvt.rn.f16x2.e4m3x2 per pair on sm_89+.
template <>
__device__ __forceinline__ void to_float8<__nv_fp8_e4m3>(const uint2& raw, float (&f)[kVec]) {
  const __nv_fp8x2_storage_t* h = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 t = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(h[i], __NV_E4M3)));
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// vLLM's fp8 KV-cache store (reshape_and_cache_flash): e4m3(x / scale), round to nearest even,
// saturated to +-448. A true division, so the bytes equal torch's
// (x / scale).clamp(-448, 448).to(float8_e4m3fn).
__device__ __forceinline__ uint2 to_fp8x8(const float (&f)[kVec], float scale) {
  uint2 out;
  __nv_fp8x2_storage_t* h = reinterpret_cast<__nv_fp8x2_storage_t*>(&out);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i)
    h[i] = __nv_cvt_float2_to_fp8x2(make_float2(f[2 * i] / scale, f[2 * i + 1] / scale),
                                    __NV_SATFINITE, __NV_E4M3);
  return out;
}

template <typename T>
__device__ __forceinline__ T from_float(float x);

template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Sum over the `Width` lanes of an aligned lane group (Width a power of two <= 32).
template <int Width>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = Width / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Max over all threads of the block; `scratch` holds one float per warp.
__device__ __forceinline__ float block_max(float x, float* scratch) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int num_warps = blockDim.x / kWarp;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < num_warps; ++w) x = fmaxf(x, scratch[w]);
  return x;
}

}  // namespace vllm_duo
