"""Per-slot KV-cache specs of a model, as the worker reports them to vLLM."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

from vllm_duo.block_manager.spec import DuoStreamingSpec
from vllm_duo.slot_plan import RETRIEVAL, LayerSlots, layer_slots

LAYER_NAME = "model.layers.{}.self_attn.attn"


def slot_layer_names(layer_name: str, slots: LayerSlots) -> list[str]:
    """Names of a layer's slots in ``slots.slots()`` order; slot 0 is the real layer."""
    return [layer_name if i == 0 else f"{layer_name}.{suffix}"
            for i, (suffix, _, _) in enumerate(slots.slots())]


def slot_kind_specs(
    *, block_size: int, head_size: int, dtype: torch.dtype, sink_size: int, recent_size: int,
    prefill_window: int, tail_only_batches: int,
) -> tuple[FullAttentionSpec, DuoStreamingSpec]:
    """(retrieval, streaming) spec of a 1-KV-head slot: the one place both are built."""
    retrieval = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=head_size, dtype=dtype)
    streaming = DuoStreamingSpec(block_size=block_size, num_kv_heads=1, head_size=head_size, dtype=dtype,
                                 sliding_window=prefill_window, sink_size=sink_size, recent_size=recent_size,
                                 tail_only_batches=tail_only_batches)
    return retrieval, streaming


def duo_kv_cache_specs(
    mask: np.ndarray,
    *,
    block_size: int,
    head_size: int,
    dtype: torch.dtype,
    sink_size: int,
    recent_size: int,
    prefill_window: int,
    tp_size: int = 1,
    tp_rank: int = 0,
    layer_names: Mapping[int, str] | None = None,
    tail_only_batches: int = 0,
) -> dict[str, KVCacheSpec]:
    """Spec of every slot of this rank: retrieval slots full attention, streaming slots duo.

    ``mask`` is the global [layers, kv_heads] retrieval mask; ``layer_names`` maps
    the layer indices this rank holds (a PP stage's subset) to their attention
    layer names, default every layer of ``mask`` named like Llama's. All specs
    have one KV head, so every page is the same size and vLLM's hybrid
    allocator groups them without padding pages.
    """
    if layer_names is None:
        layer_names = {i: LAYER_NAME.format(i) for i in range(mask.shape[0])}
    retrieval, streaming = slot_kind_specs(block_size=block_size, head_size=head_size, dtype=dtype,
                                           sink_size=sink_size, recent_size=recent_size,
                                           prefill_window=prefill_window, tail_only_batches=tail_only_batches)
    specs: dict[str, KVCacheSpec] = {}
    for layer, name in layer_names.items():
        slots = layer_slots(mask, layer, tp_size, tp_rank)
        for slot_name, (_, kind, _) in zip(slot_layer_names(name, slots), slots.slots(), strict=True):
            specs[slot_name] = retrieval if kind == RETRIEVAL else streaming
    return specs
