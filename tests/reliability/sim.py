"""Drive vLLM's real v1 scheduler and KV-cache manager with duo specs and a fake model.

The fake model runner mirrors what vLLM's GPU model runner keeps per request (token ids,
block tables, rebuilt on resume from preemption) and "samples" the next token as a hash
of (request id, position, previous token): a request's tokens do not depend on batching,
preemption or aborts of others, so each finished request must equal its solo run. Every
step the runner also checks that each block its attention would read (all blocks for a
retrieval head; sink + window for a streaming head) is, in the scheduler's books, still
held by that request at that position: a freed or foreign block read is caught at once.
With prefix caching, the runner also keeps a shadow of every block's contents (a fingerprint of
the token prefix written at each slot) and checks each read against the reader's own prefix:
a prefix hit that maps a block overwritten since it was cached is caught as a stale read.
Shared by the CPU soak test, ``benchmarks/soak_cpu.py`` and (as a model) the GPU soak.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from vllm import SamplingParams
from vllm.config import ModelConfig
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import KVCacheConfig
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from tests.block_manager.conftest import (
    BLOCK,
    LLAMA3_8B,
    RECENT,
    SINK,
    Window,
    assert_footprint,
    duo_specs,
    held,
    kv_cache_config,
    make_vllm_config,
    random_mask,
)
from vllm_duo.block_manager import DuoStreamingSpec, register_duo_kv_cache_spec
from vllm_duo.options import DEFAULT_PREFILL_RECENT

VOCAB = LLAMA3_8B["vocab_size"]
NULL_BLOCK = 0


def fake_token(request_id: str, position: int, previous: int) -> int:
    """The fake model: the token at ``position`` given the one before it (batch-independent)."""
    return zlib.crc32(f"{request_id}|{position}|{previous}".encode()) % VOCAB


def solo_output(request_id: str, prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake model produces for one request served alone."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_token(request_id, len(tokens), tokens[-1]))
    return tokens[len(prompt):]


@dataclass(frozen=True)
class SoakConfig:
    """Workload and engine sizes; the defaults are the CI soak."""

    num_requests: int = 1000
    min_prompt: int = 10
    max_prompt: int = 16384  # prompt lengths are log-uniform in [min_prompt, max_prompt]
    max_tokens: int = 24  # decode lengths uniform in [1, max_tokens]
    long_decode_fraction: float = 0.03  # these decode past the recent window (frees in decode)
    long_decode_tokens: int = 400
    abort_fraction: float = 0.1
    num_blocks: int = 2000  # KV pool (block ids); small enough to force preemption
    # vLLM's default admits a prompt only if all of it fits (preemption then happens in
    # decode); False admits by the first chunk, so prefills preempt each other too.
    reserve_full_isl: bool = False
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_window: int = 1024
    arrivals_per_step: int = 4
    async_scheduling: bool = False
    # Streaming slots store only each chunk's last window (streaming_prefill="window").
    tail_only: bool = False
    check_every: int = 10  # steps between whole-pool ownership checks
    seed: int = 0
    # Prefix caching, and a workload that hits it: a share of the requests start with one of
    # a few shared prefixes (system prompts), and conversations whose turn k + 1 is turn k's
    # prompt + output + new tokens, sent when turn k finishes.
    prefix_caching: bool = False
    num_shared_prefixes: int = 0
    shared_prefix_lengths: tuple[int, int] = (300, 3000)
    shared_prefix_fraction: float = 0.5
    chat_turns: int = 0  # turns per conversation (0: no conversations)
    chat_fraction: float = 0.5  # of requests that start a conversation
    chat_growth: tuple[int, int] = (30, 800)  # new tokens per turn

    @property
    def max_model_len(self) -> int:
        return self.max_prompt + max(self.max_tokens, self.long_decode_tokens)


# The CI soak runs (tests/reliability/test_soak.py, benchmarks/soak_cpu.py), 1,000 requests each.
SOAK_RUNS = {
    # Admission by first chunk: prefills and decodes preempt each other (hundreds of preemptions).
    "sync": SoakConfig(),
    # The same under async scheduling (one step in flight; resumed requests rebuilt from the scheduler).
    "async": SoakConfig(async_scheduling=True, max_tokens=64, seed=2),
    # vLLM's default admission (the whole prompt must fit): preemption only in decode, and rare,
    # since streaming heads free blocks when decode narrows their window.
    "async-full-isl": SoakConfig(reserve_full_isl=True, async_scheduling=True, max_tokens=128, seed=1),
    # Tail-only streaming slots (the window prefill kernel): chunk middles are never stored.
    "async-tail-only": SoakConfig(tail_only=True, async_scheduling=True, max_tokens=64, seed=3),
    # Prefix caching on (duo's default) with tail-only slots: shared system prompts and 6-turn
    # conversations, hits checked against a shadow of every block's contents.
    "async-tail-only-prefix": SoakConfig(
        tail_only=True, async_scheduling=True, max_tokens=64, seed=4, prefix_caching=True,
        num_shared_prefixes=4, chat_turns=6, prefill_window=RECENT, num_requests=400, max_prompt=8192),
    # The shipped defaults: tail-only slots, prefix caching, and the default prefill window (8192,
    # wider than the recent one), prompts to 16K so long ones slide it; conversations resume at
    # their last prompt's end (streaming groups cache prompt blocks only).
    "async-tail-only-prefix-default": SoakConfig(
        tail_only=True, async_scheduling=True, max_tokens=64, seed=6, prefix_caching=True,
        num_shared_prefixes=4, chat_turns=6, prefill_window=DEFAULT_PREFILL_RECENT, num_requests=400),
    # The same with every prompt token stored ("rswa") and a prefill window wider than the recent one.
    "sync-prefix": SoakConfig(seed=5, prefix_caching=True, num_shared_prefixes=4, chat_turns=6,
                              num_requests=400, max_prompt=8192),
}


@dataclass
class SoakResult:
    requests: int = 0
    finished: int = 0
    aborts: int = 0
    aborted_while: dict[str, int] = field(default_factory=dict)  # status and phase at abort
    preemptions: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    leaked_blocks: int = -1
    pool_blocks: int = 0
    turns: int = 0  # conversation turns after the first (each resends the whole history)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (num_cached_tokens)
    cached_tokens_turns: int = 0  # of which in later conversation turns
    # Prompt chunks scheduled, and those of one token past the first position: the kernels take
    # such a row for a decode step, whose streaming window is the recent one (README Limitations).
    prompt_chunks: int = 0
    one_token_prompt_chunks: int = 0
    mismatches: list[str] = field(default_factory=list)  # requests whose tokens differ from their solo run


class FakeRunner:
    """The model runner's per-request state, kept only from what the scheduler sends."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.specs = [g.kv_cache_spec for g in scheduler.kv_cache_config.kv_cache_groups]
        self.tokens: dict[str, list[int]] = {}
        self.prompt_len: dict[str, int] = {}
        self.tables: dict[str, list[list[int]]] = {}
        # Shadow KV contents: block id -> per slot, a fingerprint of the token prefix written there.
        self.check_contents = scheduler.kv_cache_manager.enable_caching
        self.shadow: dict[int, list[int | None]] = {}
        self.prints: dict[str, list[int]] = {}
        self.hits: dict[str, int] = {}  # prompt tokens served from the prefix cache, per request
        # Per request and group: position -> block whose contents were checked there.
        self.verified: dict[str, list[dict[int, int]]] = {}

    def _fingerprints(self, rid: str, end: int) -> list[int]:
        """fp[p] identifies tokens[0..p]: equal fingerprints, equal K/V at p in every layer."""
        fps, tokens = self.prints.setdefault(rid, []), self.tokens[rid]
        for p in range(len(fps), end):
            fps.append(hash((fps[-1] if fps else 0, tokens[p])))
        return fps

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_req_ids:
            for d in (self.tokens, self.prompt_len, self.tables, self.prints, self.verified):
                d.pop(rid, None)
        computed: dict[str, int] = {}
        for new in out.scheduled_new_reqs:
            self.tokens[new.req_id] = list(new.prompt_token_ids)
            self.prompt_len[new.req_id] = len(new.prompt_token_ids)
            self.tables[new.req_id] = [list(b) for b in new.block_ids]
            computed[new.req_id] = new.num_computed_tokens
            self.hits.setdefault(new.req_id, new.num_computed_tokens)  # first schedule, not a resume
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            computed[rid] = cached.num_computed_tokens[i]
            blocks = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                self.tables[rid] = [list(b) for b in blocks]
                self.verified.pop(rid, None)  # a resumed request may be handed cached blocks anew
            elif blocks is not None:
                for table, new_ids in zip(self.tables[rid], blocks, strict=True):
                    table.extend(new_ids)
            if rid in cached.all_token_ids:  # not scheduled last step: resync, as the runner does
                n_out = cached.num_output_tokens[i]
                all_ids = cached.all_token_ids[rid]
                self.tokens[rid] = all_ids[:self.prompt_len[rid]] + (all_ids[-n_out:] if n_out else [])
        ids = list(out.num_scheduled_tokens)
        sampled: list[list[int]] = []
        # Each layer writes the step's K/V of every request before any attention reads.
        if self.check_contents:
            for rid in ids:
                self._write(rid, computed[rid], computed[rid] + out.num_scheduled_tokens[rid])
        for rid in ids:
            start, tokens = computed[rid], self.tokens[rid]
            end = start + out.num_scheduled_tokens[rid]
            assert end <= len(tokens), f"{rid}: scheduled up to {end} but only {len(tokens)} tokens are known"
            self._check_reads(rid, start, end)
            if end == len(tokens):
                tokens.append(fake_token(rid, end, tokens[-1]))
                sampled.append([tokens[-1]])
            else:
                sampled.append([])  # a prompt chunk: the runner discards its sample
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                 sampled_token_ids=sampled)

    def _write(self, rid: str, start: int, end: int) -> None:
        fps = self._fingerprints(rid, end)
        for table in self.tables[rid]:
            for j in range(start // BLOCK, (end - 1) // BLOCK + 1):
                if table[j] == NULL_BLOCK:
                    continue  # a tail-only chunk middle: written into the null block, never read
                slots = self.shadow.setdefault(table[j], [None] * BLOCK)
                lo, hi = max(start, j * BLOCK), min(end, (j + 1) * BLOCK)
                slots[lo - j * BLOCK:hi - j * BLOCK] = fps[lo:hi]

    def _check_contents(self, rid: str, g: int, block: int, j: int, start: int, lo: int) -> None:
        """Keys [max(lo, j * BLOCK), start) of block ``j`` hold this request's own prefix.

        Checked the first time the request reads that block at ``j``: its later keys there are
        the request's own writes, and no one else writes a block the request holds."""
        first, last = max(lo, j * BLOCK), min(start, (j + 1) * BLOCK)
        if first >= last:
            return
        got = self.shadow.get(block, [None] * BLOCK)[first - j * BLOCK:last - j * BLOCK]
        if got != self.prints[rid][first:last]:
            raise AssertionError(f"{rid}: group {g} reads block {block} at position {j}, whose keys "
                                 f"[{first}, {last}) were written for another prefix (stale read)")

    def _check_reads(self, rid: str, start: int, end: int) -> None:
        """Every block attention reads for queries [start, end) is this request's, per the scheduler."""
        managers = self.scheduler.kv_cache_manager.coordinator.single_type_managers
        last = (end - 1) // BLOCK
        verified = self.verified.setdefault(rid, [{} for _ in self.specs])
        for g, (spec, single) in enumerate(zip(self.specs, managers, strict=True)):
            window_lo = 0
            if isinstance(spec, DuoStreamingSpec):
                # The window is fixed by the chunk's first query, as the manager and builder do.
                window = spec.sliding_window if start < self.prompt_len[rid] else spec.recent_size
                window_lo = max(0, start - window + 1)
                first = window_lo // BLOCK
                # The window kernel reads a chunk's own keys from the step's K/V, not the cache
                # (a one-token step goes through the decode kernel, which reads its own slot).
                cache_last = (start - 1) // BLOCK if spec.tail_only_batches and end - start > 1 else last
                reads = [*range(min(spec.num_sink_blocks, first, cache_last + 1)),
                         *range(first, cache_last + 1)]
            else:
                reads = range(last + 1)
            owned, table = single.req_to_blocks[rid], self.tables[rid][g]
            for j in reads:
                assert table[j] != NULL_BLOCK and owned[j].block_id == table[j], (
                    f"{rid}: group {g} reads block {table[j]} at position {j}, but the scheduler "
                    f"has {owned[j].block_id} there (freed or foreign block read)")
                if self.check_contents and verified[g].get(j) != table[j]:
                    sink_end = spec.sink_size if isinstance(spec, DuoStreamingSpec) else start
                    self._check_contents(rid, g, table[j], j, min(start, sink_end), 0)
                    self._check_contents(rid, g, table[j], j, start, window_lo)
                    verified[g][j] = table[j]


def check_pool(scheduler: Scheduler, out: SchedulerOutput | None = None,
               window: Window | None = None) -> None:
    """No block is held twice, the pool's free count matches what requests hold, and (given
    a step just scheduled) each scheduled request holds exactly its duo footprint."""
    manager = scheduler.kv_cache_manager
    if out is not None and window is not None:
        for rid in out.num_scheduled_tokens:
            assert_footprint(manager, scheduler.requests[rid], window)
    holders: dict[int, set[tuple[int, str]]] = {}
    for g, single in enumerate(manager.coordinator.single_type_managers):
        for rid, blocks in single.req_to_blocks.items():
            for b in blocks:
                if not b.is_null:
                    who = holders.setdefault(b.block_id, set())
                    assert (g, rid) not in who, f"block {b.block_id} held twice by {rid}"
                    assert not who or {h[0] for h in who} == {g}, f"block {b.block_id} in two groups"
                    who.add((g, rid))
    pool = manager.block_pool
    for block_id, who in holders.items():  # a prefix hit shares a block: one reference per holder
        assert pool.blocks[block_id].ref_cnt == len(who), \
            f"block {block_id} has {pool.blocks[block_id].ref_cnt} references but {len(who)} holders"
    used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # block 0 is the null block
    assert used == len(holders), f"{used} blocks are out of the pool but requests hold {len(holders)}"


def make_scheduler(model_dir: str, cfg: SoakConfig) -> Scheduler:
    """vLLM's scheduler over a duo KV pool of ``cfg.num_blocks`` (Llama-3-8B shape, 50% retrieval)."""
    register_duo_kv_cache_spec()
    init_none_hash(sha256)
    model_config = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16",
                               max_model_len=cfg.max_model_len)
    config = make_vllm_config(model_config, max_model_len=cfg.max_model_len,
                              max_num_batched_tokens=cfg.max_num_batched_tokens,
                              max_num_seqs=cfg.max_num_seqs, async_scheduling=cfg.async_scheduling,
                              enable_prefix_caching=cfg.prefix_caching)
    tail_only = config.max_concurrent_batches if cfg.tail_only else 0
    kv: KVCacheConfig = kv_cache_config(config, duo_specs(random_mask(cfg.seed), cfg.prefill_window, tail_only),
                                        num_blocks=cfg.num_blocks)
    config.cache_config.num_gpu_blocks = kv.num_blocks  # as EngineCore sets it
    config.scheduler_config.scheduler_reserve_full_isl = cfg.reserve_full_isl
    cls = AsyncScheduler if cfg.async_scheduling else Scheduler
    return cls(vllm_config=config, kv_cache_config=kv, block_size=BLOCK,
               structured_output_manager=StructuredOutputManager(config))


def write_model_dir(path: str, **overrides: object) -> str:
    """A config.json-only Llama-3-8B-shaped model folder (nothing is downloaded)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(LLAMA3_8B, **overrides), f)
    return path


class Workload:
    """Seeded requests: first turns up front, later conversation turns made when the turn before
    finishes. Aborted requests (decode >= 2, so they cannot finish before the abort point) get
    the computed-token count to abort at and whether to abort on preemption instead."""

    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        # vLLM's engine hashes full blocks of every request when prefix caching is on.
        self.hasher = get_request_block_hasher(BLOCK, sha256) if cfg.prefix_caching else None
        rng = np.random.default_rng(cfg.seed)
        # Shared prefixes and conversations draw from their own stream: runs without them keep
        # exactly the requests they always had.
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.prefixes = [self.rng.integers(0, VOCAB, int(self.rng.integers(*cfg.shared_prefix_lengths))).tolist()
                         for _ in range(cfg.num_shared_prefixes)]
        self.abort_at: dict[str, tuple[float, bool]] = {}
        self.turn: dict[str, tuple[int, int]] = {}  # request id -> (conversation, turn)
        lo, hi = math.log(cfg.min_prompt), math.log(cfg.max_prompt)
        self.requests = []
        for i in range(cfg.num_requests):
            prompt_len = int(round(math.exp(rng.uniform(lo, hi))))
            decode = cfg.long_decode_tokens if rng.random() < cfg.long_decode_fraction else \
                int(rng.integers(1, cfg.max_tokens + 1))
            prompt = rng.integers(0, VOCAB, prompt_len).tolist()
            if self.prefixes and self.rng.random() < cfg.shared_prefix_fraction:
                prompt = (self.prefixes[int(self.rng.integers(len(self.prefixes)))] + prompt)[:cfg.max_prompt]
            if cfg.chat_turns > 1 and self.rng.random() < cfg.chat_fraction:
                self.turn[f"req-{i}"] = (i, 0)
            self.requests.append(Request(f"req-{i}", prompt, SamplingParams(max_tokens=decode, ignore_eos=True),
                                         None, block_hasher=self.hasher))
        can_abort = [r for r in self.requests if r.sampling_params.max_tokens >= 2]
        chosen = rng.choice(len(can_abort), size=min(len(can_abort), round(cfg.abort_fraction * cfg.num_requests)),
                            replace=False)
        for k in sorted(chosen):
            r = can_abort[k]
            last = r.num_prompt_tokens + r.sampling_params.max_tokens - 2  # computed tokens before the last step
            self.abort_at[r.request_id] = (rng.uniform(0.05, 1.0) * last, bool(rng.random() < 0.5))

    def next_turn(self, done: Request) -> Request | None:
        """Turn k + 1 of a finished turn k: its prompt, its output and new tokens."""
        cfg, rng = self.cfg, self.rng
        if done.request_id not in self.turn or done.status != RequestStatus.FINISHED_LENGTH_CAPPED:
            return None
        conv, k = self.turn[done.request_id]
        prompt = list(done.prompt_token_ids) + list(done.output_token_ids)
        prompt += rng.integers(0, VOCAB, int(rng.integers(*cfg.chat_growth))).tolist()
        if k + 1 >= cfg.chat_turns or len(prompt) + cfg.long_decode_tokens > cfg.max_model_len:
            return None
        decode = int(rng.integers(1, cfg.max_tokens + 1))
        rid = f"req-{conv}-turn{k + 1}"
        if decode >= 2 and rng.random() < cfg.abort_fraction:
            self.abort_at[rid] = (rng.uniform(0.05, 1.0) * (len(prompt) + decode - 2), bool(rng.random() < 0.5))
        self.turn[rid] = (conv, k + 1)
        return Request(rid, prompt, SamplingParams(max_tokens=decode, ignore_eos=True), None,
                       block_hasher=self.hasher)


def run_soak(model_dir: str, cfg: SoakConfig = SoakConfig(),
             progress: Callable[[int], None] | None = None) -> SoakResult:
    """Serve the whole workload; raise AssertionError on the first broken invariant.

    ``progress`` is called after each step with the number of requests done (finished or aborted).
    """
    scheduler = make_scheduler(model_dir, cfg)
    runner = FakeRunner(scheduler)
    workload = Workload(cfg)
    requests, abort_at = list(workload.requests), workload.abort_at
    by_id = {r.request_id: r for r in requests}
    arrivals = deque(requests)
    chained: set[str] = set()
    high_water: dict[str, int] = {}
    window = Window(SINK, RECENT, cfg.prefill_window, tail_only=cfg.tail_only)
    result = SoakResult(pool_blocks=scheduler.kv_cache_manager.block_pool.num_gpu_blocks)
    pending: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()
    max_steps = 200 * cfg.num_requests + 100_000
    while arrivals or scheduler.has_requests() or pending:
        for _ in range(min(cfg.arrivals_per_step, len(arrivals))):
            scheduler.add_request(arrivals.popleft())
        out = scheduler.schedule()
        for rid, n in out.num_scheduled_tokens.items():
            start = by_id[rid].num_computed_tokens - n  # schedule() has advanced it
            if start < by_id[rid].num_prompt_tokens:
                result.prompt_chunks += 1
                result.one_token_prompt_chunks += n == 1 and start > 0
        if result.steps % cfg.check_every == 0:
            check_pool(scheduler, out, window)
        if out.num_scheduled_tokens:
            pending.append((out, runner.execute(out)))
        # Async scheduling keeps one step in flight, as EngineCore's batch queue does.
        if pending and (len(pending) > int(cfg.async_scheduling) or not out.num_scheduled_tokens):
            done, _ = pending[0]
            scheduler.update_from_output(*pending.popleft())
            if progress is not None:
                progress(len(requests) - len(arrivals) - len(scheduler.requests))
            for rid in done.num_scheduled_tokens:
                high_water[rid] = max(high_water.get(rid, 0), by_id[rid].num_computed_tokens)
                if rid not in chained and (nxt := workload.next_turn(by_id[rid])) is not None:
                    chained.add(rid)
                    requests.append(nxt)
                    by_id[nxt.request_id] = nxt
                    arrivals.append(nxt)
        for rid, (at, on_preemption) in list(abort_at.items()):
            req = by_id[rid]
            if req.is_finished():
                del abort_at[rid]
            elif high_water.get(rid, 0) >= at or (on_preemption and req.status == RequestStatus.PREEMPTED):
                phase = "prefill" if high_water.get(rid, 0) < req.num_prompt_tokens else "decode"
                key = f"{req.status.name.lower()} in {phase}"
                result.aborted_while[key] = result.aborted_while.get(key, 0) + 1
                scheduler.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
                assert all(not blocks for _, blocks in held(scheduler.kv_cache_manager, rid))
                result.aborts += 1
                del abort_at[rid]
        result.steps += 1
        assert result.steps < max_steps, "the scheduler stopped making progress"

    manager = scheduler.kv_cache_manager
    result.leaked_blocks = manager.block_pool.num_gpu_blocks - 1 - manager.block_pool.get_num_free_blocks()
    stale = {rid for single in manager.coordinator.single_type_managers for rid in single.req_to_blocks}
    assert not stale, f"the KV-cache manager still tracks {len(stale)} finished requests"
    result.requests = len(requests)
    for r in requests:
        result.preemptions += r.num_preemptions
        hit = runner.hits.get(r.request_id, 0)
        result.cached_tokens += hit
        if workload.turn.get(r.request_id, (0, 0))[1] > 0:
            result.turns += 1
            result.cached_tokens_turns += hit
        result.prompt_tokens += r.num_prompt_tokens
        result.output_tokens += r.num_output_tokens
        expected = solo_output(r.request_id, r.prompt_token_ids, r.sampling_params.max_tokens)
        got = list(r.output_token_ids)
        if r.status == RequestStatus.FINISHED_ABORTED:
            ok = got == expected[:len(got)]  # an aborted request's tokens so far are still its own
        else:
            result.finished += 1
            ok = r.status == RequestStatus.FINISHED_LENGTH_CAPPED and got == expected
        if not ok:
            result.mismatches.append(f"{r.request_id}: {r.status.name}, {len(got)} tokens "
                                     f"(solo run: {len(expected)})")
    return result


__all__ = ["BLOCK", "RECENT", "SINK", "SOAK_RUNS", "FakeRunner", "SoakConfig", "SoakResult", "Workload", "check_pool",
           "fake_token", "make_scheduler", "run_soak", "solo_output", "write_model_dir"]
