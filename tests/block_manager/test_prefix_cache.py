"""Prefix-cache hits on streaming slots must bring the sink blocks back, never the null block."""

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
    kv_cache_config,
    kv_cache_manager,
    make_request,
    make_vllm_config,
    random_mask,
    request_from_tokens,
)
from tests.block_manager.test_scheduler import _runner_output
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


def test_sparse_retention_keeps_sink_blocks_cached() -> None:
    spec = duo_specs(random_mask())
    duo = next(s for s in spec.values() if isinstance(s, DuoStreamingSpec))
    args = dict(start_block=0, end_block=64, alignment_tokens=BLOCK, kv_cache_spec=duo, use_eagle=False,
                retention_interval=0, reachable_boundaries=(PROMPT - 1,))
    assert not any(SlidingWindowManager.reachable_block_mask(**args)[:NUM_SINK])
    mask = DuoStreamingManager.reachable_block_mask(**args)
    assert all(mask[:NUM_SINK])
    assert mask[NUM_SINK:] == SlidingWindowManager.reachable_block_mask(**args)[NUM_SINK:]


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
