// torch.ops.vllm_duo.*: schemas and CUDA registrations. Nothing else lives here; the kernels and
// their argument checks are in paged_decode.cu and write_kv.cu. The library has no Python module
// init: vllm_duo/ops/_ext.py loads it with torch.ops.load_library.
//
// Slot tensors (one entry per KV "slot", i.e. per separately allocated 1-head KV cache laid out
// [num_blocks, block_size, 2 * head_dim], K in [..., :head_dim], V in [..., head_dim:]):
//   kv_ptrs             int64 [num_slots]  data_ptr() of each slot cache (q dtype/fp8, 16B aligned)
//   block_table_ptrs    int64 [num_slots]  data_ptr() of each slot's int32 block table
//   block_table_strides int64 [num_slots]  row stride (elements) of each block table
//   slot_kv_head        int32 [num_slots]  local KV head served; -1 = padding slot, skipped
//   slot_streaming      int32 [num_slots]  1 = streaming head (sink + recent window), 0 = retrieval
//   slot_group          int32 [num_slots]  row of slot_mappings the slot writes through
//
// fp8 KV cache (vLLM's FLASH_ATTN fp8 semantics): k_scale and v_scale, float32 one-element tensors
// on the device (vLLM's layer._k_scale/_v_scale), both given = every slot cache holds fp8 e4m3
// (1-byte elements, same layout), stored as e4m3(x / scale) with round-to-nearest-even saturated to
// +-448 and read as float(fp8) * scale; neither = the cache dtype is q's (key's). The kernels read
// the scales on the device, so a captured CUDA graph uses their values at replay.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(vllm_duo, m) {
  // Decode attention (one query token per sequence) for every (sequence, slot) in one launch.
  // q/out [num_seqs, num_q_heads, head_dim]; seq_lens int32 [num_seqs] includes the query token
  // (0 = padding row: zeros written). tmp_out f32 [num_seqs, num_q_heads, P, head_dim] and
  // tmp_lse f32 [num_seqs, num_q_heads, P] are the flash-decoding workspace; P (their dim 2)
  // is the launch's partition count. Streaming heads attend keys p < sink_size or
  // p > seq_len - 1 - window; the blocks between are never read.
  m.def(
      "paged_decode(Tensor(a!) out, Tensor q, Tensor kv_ptrs, Tensor block_table_ptrs, "
      "Tensor block_table_strides, Tensor slot_kv_head, Tensor slot_streaming, Tensor seq_lens, "
      "int num_kv_heads, int block_size, int sink_size, int window, float scale, "
      "int partition_size, Tensor(b!) tmp_out, Tensor(c!) tmp_lse, Tensor? k_scale=None, "
      "Tensor? v_scale=None) -> ()");
  // KV-cache write: key/value [T, num_kv_heads, head_dim]; slot_mappings int64 [num_groups, >=T]
  // holds flat cache rows (block_id * block_size + offset; -1 = skip).
  m.def(
      "write_kv(Tensor key, Tensor value, Tensor kv_ptrs, Tensor slot_kv_head, "
      "Tensor slot_group, Tensor slot_mappings, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_duo, CUDA, m) {
  m.impl("paged_decode", &vllm_duo::paged_decode);
  m.impl("write_kv", &vllm_duo::write_kv);
}
