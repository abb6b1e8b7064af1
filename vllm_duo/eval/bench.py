"""End-to-end throughput through vLLM's engine: the job a child process runs, and its analysis.

Timing method. The job drives ``LLM.llm_engine`` step by step with DELTA outputs and vLLM's
request stats on, so every new token arrives with its engine-core step timestamp. The
*decode window* runs from the moment the last request of the batch got its first token (all
prompts prefilled) to the moment the first request finished: in it every request decodes at
every step and no prefill shares a step. Decode tokens/s = tokens produced in the window /
its length. One prefill per run, no subtraction of two runs. TTFT and end-to-end latency come
from the per-request stats (vLLM's own ``first_token_latency``).

Parts (each selectable; a and b share one engine per backend, c starts its own):
  a: batch = floor(vLLM's reported max concurrency) of long requests, decode tokens/s. With
     ``admitted``, 1.5x that many are submitted and the scheduler admits what fits (vLLM's figure
     counts each duo request at its prefill peak, which it holds only while prefilling); the
     window is then the longest run of steps in which the most requests decode, and the batch
     is that count;
  b: a batch of short prompts, end-to-end throughput;
  c: the longest single context: ``max_model_len=-1`` makes vLLM fit the largest context its
     KV pool holds for one request (``max_num_seqs=1``), up to the model's
     ``max_position_embeddings`` (raised in the written config so memory is the bound).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import numpy as np

VOCAB_RANGE = (1000, 100000)  # token ids drawn for dummy-weight prompts (< Llama-3's vocab)
ADMIT_OVERSUBSCRIBE = 1.5  # part a with ``admitted``: requests submitted per vLLM's concurrency


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(*VOCAB_RANGE, size=length).tolist() for _ in range(n)]


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=float) * scale
    out = {f"p{q}": round(float(np.percentile(arr, q)), 4) for q in (50, 90, 99)}
    out["mean"] = round(float(arr.mean()), 4)
    return out


def decode_window(events: list[tuple[str, float, int]]) -> dict[str, Any]:
    """Decode rate from (request id, step timestamp, new tokens) events; see the module doc."""
    by_req: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for rid, ts, n in events:
        if n > 0:
            by_req[rid].append((ts, n))
    if not by_req:
        raise ValueError("no tokens were generated")
    start = max(min(ts for ts, _ in v) for v in by_req.values())
    end = min(max(ts for ts, _ in v) for v in by_req.values())
    in_window = [(rid, ts, n) for rid, v in by_req.items() for ts, n in v if start < ts <= end]
    steps = sorted({ts for _, ts, _ in in_window})
    per_step = defaultdict(int)
    for _, ts, _ in in_window:
        per_step[ts] += 1
    tokens = sum(n for _, _, n in in_window)
    seconds = end - start
    itl = [b - a for v in by_req.values() for (a, _), (b, _) in zip(sorted(v), sorted(v)[1:])]
    return {
        "decode_tokens_per_s": round(tokens / seconds, 2) if seconds > 0 and tokens else None,
        "window_seconds": round(seconds, 4),
        "window_steps": len(steps),
        "window_tokens": tokens,
        "requests": len(by_req),
        "batch_in_window": [min(per_step.values()), max(per_step.values())] if per_step else None,
        "step_ms": percentiles(list(np.diff([start] + steps)), 1000.0) if steps else None,
        "itl_ms": percentiles(itl, 1000.0),
    }


def decode_window_at_peak(events: list[tuple[str, float, int]]) -> dict[str, Any]:
    """Decode rate over the longest run of consecutive steps in which the most requests produce
    a token (more requests submitted than fit: the largest batch the scheduler admitted)."""
    per_step: dict[float, int] = defaultdict(int)
    tokens_at: dict[float, int] = defaultdict(int)
    for _, ts, n in events:
        if n > 0:
            per_step[ts] += 1
            tokens_at[ts] += n
    if not per_step:
        raise ValueError("no tokens were generated")
    steps = sorted(per_step)
    peak = max(per_step.values())
    best, run = (0, -1), None  # (first, last) step index of the longest run at the peak
    for i, ts in enumerate(steps):
        if per_step[ts] == peak:
            run = (run[0] if run else i, i)
            if run[1] - run[0] > best[1] - best[0]:
                best = run
        else:
            run = None
    first, last = best  # the run's first step also finished the last prefill: it starts the window
    if last <= first:
        raise ValueError(f"the peak batch ({peak} requests) decoded together for one step only")
    window = steps[first + 1:last + 1]
    seconds = window[-1] - steps[first]
    tokens = sum(tokens_at[ts] for ts in window)
    return {
        "decode_tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "window_seconds": round(seconds, 4),
        "window_steps": len(window),
        "window_tokens": tokens,
        "requests": len({rid for rid, _, n in events if n > 0}),
        "batch_in_window": [peak, peak],
        "step_ms": percentiles(list(np.diff([steps[first]] + window)), 1000.0),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num and den else None


# ----------------------------------------------------------------- child side (needs vLLM)

def run_parts(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: start one engine and run the requested parts on it (see the module doc).

    spec: model, engine (``LLM`` kwargs), parts (subset of "abc"), and per part its sizes:
    a {prompt_tokens, decode_tokens, batch|None, max_num_seqs}, b {prompt_tokens, batch,
    output_tokens, repeats}, c {max_positions, verify, verify_tokens}.
    """
    from vllm import LLM

    from vllm_duo.eval.engine_proc import gpu_memory_used_gib, kv_capacity

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["engine"])
    vc = llm.llm_engine.vllm_config
    out: dict[str, Any] = {
        "engine_start_s": round(time.perf_counter() - t0, 1),
        "max_model_len": vc.model_config.max_model_len,
        "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
        "num_gpu_blocks": vc.cache_config.num_gpu_blocks,
        "block_size": vc.cache_config.block_size,
    }
    figures = kv_capacity(llm)
    out.update(figures)
    parts = spec["parts"]
    if "a" in parts or "b" in parts:
        _timed(llm, random_prompts(2, 2048, seed=99), 16, "warm-up")  # lazy kernel compiles
    if "a" in parts:
        out["a"] = _decode_at_capacity(llm, spec["a"], figures)
    if "b" in parts:
        out["b"] = _short_prompts(llm, spec["b"])
    if "c" in parts:
        out["c"] = _max_context(llm, spec["c"], figures)
    out["gpu_memory_used_gib"] = gpu_memory_used_gib()
    return out


def _timed(llm, prompts: list[list[int]], max_tokens: int, desc: str) -> dict[str, Any]:
    """Run prompts to completion through the engine loop, recording each token's step time."""
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    tag = f"{desc}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", tokens_input(p), params)
    events: list[tuple[str, float, int]] = []
    finished: list[dict[str, float]] = []
    with tqdm(total=len(prompts) * max_tokens, desc=desc, unit="tok", mininterval=5) as bar:
        while engine.has_unfinished_requests():
            for o in engine.step():
                m = o.metrics  # a live object: read it now, it moves on with the request
                if m is None:
                    raise RuntimeError("vLLM returned no request stats; start the engine with disable_log_stats=False")
                n = len(o.outputs[0].token_ids)
                events.append((o.request_id, m.last_token_ts, n))
                bar.update(n)
                if o.finished:
                    finished.append({"ttft_s": m.first_token_latency, "e2e_s": time.time() - m.arrival_time,
                                     "scheduled_ts": m.scheduled_ts, "first_token_ts": m.first_token_ts})
    return {"wall_s": time.perf_counter() - t0, "events": events, "finished": finished}


def _latencies(run: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
    fin = run["finished"]
    scheduled = min(f["scheduled_ts"] for f in fin)
    prefill_s = max(f["first_token_ts"] for f in fin) - scheduled if scheduled > 0 else 0.0
    return {
        "ttft_s": percentiles([f["ttft_s"] for f in fin]),
        "e2e_s": percentiles([f["e2e_s"] for f in fin]),
        # all prompts' tokens over the time until the last first token (decode steps of early
        # requests share that time, so this is a lower bound on prefill speed)
        "prefill_tokens_per_s": round(len(fin) * prompt_tokens / prefill_s, 1) if prefill_s > 0 else None,
    }


def _decode_at_capacity(llm, a: dict[str, Any], figures: dict[str, float]) -> dict[str, Any]:
    concurrency = figures.get("max_concurrency")
    batch = a.get("batch")
    if batch is None:
        if concurrency is None:
            raise RuntimeError("vLLM reported no maximum concurrency (cache_config.kv_cache_max_concurrency); "
                               "pass --a-batch to set the batch by hand")
        batch = math.ceil(ADMIT_OVERSUBSCRIBE * concurrency) if a.get("admitted") else math.floor(concurrency)
    capped = batch > a["max_num_seqs"]
    batch = min(batch, a["max_num_seqs"])
    if batch < 1:
        raise RuntimeError(f"the KV cache holds {concurrency} requests of {a['prompt_tokens']} tokens; "
                           f"lower --a-prompt or raise --gpu-memory-utilization")
    run = _timed(llm, random_prompts(batch, a["prompt_tokens"], seed=1), a["decode_tokens"], "a: decode")
    submitted = batch
    if a.get("admitted"):
        dec = decode_window_at_peak(run["events"])
        batch = dec["batch_in_window"][1]
    else:
        dec = decode_window(run["events"])
    tps = dec["decode_tokens_per_s"]
    return {
        "batch": batch, "submitted": submitted, "max_concurrency": concurrency,
        "batch_capped_by_max_num_seqs": capped,
        "prompt_tokens": a["prompt_tokens"], "decode_tokens": a["decode_tokens"],
        "wall_s": round(run["wall_s"], 3), "decode": dec,
        "decode_tokens_per_s_per_seq": round(tps / batch, 2) if tps else None,
        **_latencies(run, a["prompt_tokens"]),
    }


def _short_prompts(llm, b: dict[str, Any]) -> dict[str, Any]:
    runs = []
    for r in range(b["repeats"]):
        run = _timed(llm, random_prompts(b["batch"], b["prompt_tokens"], seed=100 + r), b["output_tokens"],
                     f"b: run {r + 1}/{b['repeats']}")
        runs.append({"wall_s": round(run["wall_s"], 4), "decode": decode_window(run["events"]),
                     **_latencies(run, b["prompt_tokens"])})
    median = sorted(runs, key=lambda x: x["wall_s"])[len(runs) // 2]
    out_tokens = b["batch"] * b["output_tokens"]
    return {
        "batch": b["batch"], "prompt_tokens": b["prompt_tokens"], "output_tokens": b["output_tokens"],
        "walls_s": [x["wall_s"] for x in runs], "median": median,
        "output_tokens_per_s": round(out_tokens / median["wall_s"], 1),
        "total_tokens_per_s": round(b["batch"] * (b["prompt_tokens"] + b["output_tokens"]) / median["wall_s"], 1),
    }


def _max_context(llm, c: dict[str, Any], figures: dict[str, float]) -> dict[str, Any]:
    max_len = llm.llm_engine.vllm_config.model_config.max_model_len
    out: dict[str, Any] = {
        "max_context_tokens": max_len, "max_positions": c["max_positions"],
        "bounded_by_positions": max_len >= c["max_positions"],
        "kv_cache_tokens": figures.get("kv_cache_tokens"),
    }
    if c["verify"] > 0:
        new = c.get("verify_tokens", 4)
        n = max(1, min(max_len - new, int(max_len * c["verify"])))
        run = _timed(llm, random_prompts(1, n, seed=7), new, f"c: verify {n} tokens")
        out["verify"] = {"prompt_tokens": n, "wall_s": round(run["wall_s"], 2),
                         "ttft_s": round(run["finished"][0]["ttft_s"], 2),
                         "generated": sum(e[2] for e in run["events"]),
                         # one request: its window runs from its first token to its last
                         "decode_tokens_per_s": decode_window(run["events"])["decode_tokens_per_s"]}
    return out
