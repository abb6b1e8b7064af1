"""Which prompt-attention path duo takes, step by step, for the mixed-traffic workload (CPU).

Drives ``benchmarks/mixed_traffic.py``'s requests (1,000 prompts of 64..32K tokens, outputs
16..512, all submitted at once) through vLLM's real scheduler and KV-cache manager with duo's
specs (Llama-3-8B shape, 50 % streaming, tail-only slots, async scheduling, vLLM's full-prompt
admission; fake model), and classifies every step with prompt chunks as ``backend/impl.py``
does: the step's prompt chunks split into maximal runs of fresh chunks (starting at position 0)
and continuing ones, in the scheduler's order (running requests first, then new ones; vLLM's
model runner may order them otherwise, which only adds runs), each run taking

- ``whole``: fresh, none longer than sink + prefill window: one FA3 call over all heads
  (FLASH_ATTN's work);
- ``fresh``: fresh, some longer: FA3 over the retrieval heads' runs plus the window kernel over
  the streaming heads;
- ``per_slot``: continuing: paged FA3 per retrieval slot plus the window kernel.

It also sums the keys each streaming-head query visits outside the ``whole`` path (the window
kernel's work, in query x key pairs) against causal attention's (FLASH_ATTN's). Steps and
scheduled decode rows show whether admission differs between windows. No timing: a GPU run
says what the work costs.

    python benchmarks/prefill_paths.py [--windows 8192 256] [--requests 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from benchmarks.summary import save_result  # noqa: E402
from tests.conftest import use_cpu_platform  # noqa: E402
from tests.reliability.sim import SoakConfig, make_scheduler, write_model_dir  # noqa: E402
from vllm_duo.backend.metadata import WHOLE, PrefillPart, runs  # noqa: E402
from vllm_duo.eval.traffic import mixed_requests  # noqa: E402
from vllm_duo.options import DEFAULT_SINK  # noqa: E402

# The H200 mixed-traffic run's duo pool (101.82 GiB of KV at gpu_memory_utilization 0.85) and
# vLLM's default token budget for LLM there.
H200_DUO_BLOCKS = 104327
H200_BUDGET = 16384


def window_keys(start: int, length: int, sink: int, window: int) -> int:
    """Keys visited by streaming-head queries [start, start + length): p < sink or t - W < p <= t."""
    end, cap = start + length, sink + window  # t < cap sees t + 1 keys, later ones cap keys
    dense_end = min(end, cap)
    dense = (dense_end * (dense_end + 1) - start * (start + 1)) // 2 if dense_end > start else 0
    return dense + max(0, end - max(start, cap)) * cap


def causal_keys(start: int, length: int) -> int:
    return length * start + length * (length + 1) // 2


def classify(rows: list[tuple[int, int]], sink: int, window: int) -> list[tuple[str, list[int]]]:
    """impl.py's choice for a step's prompt chunks ``(start, length)``: (path, row indices) per
    maximal run of fresh or continuing chunks, by the builder's runs and ``PrefillPart.path``."""
    fresh = [start == 0 for start, _ in rows]
    out = []
    for a, b in runs(fresh):
        part = PrefillPart(r0=a, r1=b, t0=0, t1=0, fresh=fresh[a], max_query_len=max(n for _, n in rows[a:b]))
        out.append((part.path(sink, window), list(range(a, b))))
    return out


def run(window: int, requests: list[tuple[list[int], int]], num_blocks: int, budget: int,
        sink: int) -> dict[str, int]:
    cfg = SoakConfig(num_requests=len(requests), max_prompt=max(len(p) for p, _ in requests),
                     max_tokens=max(o for _, o in requests), long_decode_fraction=0, num_blocks=num_blocks,
                     reserve_full_isl=True, max_num_seqs=256, max_num_batched_tokens=budget,
                     prefill_window=window, async_scheduling=True, tail_only=True)
    scheduler = make_scheduler(write_model_dir(tempfile.mkdtemp()), cfg)
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=o, ignore_eos=True), None)
            for i, (p, o) in enumerate(requests)]
    by_id = {r.request_id: r for r in reqs}
    known = {r.request_id: r.num_prompt_tokens for r in reqs}  # tokens the fake runner has seen
    for r in reqs:
        scheduler.add_request(r)
    stats = dict(steps=0, decode_rows=0, runs_whole=0, runs_fresh=0, runs_per_slot=0, tokens_whole=0,
                 tokens_fresh=0, tokens_per_slot=0, short_fresh_tokens_off_whole=0,
                 streaming_keys_window_kernel=0, causal_keys=0)
    pending: deque = deque()
    bar = tqdm(total=len(reqs), desc=f"window {window}", unit="req")
    while scheduler.has_requests() or pending:
        out = scheduler.schedule()
        rows = []
        for rid, n in out.num_scheduled_tokens.items():
            r = by_id[rid]
            start = r.num_computed_tokens - n  # schedule() has advanced it
            if start < r.num_prompt_tokens:
                rows.append((start, n, r.num_prompt_tokens))
            else:
                stats["decode_rows"] += 1
        if rows:
            for path, run in classify([(s, n) for s, n, _ in rows], sink, window):
                stats[f"runs_{path}"] += 1
                for s, n, prompt in (rows[i] for i in run):
                    stats[f"tokens_{path}"] += n
                    stats["causal_keys"] += causal_keys(s, n)
                    if path != WHOLE:
                        stats["streaming_keys_window_kernel"] += window_keys(s, n, sink, window)
                    if path != WHOLE and s == 0 and prompt <= sink + window:
                        stats["short_fresh_tokens_off_whole"] += n
        ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in ids:  # a step that reaches the known tokens samples one more
            done = by_id[rid].num_computed_tokens >= known[rid]
            known[rid] += done
            sampled.append([1] if done else [])
        if ids:
            pending.append((out, ModelRunnerOutput(req_ids=ids, req_id_to_index={x: i for i, x in enumerate(ids)},
                                                   sampled_token_ids=sampled)))
        if pending and (len(pending) > 1 or not ids):  # one step in flight, as async scheduling
            scheduler.update_from_output(*pending.popleft())
            bar.n = sum(r.is_finished() for r in reqs)
            bar.refresh()
        stats["steps"] += 1
    bar.close()
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, nargs="+", default=[8192, 256], help="prefill windows to compare")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="mixed_traffic.py's workload seed")
    ap.add_argument("--num-blocks", type=int, default=H200_DUO_BLOCKS, help="KV pool (block ids)")
    ap.add_argument("--budget", type=int, default=H200_BUDGET, help="max_num_batched_tokens")
    args = ap.parse_args()
    use_cpu_platform()
    requests = mixed_requests(args.requests, args.seed, (64, 32768), (16, 512))
    rows = {w: run(w, requests, args.num_blocks, args.budget, DEFAULT_SINK) for w in args.windows}
    for w, s in rows.items():
        print(f"window {w}: " + ", ".join(f"{k} {v:,}" for k, v in s.items()))
    fname = save_result("prefill_paths_cpu", dict(
        workload=dict(requests=args.requests, seed=args.seed, prompts=[64, 32768], outputs=[16, 512]),
        num_blocks=args.num_blocks, budget=args.budget, sink=DEFAULT_SINK, rows=rows), {}, device="cpu")
    print(f"wrote benchmarks/results/{fname}")


if __name__ == "__main__":
    main()
