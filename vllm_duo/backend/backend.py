"""``DuoAttentionBackend``: what the duo backend can do and which classes do it.

Each KV head of a layer lives in its own 1-head KV cache ("slot", see :mod:`.slots`), laid
out exactly like FlashAttention's cache, so FA3 reads retrieval slots unchanged.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionType, MultipleOf
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend


class DuoAttentionBackend(FlashAttentionBackend):
    # The impl writes K/V of every slot itself (one layer, many caches).
    forward_includes_kv_cache_update: ClassVar[bool] = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    # fp8 = e4m3 with per-tensor scales, as FLASH_ATTN's FA3 (vLLM offers no e5m2 there).
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "bfloat16", "float16", "fp8", "fp8_e4m3"]

    @staticmethod
    def get_name() -> str:
        # vLLM maps this back with AttentionBackendEnum[name]; out-of-tree backends use CUSTOM.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        from vllm_duo.backend.impl import DuoAttentionImpl

        return DuoAttentionImpl

    @staticmethod
    def get_builder_cls():
        from vllm_duo.backend.builder import DuoMetadataBuilder

        return DuoMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: object = None) -> list[int | MultipleOf]:
        # vLLM 0.33's worker passes the layer's spec; 0.26 calls it without one.
        return [MultipleOf(16)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in (64, 128)

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def is_mla(cls) -> bool:
        return False
