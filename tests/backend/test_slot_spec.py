"""``slot_spec``: the KV-cache spec each slot reports, by kind and by ``streaming_prefill`` (CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_duo.backend.slots import slot_spec
from vllm_duo.block_manager import DuoStreamingSpec
from vllm_duo.options import parse_options
from vllm_duo.slot_plan import RETRIEVAL, STREAMING


@pytest.mark.parametrize("kernel,batches", [("rswa", 0), ("window", 3)])
def test_window_kernel_makes_streaming_slots_tail_only(kernel: str, batches: int) -> None:
    cfg = SimpleNamespace(cache_config=SimpleNamespace(block_size=16), max_concurrent_batches=3)
    opts = parse_options({"pattern": "full", "streaming_prefill": kernel, "prefill_recent_size": 512})
    streaming = slot_spec(STREAMING, cfg, 128, torch.bfloat16, opts)
    assert isinstance(streaming, DuoStreamingSpec) and streaming.tail_only_batches == batches
    assert (streaming.sliding_window, streaming.recent_size, streaming.sink_size) == (512, 256, 64)
    assert type(slot_spec(RETRIEVAL, cfg, 128, torch.bfloat16, opts)) is FullAttentionSpec
