"""Run one dummy-weight vLLM engine in a fresh process and return greedy tokens (and its KV capacity).

Each backend gets its own process so GPU memory and compile caches never leak between runs.
The subprocess runner is :mod:`vllm_duo.eval.engine_proc` (shared with ``vllm-duo niah/bench``).
"""

from __future__ import annotations

from typing import Any

from vllm_duo.eval.engine_proc import LLAMA3_8B, parse_engine_log, run_job, write_model

__all__ = ["LLAMA3_8B", "run_engine", "write_model"]

_capacity_from_log = parse_engine_log  # vLLM's startup figures (KV-cache tokens, max concurrency)


def run_engine(spec: dict[str, Any], timeout: int = 1500) -> dict[str, Any]:
    """spec: model, prompts (token-id lists), max_tokens, engine (LLM kwargs), optional logprobs.

    Dummy weights, no tokenizer, seed 0, ``ignore_eos``; ``engine`` overrides the defaults.
    """
    engine = dict(load_format="dummy", skip_tokenizer_init=True, seed=0, enforce_eager=False)
    engine.update(spec.get("engine", {}))
    return run_job("vllm_duo.eval.engine_proc:generate", dict(spec, engine=engine, ignore_eos=True),
                   timeout=timeout)
