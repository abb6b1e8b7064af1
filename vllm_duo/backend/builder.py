"""``DuoMetadataBuilder``: turns vLLM's per-group view of a step into :class:`DuoMetadata`.

One builder per KV-cache group. Streaming groups get a block table whose freed middle entries
point at the null block, so no kernel ever reads a freed block.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionMetadataBuilder,
                                       CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_duo.backend.metadata import DuoMetadata
from vllm_duo.block_manager import DuoStreamingSpec

NULL_BLOCK_ID = 0  # vLLM's BlockPool reserves block 0 as the null block


class DuoMetadataBuilder(AttentionMetadataBuilder[DuoMetadata]):
    # Attention runs eagerly between piecewise CUDA graphs until the csrc decode path is
    # graph-safe end to end.
    _cudagraph_support = AttentionCGSupport.NEVER
    reorder_batch_threshold: int = 1
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.streaming = isinstance(kv_cache_spec, DuoStreamingSpec)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DuoMetadata:
        cm = common_attn_metadata
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        num_reqs = cm.num_reqs
        meta = DuoMetadata(
            num_actual_tokens=cm.num_actual_tokens, num_reqs=num_reqs,
            max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc[:num_reqs + 1], seq_lens=cm.seq_lens[:num_reqs],
            block_table=cm.block_table_tensor[:num_reqs], slot_mapping=cm.slot_mapping,
            num_decodes=num_decodes, num_decode_tokens=num_decode_tokens,
            is_prefilling=None if cm.is_prefilling is None else cm.is_prefilling[:num_reqs])
        if not self.streaming:
            return meta
        spec = self.kv_cache_spec
        meta.decode_window, meta.prefill_window = spec.recent_size, spec.sliding_window
        meta.sink_lens = torch.full((num_reqs,), spec.sink_size, dtype=torch.int32, device=self.device)
        meta.block_table = self._null_gap(meta, spec.sink_size, spec.block_size)
        return meta

    def _null_gap(self, meta: DuoMetadata, sink: int, block_size: int) -> torch.Tensor:
        """Point block-table entries no query of this step may read at the null block.

        The scheduler frees the middle blocks but the worker's table keeps their stale ids;
        a query at t needs keys < sink or > t - window, and t >= seq_len - query_len.
        """
        bt = meta.block_table
        q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        first_q = meta.seq_lens - q_lens
        # The manager keeps the prefill window while the first query is a prompt token.
        prefilling = q_lens > 1 if meta.is_prefilling is None else \
            meta.is_prefilling.to(first_q.device, non_blocking=True)  # V2 keeps it on the CPU
        window = torch.where(prefilling, meta.prefill_window, meta.decode_window).to(first_q.dtype)
        sink_blocks = -(-sink // block_size)
        first_needed = torch.clamp(first_q - window + 1, min=0) // block_size
        cols = torch.arange(bt.shape[1], device=bt.device, dtype=torch.int32)
        gap = (cols[None, :] >= sink_blocks) & (cols[None, :] < first_needed[:, None])
        return bt.masked_fill(gap, NULL_BLOCK_ID)
