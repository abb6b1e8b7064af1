"""``DuoMetadata``: the per-step tensors one KV-cache group's slots need, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DuoMetadata:
    """Built once per step per KV-cache group; the batch is ordered decodes first."""

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs], context length including this step's tokens
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]; streaming: gap entries -> null block
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    num_decodes: int  # leading requests with one query token
    num_decode_tokens: int
    is_prefilling: torch.Tensor | None = None  # bool [num_reqs]: first query is a prompt token
    # Streaming groups: sink length per request (vLLM's R-SWA prefix), and the windows.
    sink_lens: torch.Tensor | None = None
    decode_window: int = 0
    prefill_window: int = 0
