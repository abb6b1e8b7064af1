"""``DuoMetadata``: the per-step tensors one KV-cache group's slots need, nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_duo.backend.step_tables import StepTables


# A part's prompt-attention path (``DuoAttentionImpl._prefill_part``). A query at t < sink +
# prefill window sees every key p <= t on every head, so parts whose chunks all end there are
# causal attention: WHOLE (fresh chunks) one FA3 call over every head on the step's K/V;
# CAUSAL_SLOTS (continuing chunks) FA3 over every slot's cache, which then holds every key
# (the block manager nulls nothing inside sink + window). Longer chunks: FRESH, FA3 over the
# retrieval heads plus the streaming path; PER_SLOT, retrieval slots' caches plus the
# streaming path.
WHOLE, CAUSAL_SLOTS, FRESH, PER_SLOT = "whole", "causal_slots", "fresh", "per_slot"


@dataclass(frozen=True)
class PrefillPart:
    """Adjacent prompt chunks of a step that take one attention path: requests ``r0..r1-1``,
    tokens ``t0..t1-1`` (host values). ``fresh``: every chunk starts at position 0, so it
    attends only its own keys; otherwise each continues a prompt whose keys are cached.
    ``max_seq_len``: a host upper bound on the chunks' ends (their ``seq_lens``)."""

    r0: int
    r1: int
    t0: int
    t1: int
    fresh: bool
    max_query_len: int
    max_seq_len: int

    def path(self, sink: int, prefill_window: int) -> str:
        """The one decision the impl acts on and the CPU replay in
        ``benchmarks/prefill_paths.py`` counts."""
        causal = self.max_seq_len <= sink + prefill_window
        if self.fresh:
            return WHOLE if causal else FRESH
        return CAUSAL_SLOTS if causal else PER_SLOT


def runs(keys: list) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of equal keys (freshness, and whether a chunk ends within
    sink + prefill window): a step's prompt chunks in order."""
    out, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            out.append((start, i))
            start = i
    return out


@dataclass
class DuoMetadata:
    """Built once per step per KV-cache group; the batch is ordered decodes first.

    Every tensor a kernel reads lives in a persistent buffer (vLLM's or the builder's), so a
    full CUDA graph captured with one step's metadata replays with a later step's values.
    """

    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    max_model_len: int  # decode launches captured in a graph are planned for this length
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs], context length including this step's tokens
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]; streaming: gap entries -> null block
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    num_decodes: int  # leading requests with one query token
    num_decode_tokens: int
    tables: StepTables  # all groups' slot mappings and block-table addresses (persistent)
    group_row: int  # this group's row in ``tables``
    # The step's prompt chunks, split into runs of fresh and continuing ones.
    prefill_parts: tuple[PrefillPart, ...] = ()
    # Streaming groups: sink length per request (vLLM's R-SWA prefix), and the windows.
    sink_lens: torch.Tensor | None = None
    decode_window: int = 0
    prefill_window: int = 0
