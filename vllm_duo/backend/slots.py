"""Slot layers: one 1-KV-head cache per local KV head of a duo layer.

vLLM allocates KV memory per layer from the specs that the layers in
``static_forward_context`` report. Registering one small slot object per KV head lets the
stock hybrid allocator give retrieval heads full paged blocks and streaming heads only
sink + recent blocks. The real layer stays slot 0 (vLLM looks its metadata up by name). The two
changes to vLLM objects this needs are in :mod:`vllm_duo.patches`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import KVCacheSpec

from vllm_duo.block_manager import slot_kind_specs
from vllm_duo.engine_config import options_from_vllm_config
from vllm_duo.options import DuoOptions
from vllm_duo.patches import add_forward_context_layer, set_layer_kv_cache_spec
from vllm_duo.slot_plan import RETRIEVAL, layer_slots


@dataclass(frozen=True)
class SlotInfo:
    name: str  # layer name vLLM knows the slot by
    kind: int  # slot_plan.RETRIEVAL or STREAMING
    head: int  # local KV head served; -1 = padding slot (keeps specs equal across TP ranks)
    layer: AttentionLayerBase  # holds ``kv_cache`` once vLLM binds it


def slot_spec(kind: int, vllm_config: VllmConfig, head_size: int, dtype: torch.dtype,
              opts: DuoOptions) -> KVCacheSpec:
    # The window prefill kernel reads a chunk's own keys from the step's K/V: store tails only.
    tail_only = vllm_config.max_concurrent_batches if opts.streaming_prefill == "window" else 0
    retrieval, streaming = slot_kind_specs(
        block_size=vllm_config.cache_config.block_size, head_size=head_size, dtype=dtype,
        sink_size=opts.sink_size, recent_size=opts.recent_size, prefill_window=opts.prefill_window,
        tail_only_batches=tail_only)
    return retrieval if kind == RETRIEVAL else streaming


class DuoKVSlot(AttentionLayerBase):
    """A KV cache that vLLM sizes, allocates and binds like a layer; it computes nothing."""

    def __init__(self, owner: AttentionLayerBase, name: str, kind: int, opts: DuoOptions):
        self.layer_name = name
        self.impl = owner.impl
        self.attn_backend = owner.get_attn_backend()
        self.num_heads = owner.num_heads  # same attention-group key as the owner
        self.head_size = owner.head_size
        self.kv_cache_torch_dtype = owner.kv_cache_torch_dtype
        self.attn_type = AttentionType.DECODER
        self.kv_sharing_target_layer_name = None
        self.kv_cache = torch.tensor([])
        self._kind, self._opts = kind, opts

    def get_attn_backend(self):
        return self.attn_backend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return slot_spec(self._kind, vllm_config, self.head_size, self.kv_cache_torch_dtype,
                         self._opts)


def _tp() -> tuple[int, int]:
    from vllm.distributed import parallel_state

    if parallel_state._TP is None:  # building a model outside a distributed setup (tests)
        return 1, 0
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def attach_slots(layer) -> None:
    """Register ``layer``'s slot layers and hand the impl its slot list."""
    vllm_config = get_current_vllm_config()
    opts = options_from_vllm_config(vllm_config)
    tp_size, tp_rank = _tp()
    plan = layer_slots(opts.mask(), extract_layer_index(layer.layer_name), tp_size, tp_rank)
    slots: list[SlotInfo] = []
    for i, (suffix, kind, head) in enumerate(plan.slots()):
        if i == 0:
            obj = layer
            set_layer_kv_cache_spec(layer, lambda self, cfg, _k=kind: slot_spec(
                _k, cfg, self.head_size, self.kv_cache_torch_dtype, opts))
            name = layer.layer_name
        else:
            name = f"{layer.layer_name}.{suffix}"
            obj = DuoKVSlot(layer, name, kind, opts)
            add_forward_context_layer(vllm_config, name, obj)
        slots.append(SlotInfo(name=name, kind=kind, head=head, layer=obj))
    layer.impl.set_slots(slots, opts, vllm_config.cache_config.block_size)
