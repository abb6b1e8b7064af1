"""Prefix-cache hits on streaming slots must bring the sink blocks back, never the null block;
multi-turn conversations resume where the last turn ended, on vLLM's real scheduler."""

from __future__ import annotations

import numpy as np
import pytest
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.structured_output import StructuredOutputManager

from tests.block_manager.conftest import (
    BLOCK,
    RECENT,
    SINK,
    Window,
    assert_footprint,
    assert_pool_empty,
    duo_specs,
    full_specs,
    kv_cache_config,
    kv_cache_manager,
    make_request,
    make_vllm_config,
    random_mask,
    request_from_tokens,
)
from tests.block_manager.test_scheduler import _runner_output
from tests.reliability.sim import FakeRunner, check_pool
from vllm_duo.block_manager import DuoStreamingManager, DuoStreamingSpec

PROMPT = 1000
NUM_SINK = cdiv(SINK, BLOCK)


@pytest.mark.parametrize("retrieval", [0.5, 0.0])  # hybrid coordinator; one group (unitary)
def test_hit_reuses_sink_and_window_and_a_lost_sink_bounds_it(model_config, retrieval: float) -> None:
    config = make_vllm_config(model_config, max_model_len=4096, max_num_batched_tokens=512,
                              enable_prefix_caching=True)
    cfg = kv_cache_config(config, duo_specs(random_mask(0, retrieval)), 2000)
    assert (len(cfg.kv_cache_groups) == 1) == (retrieval == 0)
    manager = kv_cache_manager(config, cfg)
    streaming = [i for i, s in enumerate(manager.coordinator.single_type_managers)
                 if isinstance(s.kv_cache_spec, DuoStreamingSpec)]

    first = make_request("a", PROMPT, 4)
    for n in (512, PROMPT - 512):
        assert manager.allocate_slots(first, n) is not None
        first.num_computed_tokens += n
    sinks = [b.block_id for b in manager.get_blocks("a").blocks[streaming[0]][:NUM_SINK]]
    manager.free(first)

    second = make_request("b", PROMPT, 4)  # same prompt
    blocks, hit = manager.get_computed_blocks(second)[:2]
    assert hit == (PROMPT - 1) // BLOCK * BLOCK
    window_start = (hit - RECENT + 1) // BLOCK
    for g in streaming:
        group = blocks.blocks[g]
        assert all(not b.is_null for b in group[:NUM_SINK])
        assert all(b.is_null for b in group[NUM_SINK:window_start])
        assert all(not b.is_null for b in group[window_start:])
    assert [b.block_id for b in blocks.blocks[streaming[0]][:NUM_SINK]] == sinks
    assert manager.allocate_slots(second, PROMPT - hit, hit, blocks) is not None
    second.num_computed_tokens = PROMPT
    assert_footprint(manager, second, Window(SINK, RECENT, RECENT))
    manager.free(second)

    manager.block_pool.evict_blocks({sinks[2]})
    blocks, hit = manager.get_computed_blocks(make_request("c", PROMPT, 4))[:2]
    assert hit == 2 * BLOCK  # the sink blocks before the lost one
    assert all(not b.is_null for g in streaming for b in blocks.blocks[g])
    assert_pool_empty(manager)


@pytest.mark.parametrize("retention", [None, 0, 64 * BLOCK], ids=["dense", "sparse", "interval"])
def test_streaming_blocks_are_cached_as_densely_as_full_attention(retention: int | None) -> None:
    """vLLM's sliding-window retention interval (0.33's default 0 keeps only each prompt's replay
    tail) does not thin streaming slots: at block alignment every block is cached; at a coarser
    one (a KV connector's chunk), a window's tail before every aligned boundary and the sink."""
    spec = duo_specs(random_mask())
    duo = next(s for s in spec.values() if isinstance(s, DuoStreamingSpec))
    args = dict(start_block=0, end_block=128, kv_cache_spec=duo, use_eagle=False,
                retention_interval=retention, reachable_boundaries=(PROMPT - 1,))
    assert DuoStreamingManager.reachable_block_mask(alignment_tokens=BLOCK, **args) is None
    if retention is not None:  # control: sliding window's own mask drops blocks
        assert not all(SlidingWindowManager.reachable_block_mask(alignment_tokens=BLOCK, **args))
    chunk = 32 * BLOCK  # longer than the window's 16 blocks: each chunk's head is unreachable
    dense = SlidingWindowManager.reachable_block_mask(alignment_tokens=chunk,
                                                      **(args | {"retention_interval": None}))
    assert not any(dense[:NUM_SINK]) and sum(dense) == 4 * 16
    mask = DuoStreamingManager.reachable_block_mask(alignment_tokens=chunk, **args)
    assert mask == [True] * NUM_SINK + dense[NUM_SINK:]


def test_shared_prefix_batch_hits_through_the_scheduler(model_config) -> None:
    """The GPU test's scenario on vLLM's real scheduler: a warm-up request caches a 6,000-token
    prefix, then each of 8 prompts sharing it is scheduled with the whole prefix as a hit."""
    config = make_vllm_config(model_config, max_model_len=8192, max_num_batched_tokens=8192,
                              enable_prefix_caching=True)
    cfg = kv_cache_config(config, duo_specs(random_mask(1)), 4000)
    config.cache_config.num_gpu_blocks = cfg.num_blocks
    scheduler = Scheduler(vllm_config=config, kv_cache_config=cfg, block_size=BLOCK, log_stats=True,
                          structured_output_manager=StructuredOutputManager(config))
    rng = np.random.default_rng(7)
    prefix = rng.integers(0, 1000, 6000).tolist()

    def run(prompts: list[list[int]]) -> tuple[int, int]:
        for i, prompt in enumerate(prompts):
            scheduler.add_request(request_from_tokens(f"{len(prompts)}-{i}", prompt, 4))
        queries = hits = 0
        while scheduler.has_requests():
            out = scheduler.schedule()
            for eco in scheduler.update_from_output(out, _runner_output(scheduler, out)).values():
                queries += eco.scheduler_stats.prefix_cache_stats.queries
                hits += eco.scheduler_stats.prefix_cache_stats.hits
        return queries, hits

    assert run([prefix + [5]]) == (6001, 0)
    prompts = [prefix + rng.integers(0, 1000, int(n)).tolist() for n in rng.integers(50, 400, 8)]
    queries, hits = run(prompts)
    assert queries == sum(map(len, prompts)) and hits == 8 * (len(prefix) // BLOCK * BLOCK)
    assert_pool_empty(scheduler.kv_cache_manager)


def _scheduler(model_config, specs_of, *, tail_only: bool, prefill_window: int = RECENT,
               num_blocks: int = 6000, budget: int = 512, retention: int | None | str = "default",
               ) -> Scheduler:
    """vLLM's scheduler with prefix caching on, chunks of ``budget`` tokens (tail-only slots null
    every chunk's middle), duo slots (``specs_of`` = duo) or the stock model (``full_specs``).
    ``retention``: vLLM's sliding-window retention interval, else the installed vLLM's default
    (0.26: None, dense; 0.33: 0, the prompt's replay boundary only)."""
    config = make_vllm_config(model_config, max_model_len=32768, max_num_batched_tokens=budget,
                              enable_prefix_caching=True)
    tail = config.max_concurrent_batches if tail_only else 0
    specs = specs_of(prefill_window, tail) if specs_of is not None else full_specs()
    cfg = kv_cache_config(config, specs, num_blocks)
    config.cache_config.num_gpu_blocks = cfg.num_blocks
    scheduler = Scheduler(vllm_config=config, kv_cache_config=cfg, block_size=BLOCK,
                          structured_output_manager=StructuredOutputManager(config))
    if retention != "default":
        # Read by the coordinator's cache_blocks on each call (0.26, 0.33).
        scheduler.kv_cache_manager.coordinator.retention_interval = retention
    return scheduler


def _duo(prefill_window: int, tail: int):
    return duo_specs(random_mask(3), prefill_window, tail)


def _serve(scheduler: Scheduler, runner: FakeRunner, requests: list) -> None:
    for r in requests:
        scheduler.add_request(r)
    while scheduler.has_requests():
        out = scheduler.schedule()
        check_pool(scheduler)
        scheduler.update_from_output(out, runner.execute(out))


def _conversation(scheduler: Scheduler, turns: int = 8, seed: int = 0) -> tuple[list[int], list[int]]:
    """8 turns, each appending 200-2,000 new tokens to the last prompt and its output: the hit of
    each turn and the tokens the turn before had computed."""
    rng = np.random.default_rng(seed)
    runner, hits, computed = FakeRunner(scheduler), [], []
    history: list[int] = []
    for k in range(turns):
        prompt = history + rng.integers(0, 1000, int(rng.integers(200, 2001))).tolist()
        request = request_from_tokens(f"turn{k}", prompt, int(rng.integers(20, 300)))
        _serve(scheduler, runner, [request])
        hits.append(runner.hits[request.request_id])
        history = prompt + list(request.output_token_ids)
        computed.append(len(history) - 1)  # the last sampled token's K/V is never computed
    assert_pool_empty(scheduler.kv_cache_manager)
    return hits, computed


@pytest.mark.parametrize("retention", [None, 0], ids=["dense", "sparse"])  # 0.26 and 0.33 defaults
@pytest.mark.parametrize("tail_only", [True, False], ids=["window", "rswa"])
def test_each_turn_resumes_where_the_last_one_ended(model_config, tail_only: bool,
                                                    retention: int | None) -> None:
    """Each turn hits everything the turn before computed (block-floored), as full attention does:
    the last chunk's window and every decode block are real, so the end of a turn is resumable.
    vLLM's sparse retention of sliding-window blocks (0.33's default) must not change that."""
    duo = _conversation(_scheduler(model_config, _duo, tail_only=tail_only, retention=retention))
    fa = _conversation(_scheduler(model_config, None, tail_only=False, retention=retention))
    hits, computed = duo
    assert hits[0] == 0 and hits[1:] == [c // BLOCK * BLOCK for c in computed[:-1]]
    assert duo == fa


def test_sliding_window_caching_would_lose_the_end_of_each_turn(model_config, monkeypatch) -> None:
    """Control: caching streaming slots as sliding window does under sparse retention keeps only
    each prompt's replay tail (and no sink), so a turn resumes short of where the last one ended."""
    monkeypatch.setattr(DuoStreamingManager, "reachable_block_mask",
                        SlidingWindowManager.__dict__["reachable_block_mask"])
    hits, computed = _conversation(_scheduler(model_config, _duo, tail_only=False, retention=0))
    assert all(h < c // BLOCK * BLOCK for h, c in zip(hits[1:], computed, strict=False))


def test_a_wider_prefill_window_caches_prompt_blocks_only(model_config) -> None:
    """Decoded keys (recent window) differ from what a cold prompt computes (prefill window):
    each turn resumes at the end of the last prompt, not of its output."""
    rng = np.random.default_rng(0)
    scheduler = _scheduler(model_config, _duo, tail_only=True, prefill_window=1024)
    runner, history = FakeRunner(scheduler), []
    for k in range(4):
        prompt = history + rng.integers(0, 1000, int(rng.integers(200, 2001))).tolist()
        request = request_from_tokens(f"turn{k}", prompt, 100)
        _serve(scheduler, runner, [request])
        if k:
            assert runner.hits[request.request_id] == last_prompt // BLOCK * BLOCK
        history, last_prompt = prompt + list(request.output_token_ids), len(prompt)
    assert_pool_empty(scheduler.kv_cache_manager)


@pytest.mark.parametrize("retention", [None, 0], ids=["dense", "sparse"])  # 0.26 and 0.33 defaults
def test_hit_snaps_back_to_a_chunk_end_and_is_the_minimum_over_groups(model_config,
                                                                     retention: int | None) -> None:
    """Tail-only slots hold only each chunk's last window: a prompt sharing 3,000 tokens of a cached
    one resumes at the last chunk end before them (2,560), though retrieval slots hold 2,992."""
    scheduler = _scheduler(model_config, _duo, tail_only=True, retention=retention)
    runner = FakeRunner(scheduler)
    rng = np.random.default_rng(1)
    first = rng.integers(0, 1000, 5000).tolist()
    _serve(scheduler, runner, [request_from_tokens("a", first, 4)])
    second = request_from_tokens("b", first[:3000] + rng.integers(1000, 2000, 500).tolist(), 4)
    coordinator = scheduler.kv_cache_manager.coordinator
    blocks, per_group = coordinator.find_longest_cache_hit_per_group(second.block_hashes, second.num_tokens - 1)
    streaming = [isinstance(s.kv_cache_spec, DuoStreamingSpec) for s in coordinator.single_type_managers]
    assert {h for h, s in zip(per_group, streaming, strict=True) if not s} == {3000 // BLOCK * BLOCK}
    assert {h for h, s in zip(per_group, streaming, strict=True) if s} == {2560}
    hit_blocks, hit, _ = coordinator.find_longest_cache_hit(second.block_hashes, second.num_tokens - 1)
    assert hit == min(per_group) == 2560
    window_start = (hit - RECENT + 1) // BLOCK
    for group, is_streaming in zip(hit_blocks, streaming, strict=True):
        assert len(group) == hit // BLOCK
        real = [not b.is_null for b in group]
        if is_streaming:
            assert real == [i < NUM_SINK or i >= window_start for i in range(len(group))]
        else:
            assert all(real)
    # What the first chunk after the hit takes from the pool is what the manager said it would:
    # the touched hit blocks (all evictable here) and the chunk's real blocks, not its null middle.
    manager, chunk = scheduler.kv_cache_manager, 512
    need = coordinator.get_num_blocks_to_allocate(
        request_id="b", num_tokens=hit + chunk, new_computed_blocks=hit_blocks, num_encoder_tokens=0,
        total_computed_tokens=hit, num_local_computed_tokens=hit, num_tokens_main_model=hit + chunk)
    free = manager.block_pool.get_num_free_blocks()
    scheduler.add_request(second)
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"b": chunk}
    assert free - manager.block_pool.get_num_free_blocks() == need
    scheduler.update_from_output(out, runner.execute(out))
    _serve(scheduler, runner, [])
    assert runner.hits["b"] == 2560
    assert_pool_empty(scheduler.kv_cache_manager)
