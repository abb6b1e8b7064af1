"""Do two engine runs agree? Teacher-forced logprob gaps between vLLM runs.

Greedy token strings flip on any rounding, so "same tokens" can neither be relied on nor fail
meaningfully. Instead run A generates (keeping each sampled token's logprob), and run B scores
A's tokens by teacher forcing (``prompt_logprobs`` over prompt + A's tokens). The gap is the
largest, over requests, of the mean |logprob difference| over that request's generated tokens.
FLASH_ATTN scored by FLASH_ATTN gives the noise of the comparison itself; a tolerance is
calibrated from it (:func:`tolerance`).

Jobs run through :mod:`vllm_duo.eval.engine_proc` (one engine per process), several at once:
each engine gets a fixed KV-cache size (``kv_cache_memory_bytes``), so concurrent starts do not
disturb each other's memory profiling.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vllm_duo.eval.engine_proc import run_job

JOB = "vllm_duo.eval.agreement:generate_and_score"
# Defaults of the agreement engines: real weights, bf16, no tokenizer, small fixed KV cache.
ENGINE = dict(load_format="auto", dtype="bfloat16", skip_tokenizer_init=True, seed=0,
              max_model_len=8192, max_num_seqs=16, gpu_memory_utilization=0.08,
              kv_cache_memory_bytes=4 << 30, enable_prefix_caching=False)


def generate_and_score(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: optional greedy generation, then teacher-forced scoring of token sequences.

    spec: model, engine (``LLM`` kwargs), env (set before vLLM is imported), prompts (token-id
    lists) and max_tokens to generate; score: {name: [token-id sequences]} to score, where the
    name ``"self"`` means this run's own prompts + generated tokens. Returns tokens, logprobs
    (per generated token) and scores ({name: per sequence, logprob of token j given < j, j >= 1}).
    """
    os.environ.update(spec.get("env", {}))
    from vllm import LLM

    return run_on(LLM(model=spec["model"], **spec.get("engine", {})), spec)


def run_on(llm, spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`generate_and_score`'s work on an engine that is already up."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    result: dict[str, Any] = {"scores": {}}
    prompts = spec.get("prompts") or []
    if prompts:
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                                detokenize=False, logprobs=0)
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result["generate_seconds"] = round(time.perf_counter() - t0, 3)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        result["logprobs"] = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                              for o in outs]
    score = dict(spec.get("score", {}))
    if "self" in score:
        score["self"] = [p + t for p, t in zip(prompts, result["tokens"])]
    params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False, prompt_logprobs=0)
    for name, seqs in score.items():
        outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
        result["scores"][name] = [[entry[tok].logprob for tok, entry in zip(seq[1:], o.prompt_logprobs[1:])]
                                  for seq, o in zip(seqs, outs)]
    return result


def scored_sequences(prompts: list[list[int]], run: dict[str, Any]) -> list[list[int]]:
    """prompt + generated tokens of each request of ``run``: what a scoring run scores."""
    return [p + t for p, t in zip(prompts, run["tokens"])]


def gap(prompts: list[list[int]], run: dict[str, Any], scores: list[list[float]]) -> float:
    """max over requests of mean |generated logprob - teacher-forced logprob| over its tokens.

    ``scores[i][j]`` is the logprob of token j + 1 of prompt + tokens (as :func:`generate_and_score`
    or a float32 reference gives them); generated token k sits at position len(prompt) + k.
    """
    worst = 0.0
    for prompt, logprobs, score in zip(prompts, run["logprobs"], scores, strict=True):
        teacher = score[len(prompt) - 1:len(prompt) - 1 + len(logprobs)]
        if len(teacher) != len(logprobs) or not logprobs:
            raise ValueError(f"scores cover {len(teacher)} of {len(logprobs)} generated tokens")
        worst = max(worst, statistics.fmean(abs(a - b) for a, b in zip(logprobs, teacher)))
    return worst


def tolerance(calibration: float) -> float:
    """Twice the gap FLASH_ATTN shows against itself under the same comparison, plus 0.01 so a
    lucky near-zero calibration does not make bf16 rounding fail the test."""
    return 2 * calibration + 0.01


def run_parallel(jobs: dict[str, dict[str, Any]], workers: int = 4, log_dir: str | None = None,
                 timeout: float = 900, job: str = JOB) -> dict[str, dict[str, Any]]:
    """Run named engine jobs (``job``, default :func:`generate_and_score`), ``workers`` engines at
    a time; a failed job raises (with its log tail) after the others finish."""
    def one(name: str) -> dict[str, Any]:
        log = os.path.join(log_dir, name.replace("/", "_") + ".log") if log_dir else None
        t0 = time.perf_counter()
        res = run_job(job, jobs[name], log_path=log, timeout=timeout, header=name)
        print(f"agreement job {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        return res

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(one, name) for name in jobs}
        return {name: f.result() for name, f in futures.items()}
