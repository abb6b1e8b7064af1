"""Builders for driving vLLM's real KV-cache manager and scheduler on CPU with duo specs.

The model is Llama-3-8B-shaped (32 layers x 8 KV heads, head_dim 128, bf16) from a
config.json written to a temp folder, so nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.utils.hashing import sha256
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec
from vllm.v1.request import Request

from vllm_duo import compat
from vllm_duo.block_manager import DuoStreamingSpec, duo_kv_cache_specs, register_duo_kv_cache_spec

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, DTYPE, BLOCK = 32, 8, 128, torch.bfloat16, 16
SINK, RECENT = 64, 256
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 32,
    "num_key_value_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "max_position_embeddings": 131072,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}


@pytest.fixture(scope="session", autouse=True)
def _registered() -> None:
    register_duo_kv_cache_spec()
    init_none_hash(sha256)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("llama3-8b-shape")
    (path / "config.json").write_text(json.dumps(LLAMA3_8B))
    return str(path)


@pytest.fixture(scope="session")
def model_config(model_dir: str) -> ModelConfig:
    return ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16", max_model_len=131072)


def make_vllm_config(model_config: ModelConfig, *, max_model_len: int, max_num_batched_tokens: int,
                     max_num_seqs: int = 16, async_scheduling: bool = False,
                     enable_prefix_caching: bool = False) -> VllmConfig:
    """A VllmConfig as on a GPU: hybrid allocator on, async scheduling as asked (platforms
    without a GPU override both; async only sizes ``max_in_flight_tokens`` here)."""
    model_config.max_model_len = max_model_len
    config = VllmConfig(
        model_config=model_config,
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, is_encoder_decoder=False, async_scheduling=async_scheduling),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=enable_prefix_caching),
        device_config=DeviceConfig(device="cpu"))
    config.scheduler_config.disable_hybrid_kv_cache_manager = False
    config.scheduler_config.async_scheduling = async_scheduling
    return config


def random_mask(seed: int = 0, retrieval_fraction: float = 0.5) -> np.ndarray:
    """A [layers, kv_heads] mask with exactly that fraction of retrieval heads, scattered at random."""
    flat = np.zeros(NUM_LAYERS * NUM_KV_HEADS, dtype=np.uint8)
    flat[:round(retrieval_fraction * flat.size)] = 1
    return np.random.default_rng(seed).permutation(flat).reshape(NUM_LAYERS, NUM_KV_HEADS)


def duo_specs(mask: np.ndarray, prefill_window: int = RECENT, tail_only_batches: int = 0,
              dtype: torch.dtype = DTYPE) -> dict[str, KVCacheSpec]:
    return duo_kv_cache_specs(mask, block_size=BLOCK, head_size=HEAD_DIM, dtype=dtype, sink_size=SINK,
                              recent_size=RECENT, prefill_window=prefill_window,
                              tail_only_batches=tail_only_batches)


def full_specs(dtype: torch.dtype = DTYPE) -> dict[str, KVCacheSpec]:
    """The stock model: one 8-head full-attention layer per decoder layer."""
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=dtype)
    return {f"model.layers.{i}.self_attn.attn": spec for i in range(NUM_LAYERS)}


def bytes_per_block(config: VllmConfig, specs: dict[str, KVCacheSpec]) -> int:
    """What one block id costs in the pool (group_size x page), as vLLM computes it."""
    compat.resolve_kv_cache_layout(config, [specs])
    return compat.pool_bytes_per_block(config, compat.get_kv_cache_groups(config, dict(specs)))


def kv_cache_config(config: VllmConfig, specs: dict[str, KVCacheSpec], num_blocks: int) -> KVCacheConfig:
    """vLLM's own KVCacheConfig for a pool of ``num_blocks`` block ids."""
    memory = num_blocks * bytes_per_block(config, specs)
    (cfg,) = compat.get_kv_cache_configs(config, [dict(specs)], [memory])
    assert cfg.num_blocks == num_blocks
    return cfg


def kv_cache_manager(config: VllmConfig, cfg: KVCacheConfig) -> KVCacheManager:
    return KVCacheManager(cfg, max_model_len=config.model_config.max_model_len,
                          scheduler_block_size=BLOCK, hash_block_size=BLOCK,
                          max_in_flight_tokens=config.max_in_flight_tokens,
                          enable_caching=config.cache_config.enable_prefix_caching)


_hasher = get_request_block_hasher(BLOCK, sha256)


def make_request(request_id: str, prompt_len: int, max_tokens: int, seed: int = 0) -> Request:
    return request_from_tokens(request_id, np.random.default_rng(seed).integers(0, 1000, prompt_len).tolist(),
                               max_tokens)


def request_from_tokens(request_id: str, tokens: list[int], max_tokens: int) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
                   block_hasher=_hasher)


@dataclass(frozen=True)
class Window:
    """First-principles streaming footprint: the blocks a future query can read."""

    sink: int
    recent: int
    prefill_window: int
    tail_only: bool = False  # the window prefill kernel: chunks store only their last window

    def needed_blocks(self, processed: int, num_tokens: int, num_prompt_tokens: int) -> set[int]:
        """Blocks holding keys p < sink or p >= min over future queries t >= processed of t - W(t) + 1."""
        window = self.recent if processed >= num_prompt_tokens else self.prefill_window
        first_key, end = max(0, processed - window + 1), cdiv(num_tokens, BLOCK)
        return set(range(min(cdiv(self.sink, BLOCK), end))) | set(range(first_key // BLOCK, end))


def held(manager: KVCacheManager, request_id: str) -> Iterator[tuple[KVCacheSpec, set[int]]]:
    """(spec, positions of real blocks) per KV-cache group of a request."""
    for single in manager.coordinator.single_type_managers:
        blocks = single.req_to_blocks.get(request_id, [])
        yield single.kv_cache_spec, {i for i, b in enumerate(blocks) if not b.is_null}


def assert_footprint(manager: KVCacheManager, request: Request, window: Window) -> None:
    """Retrieval groups hold every block; streaming groups exactly sink + window + in flight.

    Tail-only streaming groups hold at least the sink, the window behind the processed tokens
    and the last chunk's window, and at most their admission cap (which blocks attention reads
    is checked by tests/reliability/sim.py).
    """
    processed = request.num_computed_tokens - request.num_in_flight_tokens
    num_tokens = request.num_computed_tokens
    managers = manager.coordinator.single_type_managers
    for single, (spec, positions) in zip(managers, held(manager, request.request_id), strict=True):
        if not isinstance(spec, DuoStreamingSpec):
            assert positions == set(range(cdiv(num_tokens, BLOCK)))
        elif not window.tail_only:
            assert positions == window.needed_blocks(processed, num_tokens, request.num_prompt_tokens)
        else:
            future_w = window.recent if num_tokens >= request.num_prompt_tokens else window.prefill_window
            last_window = max(0, num_tokens - future_w + 1) // BLOCK
            must = window.needed_blocks(processed, processed, request.num_prompt_tokens) | \
                set(range(last_window, cdiv(num_tokens, BLOCK)))
            assert must <= positions and len(positions) <= compat.admission_cap(single), \
                (sorted(must - positions), len(positions))


def assert_pool_empty(manager: KVCacheManager) -> None:
    pool = manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # the null block is never free
    for single in manager.coordinator.single_type_managers:
        assert not single.req_to_blocks
