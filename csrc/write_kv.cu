// KV-cache write for every slot of a layer in one launch: token t's K/V of the slot's KV head go
// to row slot_mappings[slot_group[slot], t] of the slot cache [num_blocks, block_size, 2 * D].
// The cache is contiguous, so that row starts at flat_row * 2D elements: block_size is not needed.
// One thread copies 16 bytes (8 elements); consecutive threads cover one row, so stores are
// coalesced. An fp8 e4m3 cache takes the same 8 elements as e4m3(x / scale): 8 bytes per thread.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include "common.cuh"
#include "ops.h"

namespace vllm_duo {
namespace {

constexpr int kWriteThreads = 256;

struct WriteParams {
  const uint16_t* key;
  const uint16_t* value;
  int64_t key_stride_t, key_stride_h, value_stride_t, value_stride_h;
  const int64_t* kv_ptrs;
  const int* slot_kv_head;
  const int* slot_group;
  const int64_t* slot_mappings;
  int64_t mapping_stride;
  int64_t total;  // num_tokens * num_slots * chunks_per_row
  int num_slots, head_dim, chunks_per_row;  // chunks_per_row = 2 * head_dim / kVec
  const float* k_scale;  // fp8 cache: one-element scales on the device, else null
  const float* v_scale;
};

// Cache = uint16_t copies the 2-byte K/V bits of any dtype; Cache = fp8 e4m3 converts Src values.
template <typename Cache, typename Src = Cache>
__global__ void __launch_bounds__(kWriteThreads) write_kv_kernel(const WriteParams p) {
  const int64_t idx = int64_t(blockIdx.x) * kWriteThreads + threadIdx.x;
  if (idx >= p.total) return;
  const int chunk = static_cast<int>(idx % p.chunks_per_row);
  const int64_t rest = idx / p.chunks_per_row;
  const int slot = static_cast<int>(rest % p.num_slots);
  const int64_t t = rest / p.num_slots;
  const int head = p.slot_kv_head[slot];
  if (head < 0) return;
  const int64_t row = p.slot_mappings[p.slot_group[slot] * p.mapping_stride + t];
  if (row < 0) return;
  const int col = chunk * kVec;  // element column in the 2D-wide cache row
  const bool is_v = col >= p.head_dim;
  const uint16_t* src = is_v ? p.value + t * p.value_stride_t + head * p.value_stride_h
                             : p.key + t * p.key_stride_t + head * p.key_stride_h;
  Cache* dst = reinterpret_cast<Cache*>(p.kv_ptrs[slot]) + row * 2 * p.head_dim + col;
  const uint4 raw = load16(src + (is_v ? col - p.head_dim : col));
  // st.global.cg: a global store (the address came from an int, so plain stores are generic).
  if constexpr (std::is_same_v<Cache, uint16_t>) {
    __stcg(reinterpret_cast<uint4*>(dst), raw);
  } else {
    float f[kVec];
    to_float8<Src>(raw, f);
    __stcg(reinterpret_cast<uint2*>(dst), to_fp8x8(f, __ldg(is_v ? p.v_scale : p.k_scale)));
  }
}

void check_aligned_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) % kVec == 0 && t.stride(0) % kVec == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              "write_kv: ", name, " needs a contiguous, 16-byte aligned last dimension");
}

}  // namespace

void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_ptrs,
              const at::Tensor& slot_kv_head, const at::Tensor& slot_group,
              const at::Tensor& slot_mappings, const std::optional<at::Tensor>& k_scale,
              const std::optional<at::Tensor>& v_scale) {
  TORCH_CHECK(key.is_cuda(), "write_kv: key must be a CUDA tensor");
  const at::Device device = key.device();
  TORCH_CHECK(key.scalar_type() == at::kBFloat16 || key.scalar_type() == at::kHalf,
              "write_kv: key must be bfloat16 or float16, got ", key.scalar_type());
  TORCH_CHECK(key.dim() == 3, "write_kv: key must be [num_tokens, num_kv_heads, head_dim]");
  TORCH_CHECK(value.device() == device && value.scalar_type() == key.scalar_type() &&
                  value.sizes() == key.sizes(),
              "write_kv: value must match key in device, dtype and shape");
  const int64_t num_tokens = key.size(0), head_dim = key.size(2);
  TORCH_CHECK(head_dim % kVec == 0, "write_kv: head_dim must be a multiple of 8, got ", head_dim);
  check_aligned_rows(key, "key");
  check_aligned_rows(value, "value");
  const int64_t num_slots = kv_ptrs.numel();
  TORCH_CHECK(kv_ptrs.device() == device && kv_ptrs.scalar_type() == at::kLong &&
                  kv_ptrs.dim() == 1 && kv_ptrs.is_contiguous(),
              "write_kv: kv_ptrs must be a contiguous int64 [num_slots] tensor on ", device);
  for (const auto* t : {&slot_kv_head, &slot_group})
    TORCH_CHECK(t->device() == device && t->scalar_type() == at::kInt && t->dim() == 1 &&
                    t->size(0) == num_slots && t->is_contiguous(),
                "write_kv: slot_kv_head and slot_group must be contiguous int32 [num_slots] "
                "tensors on ", device);
  TORCH_CHECK(slot_mappings.device() == device && slot_mappings.scalar_type() == at::kLong &&
                  slot_mappings.dim() == 2 && slot_mappings.stride(1) == 1 &&
                  slot_mappings.size(1) >= num_tokens,
              "write_kv: slot_mappings must be int64 [num_groups, >= num_tokens] with "
              "contiguous rows, on ", device);
  const bool fp8 = check_kv_scales("write_kv", k_scale, v_scale, device);
  const int64_t total = num_tokens * num_slots * (2 * head_dim / kVec);
  if (total == 0) return;

  WriteParams p;
  p.key = static_cast<const uint16_t*>(key.data_ptr());
  p.value = static_cast<const uint16_t*>(value.data_ptr());
  p.key_stride_t = key.stride(0);
  p.key_stride_h = key.stride(1);
  p.value_stride_t = value.stride(0);
  p.value_stride_h = value.stride(1);
  p.kv_ptrs = kv_ptrs.data_ptr<int64_t>();
  p.slot_kv_head = slot_kv_head.data_ptr<int>();
  p.slot_group = slot_group.data_ptr<int>();
  p.slot_mappings = slot_mappings.data_ptr<int64_t>();
  p.mapping_stride = slot_mappings.stride(0);
  p.total = total;
  p.num_slots = static_cast<int>(num_slots);
  p.head_dim = static_cast<int>(head_dim);
  p.chunks_per_row = static_cast<int>(2 * head_dim / kVec);
  p.k_scale = fp8 ? k_scale->data_ptr<float>() : nullptr;
  p.v_scale = fp8 ? v_scale->data_ptr<float>() : nullptr;

  const c10::cuda::CUDAGuard guard(device);
  const int64_t blocks = (total + kWriteThreads - 1) / kWriteThreads;
  const bool bf16 = key.scalar_type() == at::kBFloat16;
  const auto kernel = !fp8  ? write_kv_kernel<uint16_t>
                      : bf16 ? write_kv_kernel<__nv_fp8_e4m3, __nv_bfloat16>
                             : write_kv_kernel<__nv_fp8_e4m3, __half>;
  kernel<<<blocks, kWriteThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vllm_duo
