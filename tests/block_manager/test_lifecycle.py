"""One request's life through vLLM's real KVCacheManager, checked block by block."""

from __future__ import annotations

from collections import deque

import pytest
from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.request import Request

from tests.block_manager.conftest import (
    BLOCK,
    RECENT,
    SINK,
    Window,
    assert_footprint,
    assert_pool_empty,
    duo_specs,
    held,
    kv_cache_config,
    kv_cache_manager,
    make_request,
    make_vllm_config,
    random_mask,
)
from vllm_duo import compat
from vllm_duo.block_manager import DuoStreamingSpec

CHUNK = 512


class Driver:
    """Allocates like the scheduler: computed tokens advance at schedule time and stay in
    flight for ``lag`` more steps (0: synchronous, 1: async scheduling)."""

    def __init__(self, manager: KVCacheManager, request: Request, window: Window, lag: int) -> None:
        self.manager, self.request, self.window, self.lag = manager, request, window, lag
        self.in_flight: deque[int] = deque()

    def step(self, num_tokens: int) -> dict[type, int]:
        req = self.request
        while len(self.in_flight) > self.lag:
            req.num_in_flight_tokens -= self.in_flight.popleft()
        assert self.manager.allocate_slots(req, num_tokens) is not None
        req.num_computed_tokens += num_tokens
        req.num_in_flight_tokens += num_tokens
        self.in_flight.append(num_tokens)
        assert_footprint(self.manager, req, self.window)
        return self.live_blocks()

    def live_blocks(self) -> dict[type, int]:
        """Live blocks per group type (groups of one type hold alike); checks no block leaks."""
        counts = [(type(spec), len(pos)) for spec, pos in held(self.manager, self.request.request_id)]
        pool = self.manager.block_pool
        assert pool.num_gpu_blocks - 1 - pool.get_num_free_blocks() == sum(n for _, n in counts)
        return dict(counts)


@pytest.mark.parametrize("tail_only", [False, True])
@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("prefill_window", [RECENT, 1024])
def test_prefill_decode_finish(model_config, prefill_window: int, lag: int, tail_only: bool) -> None:
    config = make_vllm_config(model_config, max_model_len=8192, max_num_batched_tokens=CHUNK,
                              async_scheduling=bool(lag))  # max_in_flight_tokens = (1 + lag) chunks
    specs = duo_specs(random_mask(), prefill_window, tail_only_batches=(1 + lag) * tail_only)
    manager = kv_cache_manager(config, kv_cache_config(config, specs, num_blocks=2000))
    caps = [compat.admission_cap(s) for s in manager.coordinator.single_type_managers
            if isinstance(s.kv_cache_spec, DuoStreamingSpec)]
    window = Window(SINK, RECENT, prefill_window, tail_only)
    prompt, decode = 3000, 300
    driver = Driver(manager, make_request("r", prompt, decode), window, lag)

    prefill_peak = 0
    while driver.request.num_computed_tokens < prompt:
        n = min(CHUNK, prompt - driver.request.num_computed_tokens)
        prefill_peak = max(prefill_peak, driver.step(n)[DuoStreamingSpec])
    assert prefill_peak <= min(caps)
    for _ in range(decode):
        driver.request.append_output_token_ids(7)
        decode_blocks = driver.step(1)[DuoStreamingSpec]
    # Decode keeps 4 sink blocks + the 256-token window (17 blocks unless aligned).
    assert decode_blocks <= cdiv(SINK, BLOCK) + RECENT // BLOCK + 1 + lag
    if prefill_window > RECENT:
        assert prefill_peak > cdiv(SINK, BLOCK) + prefill_window // BLOCK  # wide while prefilling
    if tail_only:  # sink + the processed window + each in-flight chunk's last window, at most
        assert prefill_peak <= cdiv(SINK, BLOCK) + (2 + lag) * (cdiv(prefill_window - 1, BLOCK) + 1)
    assert driver.live_blocks()[FullAttentionSpec] == cdiv(prompt + decode, BLOCK)

    manager.free(driver.request)
    assert_pool_empty(manager)


def test_window_shrinks_when_prompt_ends(model_config) -> None:
    config = make_vllm_config(model_config, max_model_len=8192, max_num_batched_tokens=CHUNK)
    manager = kv_cache_manager(config, kv_cache_config(config, duo_specs(random_mask(), 1024), 2000))
    driver = Driver(manager, make_request("r", 2048, 10), Window(SINK, RECENT, 1024), lag=0)
    for _ in range(4):
        last_prefill = driver.step(CHUNK)[DuoStreamingSpec]
    driver.request.append_output_token_ids(7)
    first_decode = driver.step(1)[DuoStreamingSpec]
    # The last chunk (tokens 1536..2047) reads keys from 1536 - 1023 = 513: blocks 32..127.
    assert last_prefill == 4 + 96
    # The first decode query (token 2048) reads keys from 2048 - 255 = 1793: blocks 112..128.
    assert first_decode == 4 + 17


def test_tail_only_long_chunk_takes_only_its_tail(model_config) -> None:
    """One 4096-token chunk: retrieval slots take 256 blocks, tail-only streaming slots the 4 sink
    blocks and the 17 blocks of the chunk's last window; the middle entries are the null block."""
    config = make_vllm_config(model_config, max_model_len=8192, max_num_batched_tokens=4096)
    manager = kv_cache_manager(config, kv_cache_config(config, duo_specs(random_mask(), RECENT, 1), 2000))
    driver = Driver(manager, make_request("r", 6000, 10), Window(SINK, RECENT, RECENT, True), lag=0)
    blocks = driver.step(4096)
    assert blocks[FullAttentionSpec] == 256 and blocks[DuoStreamingSpec] == 4 + 16
    # Tokens 4096..5999 read keys 3841..4095 (blocks 240..255) from the cache and keep their own
    # last window, keys 5745..5999 (blocks 359..374).
    blocks = driver.step(1904)
    assert blocks[DuoStreamingSpec] == 4 + 16 + 16
    manager.free(driver.request)
    assert_pool_empty(manager)


def test_abort_mid_prefill_returns_every_block(model_config) -> None:
    config = make_vllm_config(model_config, max_model_len=8192, max_num_batched_tokens=CHUNK)
    manager = kv_cache_manager(config, kv_cache_config(config, duo_specs(random_mask(1)), 2000))
    driver = Driver(manager, make_request("r", 4000, 10), Window(SINK, RECENT, RECENT), lag=0)
    for _ in range(3):
        driver.step(CHUNK)
    manager.free(driver.request)
    assert_pool_empty(manager)


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("chunk", [CHUNK, 1000])
def test_tail_only_prompt_within_sink_and_window_keeps_every_block(model_config, chunk: int, lag: int) -> None:
    """A prompt ending within sink + prefill window: tail-only streaming groups keep every block
    of it real, at every step, so a continuing chunk there can attend its own and all earlier
    keys from the cache (the impl's causal FA3 path for streaming slots). With a prompt
    three chunks longer, early blocks past the sink are freed (the control)."""
    window = 1024
    config = make_vllm_config(model_config, max_model_len=8192, max_num_batched_tokens=chunk,
                              async_scheduling=bool(lag))
    for prompt, all_real in ((SINK + window, True), (SINK + window + 3 * chunk, False)):
        manager = kv_cache_manager(config, kv_cache_config(config, duo_specs(random_mask(), window, 1 + lag), 2000))
        driver = Driver(manager, make_request("r", prompt, 10), Window(SINK, RECENT, window, True), lag)
        kept = True
        while driver.request.num_computed_tokens < prompt:
            driver.step(min(chunk, prompt - driver.request.num_computed_tokens))
            end = cdiv(driver.request.num_computed_tokens, BLOCK)
            kept &= all(pos == set(range(end)) for _, pos in held(manager, "r"))
        assert kept == all_real
        manager.free(driver.request)
