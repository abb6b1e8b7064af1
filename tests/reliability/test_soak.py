"""CPU soak: 1,000 seeded requests through vLLM's real scheduler and KV-cache manager with
duo specs, under preemption and aborts. Each finished request must equal its solo run, no
step may read a freed or foreign block, and every block must be back in the pool. With prefix
caching (shared prefixes, multi-turn conversations) hits must happen and no hit may read a
block overwritten since it was cached."""

from __future__ import annotations

import dataclasses

import pytest
from vllm.v1.core.block_pool import BlockPool

from tests.reliability.sim import SOAK_RUNS, run_soak, write_model_dir
from vllm_duo.block_manager import DuoStreamingManager


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_model_dir(str(tmp_path_factory.mktemp("llama3-8b-shape")))


@pytest.mark.parametrize("name", list(SOAK_RUNS))
def test_soak(model_dir: str, name: str) -> None:
    cfg = SOAK_RUNS[name]
    r = run_soak(model_dir, cfg)
    if cfg.chat_turns:
        assert r.requests == cfg.num_requests + r.turns and r.turns > cfg.num_requests // 2
        assert r.aborts + r.finished == r.requests and r.aborts >= cfg.abort_fraction * cfg.num_requests
    else:
        assert r.requests == 1000 and r.aborts == 100 and r.finished == 900
    assert r.preemptions > 0, "the KV budget did not force any preemption"
    assert not r.mismatches, r.mismatches[:5]
    assert r.leaked_blocks == 0
    if cfg.prefix_caching:
        # Later turns resend their history: most of it comes from the cache.
        assert r.cached_tokens_turns > 0.5 * r.cached_tokens > 0, (r.cached_tokens, r.cached_tokens_turns)
    else:
        assert r.cached_tokens == 0


# The soak's checks are not vacuous: a manager that frees one block too many, or a pool that
# loses a block, is caught within a few dozen requests.
SMALL = dataclasses.replace(SOAK_RUNS["sync"], num_requests=40)


def test_soak_catches_a_freed_block_read(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    original = DuoStreamingManager.remove_skipped_blocks

    def over_free(self, request_id: str, processed: int, num_prompt_tokens: int | None = None) -> None:
        original(self, request_id, processed + self.block_size, num_prompt_tokens)

    monkeypatch.setattr(DuoStreamingManager, "remove_skipped_blocks", over_free)
    with pytest.raises(AssertionError, match="freed or foreign block read"):
        run_soak(model_dir, SMALL)


def test_soak_catches_a_leak(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    original, calls = BlockPool.free_blocks, []

    def leak_one(self, blocks) -> None:
        blocks = list(blocks)
        calls.append(1)
        original(self, blocks[1:] if len(calls) == 50 else blocks)

    monkeypatch.setattr(BlockPool, "free_blocks", leak_one)
    with pytest.raises(AssertionError, match="out of the pool but requests hold"):
        run_soak(model_dir, SMALL)


PREFIX = dataclasses.replace(SOAK_RUNS["async-tail-only-prefix"], num_requests=60)


def test_soak_catches_a_stale_prefix_hit(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool that reuses a cached block but keeps its old hash findable lets a later hit map
    overwritten keys: the shadow contents catch it."""

    def evict_but_keep_findable(self: BlockPool, block) -> bool:
        self.cached_block_hashes_by_block.pop(block.block_id, None)
        block.reset_hash()  # the block may be cached anew; its old hash still maps to it
        return False

    monkeypatch.setattr(BlockPool, "_maybe_evict_cached_block", evict_but_keep_findable)
    with pytest.raises(AssertionError, match="stale read"):
        run_soak(model_dir, dataclasses.replace(PREFIX, num_blocks=1200))
