"""Serving-style measurements through vLLM's engine: many requests of mixed sizes submitted at
once, and the host overhead of one decode step. Jobs run in a child process
(:func:`vllm_duo.eval.engine_proc.run_job`); the analysis helpers are pure and CPU-tested.

Output tokens/s = all output tokens / wall time from the first submission to the last finish.
TTFT and TPOT come from vLLM's per-request stats (engine-core timestamps): TTFT = first token -
arrival, TPOT = (last token - first token) / (output tokens - 1).

Host overhead per decode step (:func:`profile_decode`): the engine runs in-process, a full batch
decodes, and the torch profiler records only CUDA activity (no per-op CPU hooks that would slow
eager code down); overhead = wall time per step - GPU busy time per step (the union of kernel
intervals), i.e. the time the GPU waits for the host. The same job profiles the batch's prefill
steps and lists the kernels with the most GPU time in each phase, so a gap between backends has
a name.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from vllm_duo.eval.bench import VOCAB_RANGE, percentiles


def mixed_requests(n: int, seed: int, prompt_range: tuple[int, int],
                   output_range: tuple[int, int]) -> list[tuple[list[int], int]]:
    """``n`` (prompt token ids, max output tokens): prompt lengths log-uniform over
    ``prompt_range``, output lengths log-uniform over ``output_range`` (both inclusive)."""
    rng = np.random.RandomState(seed)

    def log_uniform(lo: int, hi: int) -> np.ndarray:
        return np.floor(np.exp(rng.uniform(math.log(lo), math.log(hi + 1), size=n))).astype(int).clip(lo, hi)

    lengths, outputs = log_uniform(*prompt_range), log_uniform(*output_range)
    return [(rng.randint(*VOCAB_RANGE, size=int(p)).tolist(), int(o)) for p, o in zip(lengths, outputs)]


def request_latencies(finished: list[dict[str, float]]) -> dict[str, Any]:
    """TTFT and TPOT percentiles (seconds) from per-request first/last token times."""
    tpot = [(f["last_token_ts"] - f["first_token_ts"]) / (f["tokens"] - 1) for f in finished
            if f["tokens"] > 1]
    return {"ttft_s": percentiles([f["ttft_s"] for f in finished]), "tpot_s": percentiles(tpot)}


def gpu_busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time some kernel ran."""
    busy, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    return busy


# ----------------------------------------------------------------- child side (needs vLLM)

def run_requests(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: submit every request at once, run the engine to completion; throughput and latencies.

    spec: model, engine (``LLM`` kwargs), requests ([prompt ids, max tokens] pairs), optional
    warmup (a number of 1,024-token requests run first, so lazy compiles are not timed).
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["engine"])
    start_s = time.perf_counter() - t0
    engine = llm.llm_engine

    def run(requests: list, tag: str) -> tuple[float, list[dict[str, float]]]:
        t = time.perf_counter()
        for i, (prompt, max_tokens) in enumerate(requests):
            engine.add_request(f"{tag}-{i}", tokens_input(prompt), SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                output_kind=RequestOutputKind.DELTA))
        counts: dict[str, int] = {}
        finished = []
        done_at = time.perf_counter()
        while engine.has_unfinished_requests():
            for o in engine.step():
                counts[o.request_id] = counts.get(o.request_id, 0) + len(o.outputs[0].token_ids)
                if o.finished:
                    m = o.metrics
                    if m is None:
                        raise RuntimeError("vLLM returned no request stats; start the engine with "
                                           "disable_log_stats=False")
                    finished.append({"ttft_s": m.first_token_latency, "first_token_ts": m.first_token_ts,
                                     "last_token_ts": m.last_token_ts, "tokens": counts[o.request_id]})
                    done_at = time.perf_counter()
                    if len(finished) % 100 == 0:
                        print(f"{tag}: {len(finished)}/{len(requests)} finished", flush=True)
        return done_at - t, finished

    # 1,024 tokens (a request's own, repeated): past sink + window, so the streaming prefill kernel
    # compiles here, not in the timed run (256-token prompts took the causal path and left it cold).
    warm = [((r[0] * (1024 // len(r[0]) + 1))[:1024], 8) for r in spec["requests"][:spec.get("warmup", 0)]]
    if warm:
        run(warm, "warm-up")
    wall, finished = run([(list(p), int(m)) for p, m in spec["requests"]], "timed")
    out_tokens = sum(f["tokens"] for f in finished)
    return {"engine_start_s": round(start_s, 1), "wall_s": round(wall, 3), "requests": len(finished),
            "prompt_tokens": sum(len(p) for p, _ in spec["requests"]), "output_tokens": out_tokens,
            "output_tokens_per_s": round(out_tokens / wall, 1), **request_latencies(finished)}


def profile_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: host overhead per decode step (see the module doc).

    spec: model, engine (``LLM`` kwargs), batch, prompt_tokens, steps (profiled decode steps).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker runs here: the profiler sees it
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.inputs import tokens_input

    from vllm_duo.eval.bench import random_prompts

    llm = LLM(model=spec["model"], **spec["engine"])
    engine = llm.llm_engine
    steps, batch = spec["steps"], spec["batch"]
    params = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True, detokenize=False)
    for i, p in enumerate(random_prompts(batch, spec["prompt_tokens"], seed=7)):
        engine.add_request(f"p-{i}", tokens_input(p), params)
    prefill_steps, prefill_wall, prefill = profile_first_tokens(engine, batch, max_steps=10_000)
    for _ in range(8):  # then a few plain decode steps before the profiled ones
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    decode = kernel_times(prof)
    step_ms, busy_ms = 1000 * wall / steps, decode["busy_us"] / 1000 / steps
    return {"batch": batch, "prompt_tokens": spec["prompt_tokens"], "steps": steps,
            "step_ms": round(step_ms, 3), "gpu_busy_ms": round(busy_ms, 3),
            "host_overhead_ms": round(step_ms - busy_ms, 3),
            "kernels_per_step": round(decode["kernels"] / steps, 1),
            "decode_top_kernels_ms_per_step": {k: round(v / steps, 4) for k, v in decode["top_ms"].items()},
            "prefill": {"steps": prefill_steps, "wall_ms": round(1000 * prefill_wall, 1),
                        "gpu_busy_ms": round(prefill["busy_us"] / 1000, 1), "top_kernels_ms": prefill["top_ms"]}}


def profile_first_tokens(engine, count: int, max_steps: int) -> tuple[int, float, dict[str, Any]]:
    """Step ``engine`` under the torch profiler until ``count`` requests have their first token
    (at most ``max_steps`` steps): (steps, wall seconds, :func:`kernel_times` of those steps)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    started: set[str] = set()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for steps in range(1, max_steps + 1):
            started |= {o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids}
            if len(started) == count:
                break
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    return steps, wall, kernel_times(prof)


def kernel_times(prof) -> dict[str, Any]:
    import torch

    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"kernels": len(kernels),
            "busy_us": gpu_busy_us([(e.time_range.start, e.time_range.end) for e in kernels]),
            "top_ms": top_kernels([(e.name, e.time_range.end - e.time_range.start) for e in kernels])}


def top_kernels(durations: list[tuple[str, float]], n: int = 12, width: int = 90) -> dict[str, float]:
    """Total milliseconds per kernel name (names cut to ``width``) from (name, microseconds), the
    ``n`` largest first: where one backend's GPU time goes that the other's does not."""
    total: dict[str, float] = {}
    for name, us in durations:
        total[name[:width]] = total.get(name[:width], 0.0) + us / 1000
    return {k: round(v, 3) for k, v in sorted(total.items(), key=lambda kv: -kv[1])[:n]}
