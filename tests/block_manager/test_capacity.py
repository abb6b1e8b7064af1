"""The capacity vLLM reports for duo slots, against our own arithmetic and against full attention."""

from __future__ import annotations

import pytest
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

from tests.block_manager.conftest import (
    BLOCK,
    HEAD_DIM,
    NUM_KV_HEADS,
    NUM_LAYERS,
    RECENT,
    SINK,
    duo_specs,
    full_specs,
    make_vllm_config,
    random_mask,
)
from vllm_duo import compat

MEMORY = 40 * 2**30  # KV memory of an 80 GB GPU serving an 8B model
PAGE = 2 * BLOCK * HEAD_DIM * 2  # one bf16 KV head, one block: 8 KiB


def expected(num_retrieval: int, num_streaming: int, max_len: int, in_flight: int, prefill_window: int,
             tail_only_batches: int = 0) -> tuple[int, float]:
    """(num_blocks, max concurrency) from first principles plus vLLM's group-size rule."""
    small, big = sorted((num_retrieval, num_streaming))
    group_size = big if big < 1.5 * small else small  # kv_cache_utils: pad rather than split if close
    num_blocks = MEMORY // (group_size * PAGE)
    window = cdiv(min(prefill_window - 1 + in_flight, max_len), BLOCK) + 1
    if tail_only_batches:  # the processed window plus each in-flight chunk's last window
        window = min(window, (1 + tail_only_batches) * (cdiv(prefill_window - 1, BLOCK) + 1))
    streaming = min(cdiv(SINK, BLOCK) + window, cdiv(max_len, BLOCK))
    per_request = (cdiv(num_retrieval, group_size) * cdiv(max_len, BLOCK)
                   + cdiv(num_streaming, group_size) * streaming)
    return num_blocks, num_blocks / per_request


@pytest.mark.parametrize(("retrieval", "max_len", "batched", "prefill_window", "tail_only", "min_ratio"), [
    (0.5, 131072, 2048, RECENT, False, 1.95),
    (0.5, 131072, 8192, RECENT, False, 1.85),  # in-flight tokens inflate the streaming reservation
    (0.5, 32768, 2048, 1024, False, 1.75),
    (0.45, 131072, 2048, RECENT, False, 1.75),  # 115/141 heads: vLLM pads the retrieval group to 141
    (0.25, 131072, 2048, RECENT, False, 3.7),
    # LLM's defaults on an H100 (64K requests, 16K batches, async: 32K tokens in flight): the
    # capacity benchmark measured 1.33x; storing only chunk tails lifts it to 1.98x.
    (0.5, 65536, 16384, RECENT, False, 1.3),
    (0.5, 65536, 16384, RECENT, True, 1.97),
    (0.25, 65536, 16384, RECENT, True, 3.8),
])
def test_capacity(model_config, retrieval: float, max_len: int, batched: int, prefill_window: int,
                  tail_only: bool, min_ratio: float) -> None:
    config = make_vllm_config(model_config, max_model_len=max_len, max_num_batched_tokens=batched,
                              async_scheduling=batched == 16384)
    batches = config.max_concurrent_batches if tail_only else 0
    mask = random_mask(0, retrieval)
    (duo,) = compat.get_kv_cache_configs(config, [duo_specs(mask, prefill_window, batches)], [MEMORY])
    (full,) = compat.get_kv_cache_configs(config, [full_specs()], [MEMORY])
    duo_tokens, duo_concurrency = get_kv_cache_capacity(config, duo)  # what vLLM logs
    full_tokens, full_concurrency = get_kv_cache_capacity(config, full)

    num_blocks, concurrency = expected(int(mask.sum()), mask.size - int(mask.sum()), max_len,
                                       config.max_in_flight_tokens, prefill_window, batches)
    assert duo.num_blocks == num_blocks
    assert duo_concurrency == pytest.approx(concurrency)
    assert duo_tokens == int(concurrency * max_len)
    assert full.num_blocks == MEMORY // (NUM_LAYERS * NUM_KV_HEADS * PAGE)
    assert full_concurrency == pytest.approx(full.num_blocks / cdiv(max_len, BLOCK))
    ideal = 1 / (mask.mean() + (1 - mask.mean()) * (SINK + prefill_window + batched) / max_len)
    if tail_only:
        ideal = 1 / mask.mean()
    print(f"retrieval {retrieval} max_len {max_len} batched {batched} tail_only {tail_only}: "
          f"{duo_concurrency / full_concurrency:.3f}x")
    assert min_ratio <= duo_concurrency / full_concurrency <= ideal


@pytest.mark.parametrize(("retrieval", "min_ratio"), [(0.5, 3.9), (0.25, 7.5)])
def test_fp8_capacity_multiplies(model_config, retrieval: float, min_ratio: float) -> None:
    """fp8 slots (vLLM stores fp8 KV as uint8: one byte) against FLASH_ATTN in bf16: the two savings
    multiply. LLM's defaults on an H200 (64K requests, 16K batches, async scheduling)."""
    import torch

    config = make_vllm_config(model_config, max_model_len=65536, max_num_batched_tokens=16384,
                              async_scheduling=True)
    mask = random_mask(0, retrieval)
    batches = config.max_concurrent_batches

    def concurrency(specs) -> float:
        (cfg,) = compat.get_kv_cache_configs(config, [specs], [MEMORY])
        return get_kv_cache_capacity(config, cfg)[1]

    duo_fp8 = concurrency(duo_specs(mask, RECENT, batches, dtype=torch.uint8))
    duo_bf16 = concurrency(duo_specs(mask, RECENT, batches))
    full_bf16, full_fp8 = concurrency(full_specs()), concurrency(full_specs(torch.uint8))
    print(f"retrieval {retrieval}: duo fp8 / full bf16 {duo_fp8 / full_bf16:.3f}, "
          f"duo fp8 / full fp8 {duo_fp8 / full_fp8:.3f}")
    assert duo_fp8 / full_bf16 >= min_ratio
    assert duo_fp8 / full_fp8 == pytest.approx(duo_bf16 / full_bf16, rel=0.01)
