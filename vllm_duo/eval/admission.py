"""Capacity as it runs: how many long requests the scheduler actually holds at once.

vLLM's startup line ("Maximum concurrency for N tokens per request: X") is arithmetic over the
KV pool. This job submits ``requests`` prompts of ``prompt_tokens`` distinct random tokens at
once and steps the engine core in this process, recording the largest number of requests that
are decoding at the same time (their whole prompt in the KV cache) and every preemption. A
capacity of X requests is shown when floor(X) requests decode together with no preemption.
Prompts are prefilled a token budget per step, one after another, so each request decodes long
enough (:func:`decode_tokens`) to still be decoding when the last prompt is in.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any


def count_preemptions(llm) -> list[int]:
    """Count the in-process scheduler's preemptions (an instance-level wrap of this engine only)."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    counter, original = [0], sched._preempt_request

    def preempt(*args, **kwargs):  # (request, timestamp[, drop_stale_output: vLLM 0.33])
        counter[0] += 1
        return original(*args, **kwargs)

    sched._preempt_request = preempt
    return counter


def decode_tokens(requests: int, context_tokens: int, step_tokens: int, margin: int = 8) -> int:
    """Tokens each request generates so that the first one, done prefilling after about
    ``context_tokens / step_tokens`` steps, still decodes when all ``requests`` prompts are in
    (about ``requests * context_tokens / step_tokens`` steps; one token per step)."""
    return -(-requests * context_tokens // step_tokens) + margin


def admit(spec: dict[str, Any]) -> dict[str, Any]:
    """Job (run through :func:`vllm_duo.eval.engine_proc.run_job`).

    spec: model, engine (``LLM`` kwargs), context_tokens (prompt + generated, per request), and
    requests (an int, or None for floor of vLLM's own max concurrency figure).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler lives in this process
    from vllm import LLM, SamplingParams

    from vllm_duo.eval.engine_proc import kv_capacity

    llm = LLM(model=spec["model"], **spec["engine"])
    figures = kv_capacity(llm)
    n = spec.get("requests") or int(figures["max_concurrency"])
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    preemptions = count_preemptions(llm)
    rng = random.Random(0)
    new = decode_tokens(n, spec["context_tokens"], llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens)
    prompt_tokens = spec["context_tokens"] - new
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
    for i in range(n):
        prompt = [rng.randrange(1000, 30000) for _ in range(prompt_tokens)]
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    most_decoding, finished, t0 = 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        finished += sum(o.finished for o in engine.step())
        decoding = sum(r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running)
        most_decoding = max(most_decoding, decoding)
    return {"requests": n, "prompt_tokens": prompt_tokens, "decode_tokens": new,
            "max_decoding_at_once": most_decoding, "preemptions": preemptions[0],
            "finished": finished, "seconds": round(time.perf_counter() - t0, 1),
            "vllm_max_concurrency": figures.get("max_concurrency"),
            "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}
