// Host entry points of the vllm-duo CUDA ops. Schemas and argument meaning: ops.cpp.
#pragma once

#include <torch/all.h>

namespace vllm_duo {

void paged_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_ptrs,
                  const at::Tensor& block_table_ptrs, const at::Tensor& block_table_strides,
                  const at::Tensor& slot_kv_head, const at::Tensor& slot_streaming,
                  const at::Tensor& seq_lens, int64_t num_kv_heads, int64_t block_size,
                  int64_t sink_size, int64_t window, double scale, int64_t partition_size,
                  at::Tensor& tmp_out, at::Tensor& tmp_lse);

void write_kv(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_ptrs,
              const at::Tensor& slot_kv_head, const at::Tensor& slot_group,
              const at::Tensor& slot_mappings);

}  // namespace vllm_duo
