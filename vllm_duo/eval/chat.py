"""Multi-turn chat through one vLLM engine: every turn resends the whole conversation.

Turn k + 1's prompt is turn k's prompt, turn k's output and new token ids, so with prefix
caching each turn can resume where the last one ended. All conversations take turn k together
(one ``generate`` call per turn). Jobs run in a fresh process through
:func:`vllm_duo.eval.engine_proc.run_job`; the GPU test and ``benchmarks/chat.py`` call them.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import numpy as np


def conversations(num: int, turns: int, growth: tuple[int, int] = (200, 2000),
                  vocab: tuple[int, int] = (3, 1000), seed: int = 0) -> list[list[list[int]]]:
    """Seeded new token ids per conversation and turn (``growth``: tokens a turn appends)."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(*vocab, int(rng.integers(growth[0], growth[1] + 1))).tolist() for _ in range(turns)]
            for _ in range(num)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.percentile(values, [50, 90, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "mean": statistics.fmean(values)}


def chat(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: serve ``spec["conversations"]`` turn by turn, then optionally score sequences.

    spec: model, engine (``LLM`` kwargs), conversations (new token ids per conversation and turn),
    max_tokens (per turn), logprobs (bool: the sampled tokens' logprobs), score (token-id
    sequences whose every token is scored by ``prompt_logprobs``, teacher-forced), warmup
    (conversations served first and not recorded: Triton compiles its kernels on first use).
    Returns per conversation the tokens and hits (``num_cached_tokens``) of each turn, TTFTs,
    wall time per turn, and the scores.
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec.get("engine", {}))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False,
                            logprobs=0 if spec.get("logprobs") else None)
    _serve(llm, spec.get("warmup") or [], params)  # lazy kernel compiles, not timed
    convs = spec["conversations"]
    out: dict[str, Any] = {"tokens": [[] for _ in convs], "cached": [[] for _ in convs],
                           "prompt_lens": [[] for _ in convs], "logprobs": [[] for _ in convs],
                           "ttft_s": [], "turn_s": []}

    def record(prompts: list[list[int]], results: list, seconds: float) -> None:
        out["turn_s"].append(seconds)
        for i, (prompt, r) in enumerate(zip(prompts, results, strict=True)):
            tokens = list(r.outputs[0].token_ids)
            out["tokens"][i].append(tokens)
            out["cached"][i].append(r.num_cached_tokens or 0)
            out["prompt_lens"][i].append(len(prompt))
            if spec.get("logprobs"):
                out["logprobs"][i].append([step[t].logprob for t, step in zip(tokens, r.outputs[0].logprobs,
                                                                                strict=True)])
            if r.metrics is not None and getattr(r.metrics, "first_token_latency", 0):
                out["ttft_s"].append(r.metrics.first_token_latency)

    out["final"] = _serve(llm, convs, params, on_turn=record)
    if spec.get("score"):
        scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        scored = llm.generate([TokensPrompt(prompt_token_ids=s) for s in spec["score"]], scoring, use_tqdm=False)
        # prompt_logprobs[p] holds the logprob of token p given tokens < p (None for p = 0).
        out["scores"] = [[None if step is None else step[t].logprob
                          for t, step in zip(seq, r.prompt_logprobs, strict=True)]
                         for seq, r in zip(spec["score"], scored, strict=True)]
    return out


def _serve(llm, convs: list[list[list[int]]], params,
           on_turn: Callable[[list[list[int]], list, float], None] | None = None) -> list[list[int]]:
    """Serve ``convs`` turn by turn (all conversations take turn k together; turn k's prompt is
    the history plus the turn's new ids); ``on_turn(prompts, outputs, generate seconds)`` sees
    each turn. Returns each conversation's history (prompts and outputs)."""
    from vllm.inputs import TokensPrompt

    history: list[list[int]] = [[] for _ in convs]
    for k in range(min(map(len, convs), default=0)):
        prompts = [h + c[k] for h, c in zip(history, convs, strict=True)]
        t0 = time.perf_counter()
        results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        if on_turn:
            on_turn(prompts, results, time.perf_counter() - t0)
        history = [p + list(r.outputs[0].token_ids) for p, r in zip(prompts, results, strict=True)]
    return history


def profile_turn(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: where the last turn's time to first token goes. Serves every turn but the last
    unprofiled (so the prefix cache holds the history), then submits the last turn and profiles
    the engine steps until every conversation has its first token (torch profiler, in-process
    engine). spec: model, engine, conversations, max_tokens."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker runs here: the profiler sees it
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_duo.eval.traffic import profile_first_tokens

    llm = LLM(model=spec["model"], **spec.get("engine", {}))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False)
    _serve(llm, spec.get("warmup") or [], params)
    convs = spec["conversations"]
    history = _serve(llm, [c[:-1] for c in convs], params)
    engine = llm.llm_engine
    prompts = [h + c[-1] for h, c in zip(history, convs, strict=True)]
    for i, p in enumerate(prompts):
        engine.add_request(f"last-{i}", TokensPrompt(prompt_token_ids=p), params)
    steps, wall, times = profile_first_tokens(engine, len(prompts), max_steps=100_000)
    while engine.has_unfinished_requests():
        engine.step()
    wall_ms, busy_ms = 1000 * wall, times["busy_us"] / 1000
    return {"turn": len(convs[0]), "prompt_tokens": sum(map(len, prompts)), "steps": steps,
            "wall_ms": round(wall_ms, 1), "gpu_busy_ms": round(busy_ms, 1),
            "host_ms": round(wall_ms - busy_ms, 1), "kernels": times["kernels"], "top_kernels_ms": times["top_ms"]}


def output_positions(result: dict[str, Any]) -> list[list[int]]:
    """Per conversation, the positions in its final sequence of every generated token."""
    positions = []
    for lens, tokens in zip(result["prompt_lens"], result["tokens"], strict=True):
        positions.append([n + j for n, turn in zip(lens, tokens, strict=True) for j in range(len(turn))])
    return positions


def logprob_gap(generated: dict[str, Any], scored: dict[str, Any]) -> float:
    """Mean |generated logprob - teacher-forced logprob| over every generated token: the engine
    that generated (``logprobs``) against the engine that scored its final sequences."""
    gaps = []
    for conv, (positions, scores) in enumerate(zip(output_positions(generated), scored["scores"], strict=True)):
        flat = [lp for turn in generated["logprobs"][conv] for lp in turn]
        gaps += [abs(lp - scores[p]) for lp, p in zip(flat, positions, strict=True)]
    return statistics.fmean(gaps)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Hits and timing of one chat run."""
    cached = [c for conv in result["cached"] for c in conv]
    prompts = [n for conv in result["prompt_lens"] for n in conv]
    generated = sum(len(t) for conv in result["tokens"] for t in conv)
    wall = sum(result["turn_s"])
    ttft, n = result["ttft_s"], len(result["cached"])
    by_turn = [statistics.median(ttft[k:k + n]) for k in range(0, len(ttft), n)] \
        if n and len(ttft) == n * len(result["turn_s"]) else None  # every request reported one
    return {"cached_tokens": sum(cached), "prompt_tokens": sum(prompts),
            "hit_rate": sum(cached) / max(sum(prompts), 1), "generated_tokens": generated,
            "wall_s": wall, "output_tokens_per_s": generated / wall if wall else 0.0,
            "ttft_s": percentiles(ttft), "ttft_p50_by_turn_s": by_turn, "turn_s": result["turn_s"]}
