"""Slot plan: how each layer's local KV heads map onto 1-head KV-cache "slot layers".

Pure data. Every KV head of a duo layer gets its own 1-head KV cache (a slot), so the
stock hybrid allocator can give retrieval slots full paged blocks and streaming slots
sink + recent blocks, all with the same page size. Slot counts per layer are the max
over TP ranks, so every rank reports identical KV-cache specs (vLLM requires it);
a rank with fewer heads of a kind leaves the extra slots unused (head -1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_duo.patterns import rank_kv_heads

RETRIEVAL, STREAMING = 0, 1


@dataclass(frozen=True)
class LayerSlots:
    """One layer on one TP rank: which local KV head each slot serves (-1 = padding)."""

    retrieval_heads: tuple[int, ...]  # local KV-head index per retrieval slot
    streaming_heads: tuple[int, ...]  # local KV-head index per streaming slot

    @property
    def num_slots(self) -> int:
        return len(self.retrieval_heads) + len(self.streaming_heads)

    def slots(self) -> list[tuple[str, int, int]]:
        """(suffix, kind, local head) per slot; slot 0 is the real layer itself."""
        return ([(f"duo_r{i}", RETRIEVAL, h) for i, h in enumerate(self.retrieval_heads)]
                + [(f"duo_s{i}", STREAMING, h) for i, h in enumerate(self.streaming_heads)])


def layer_slots(mask: np.ndarray, layer: int, tp_size: int, tp_rank: int) -> LayerSlots:
    """Slots of ``layer`` on ``tp_rank`` given the global [layers, kv_heads] retrieval mask."""
    num_kv_heads = mask.shape[1]
    per_rank = [mask[layer, rank_kv_heads(num_kv_heads, tp_size, r)] for r in range(tp_size)]
    n_ret = max(int(m.sum()) for m in per_rank)
    n_str = max(int(len(m) - m.sum()) for m in per_rank)
    local = per_rank[tp_rank]
    ret = [h for h, v in enumerate(local) if v]
    strm = [h for h, v in enumerate(local) if not v]
    return LayerSlots(retrieval_heads=tuple(ret + [-1] * (n_ret - len(ret))),
                      streaming_heads=tuple(strm + [-1] * (n_str - len(strm))))


def slot_counts(mask: np.ndarray, tp_size: int) -> tuple[int, int]:
    """Total (retrieval, streaming) slots per rank over all layers (identical on every rank)."""
    per_layer = [layer_slots(mask, layer, tp_size, 0) for layer in range(mask.shape[0])]
    return (sum(len(s.retrieval_heads) for s in per_layer),
            sum(len(s.streaming_heads) for s in per_layer))
