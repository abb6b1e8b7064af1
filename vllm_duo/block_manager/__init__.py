"""KV-cache block management of DuoAttention slots: spec, manager, registration."""

from vllm_duo.block_manager.manager import DuoStreamingManager
from vllm_duo.block_manager.registry import register_duo_kv_cache_spec
from vllm_duo.block_manager.spec import DuoStreamingSpec
from vllm_duo.block_manager.specs_for_model import (
    LAYER_NAME,
    duo_kv_cache_specs,
    slot_kind_specs,
    slot_layer_names,
)

__all__ = [
    "LAYER_NAME",
    "DuoStreamingManager",
    "DuoStreamingSpec",
    "duo_kv_cache_specs",
    "register_duo_kv_cache_spec",
    "slot_kind_specs",
    "slot_layer_names",
]
