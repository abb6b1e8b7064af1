// Host entry points of the vllm-duo CUDA ops. Schemas and argument meaning: ops.cpp.
#pragma once

#include <torch/all.h>

#include <optional>

namespace vllm_duo {

void paged_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_ptrs,
                  const at::Tensor& block_table_ptrs, const at::Tensor& block_table_strides,
                  const at::Tensor& slot_kv_head, const at::Tensor& slot_streaming,
                  const at::Tensor& seq_lens, int64_t num_kv_heads, int64_t block_size,
                  int64_t sink_size, int64_t window, double scale, int64_t partition_size,
                  at::Tensor& tmp_out, at::Tensor& tmp_lse,
                  const std::optional<at::Tensor>& k_scale,
                  const std::optional<at::Tensor>& v_scale);

void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_ptrs,
              const at::Tensor& slot_kv_head, const at::Tensor& slot_group,
              const at::Tensor& slot_mappings, const std::optional<at::Tensor>& k_scale,
              const std::optional<at::Tensor>& v_scale);

// Whether the slot caches are fp8 e4m3: both scales given (float32, one element, on `device`;
// the kernels read them there, so a captured graph sees later values) or neither (cache dtype =
// q/key dtype).
inline bool check_kv_scales(const char* op, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& v_scale, const at::Device& device) {
  TORCH_CHECK(k_scale.has_value() == v_scale.has_value(), op,
              ": k_scale and v_scale must be given together (fp8 e4m3 cache) or not at all");
  if (!k_scale.has_value()) return false;
  for (const at::Tensor* s : {&*k_scale, &*v_scale})
    TORCH_CHECK(s->device() == device && s->scalar_type() == at::kFloat && s->numel() == 1, op,
                ": k_scale and v_scale must be float32 tensors of one element on ", device);
  return true;
}

}  // namespace vllm_duo
