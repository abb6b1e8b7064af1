"""Duo slots under vLLM's real v1 scheduler: chunked prefill, decode, preemption, abort."""

from __future__ import annotations

from collections import deque

import pytest
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

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
    make_request,
    make_vllm_config,
    random_mask,
)

PREFILL_WINDOW = 1024
TOKEN = 7
LENGTHS = [(2000, 1800), (1700, 2000), (2300, 1200), (1200, 500), (900, 50)]  # (prompt, decode)


def _runner_output(scheduler: Scheduler, out: SchedulerOutput) -> ModelRunnerOutput:
    """What the model runner returns: one sampled token per request done with its prompt."""
    ids = list(out.num_scheduled_tokens)
    sampled = [[] if scheduler.requests[i].is_prefill_chunk else [TOKEN] for i in ids]
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=sampled)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_requests_live_and_die_under_pressure(model_config, async_scheduling: bool) -> None:
    config = make_vllm_config(model_config, max_model_len=4096, max_num_batched_tokens=512,
                              max_num_seqs=4, async_scheduling=async_scheduling)
    # ~2 requests' worth of blocks, so decode growth forces preemption.
    cfg = kv_cache_config(config, duo_specs(random_mask(2), PREFILL_WINDOW), num_blocks=400)
    config.cache_config.num_gpu_blocks = cfg.num_blocks  # as EngineCore sets it
    scheduler = (AsyncScheduler if async_scheduling else Scheduler)(
        vllm_config=config, kv_cache_config=cfg, block_size=BLOCK,
        structured_output_manager=StructuredOutputManager(config))
    manager = scheduler.kv_cache_manager
    window = Window(SINK, RECENT, PREFILL_WINDOW)
    requests = [make_request(f"r{i}", p, d, seed=i) for i, (p, d) in enumerate(LENGTHS)]
    for r in requests:
        scheduler.add_request(r)

    pending: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
    aborted = False
    for _ in range(5000):
        out = scheduler.schedule()
        for req_id in out.num_scheduled_tokens:
            assert_footprint(manager, scheduler.requests[req_id], window)
        used = manager.block_pool.num_gpu_blocks - 1 - manager.block_pool.get_num_free_blocks()
        assert used == sum(len(pos) for r in scheduler.requests for _, pos in held(manager, r))
        if out.num_scheduled_tokens:
            pending.append((out, _runner_output(scheduler, out)))
        if len(pending) > int(async_scheduling) or not out.num_scheduled_tokens:
            if pending:
                scheduler.update_from_output(*pending.popleft())
        if not aborted and requests[3].num_output_tokens >= 20:
            scheduler.finish_requests(requests[3].request_id, RequestStatus.FINISHED_ABORTED)
            assert all(not pos for _, pos in held(manager, requests[3].request_id))
            aborted = True
        if not scheduler.has_requests() and not pending:
            break
    else:
        pytest.fail("requests did not finish")

    assert aborted
    assert sum(r.num_preemptions for r in requests) > 0
    for r, (_, decode) in zip(requests, LENGTHS, strict=True):
        if r is not requests[3]:
            assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED and r.num_output_tokens == decode
    assert_pool_empty(manager)
