"""``vllm-duo bench``'s runs: which engines each method needs, running them, and the figures.

Each engine runs in its own process (:mod:`vllm_duo.eval.engine_proc`); what is timed inside
it is :mod:`vllm_duo.eval.bench`. The CLI parses options and prints; this module evaluates.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Callable

from vllm_duo.eval.methods import Method


def _k(n: int) -> str:
    return f"{round(n / 1024)}k"


def job_specs(args: argparse.Namespace, parts: str, model_ab: str, model_c: str,
              method: Method) -> list[tuple[str, dict[str, Any]]]:
    """The (label, spec) of each engine this method needs: one for a/b, one for c."""
    base = dict(load_format="dummy", skip_tokenizer_init=True, seed=0, enable_prefix_caching=False,
                disable_log_stats=False, gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_dtype=args.kv_cache_dtype, **method.engine_kwargs())
    specs = []
    ab = parts.replace("c", "")
    if ab:
        max_len = max(args.a_prompt + args.a_decode if "a" in ab else 0,
                      args.b_prompt + args.b_output if "b" in ab else 0)
        seqs = max(args.max_num_seqs, args.b_batch if "b" in ab else 1)
        engine = dict(base, max_model_len=max_len, max_num_seqs=seqs, enforce_eager=args.enforce_eager)
        specs.append((ab, dict(model=model_ab, engine=engine, parts=ab,
                               a=dict(prompt_tokens=args.a_prompt, decode_tokens=args.a_decode, batch=args.a_batch,
                                      admitted=args.a_admitted, max_num_seqs=engine["max_num_seqs"]),
                               b=dict(prompt_tokens=args.b_prompt, batch=args.b_batch, output_tokens=args.b_output,
                                      repeats=args.b_repeats))))
    if "c" in parts:
        engine = dict(base, max_model_len=-1, max_num_seqs=1, enforce_eager=True)
        specs.append(("c", dict(model=model_c, engine=engine, parts="c",
                                c=dict(max_positions=args.c_max_positions, verify=args.c_verify))))
    return specs


def figures_for(rows: dict[str, Any], args: argparse.Namespace, duo: str) -> tuple[dict, dict]:
    """(figures for summary.json, extra comparisons) from the rows that ran."""
    from vllm_duo.eval.bench import ratio

    def get(method: str, *keys: str):
        v: Any = rows.get(method, {})
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    figures: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    dtype = "" if args.kv_cache_dtype == "auto" else f"_{args.kv_cache_dtype}"  # both sides share it
    if (r := ratio(get(duo, "a", "decode", "decode_tokens_per_s"), get("full", "a", "decode", "decode_tokens_per_s"))):
        figures[f"e2e_decode_ratio_{_k(args.a_prompt)}_{duo[4:]}{dtype}"] = r
        extra["a_batch"] = {"full": get("full", "a", "batch"), duo: get(duo, "a", "batch")}
    if (r := ratio(get(duo, "b", "output_tokens_per_s"), get("full", "b", "output_tokens_per_s"))):
        figures[f"short_prompt_ratio_{_k(args.b_prompt)}_b{args.b_batch}{dtype}"] = r
    if (n := get(duo, "c", "max_context_tokens")):
        figures[f"max_context_tokens_{duo}{dtype}"] = n
        extra["max_context_tokens_full"] = get("full", "c", "max_context_tokens")
        extra["max_context_ratio"] = ratio(n, extra["max_context_tokens_full"])
    return figures, extra


def failed_all(rows: dict[str, Any]) -> bool:
    """Every method failed every part: nothing to plot."""
    return all(set(r) <= {"engine_kwargs", "errors"} for r in rows.values())


def run_engines(args: argparse.Namespace, parts: str, methods: list[Method], log_path: str,
                on_row: Callable[[str, str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every (method, engine) job; a failed job is recorded in its row, the others go on."""
    from tqdm import tqdm

    from vllm_duo.eval import engine_proc

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        model_ab = engine_proc.write_model(os.path.join(d, "llama3_8b"), engine_proc.LLAMA3_8B)
        model_c = engine_proc.write_model(os.path.join(d, "llama3_8b_long"),
                                          dict(engine_proc.LLAMA3_8B, max_position_embeddings=args.c_max_positions))
        jobs = [(m, label, spec) for m in methods for label, spec in job_specs(args, parts, model_ab, model_c, m)]
        for m, label, spec in tqdm(jobs, desc="bench engines", unit="engine"):
            row = rows.setdefault(m.name, {"engine_kwargs": {}})
            row["engine_kwargs"][label] = spec["engine"]
            try:
                res = engine_proc.run_job("vllm_duo.eval.bench:run_parts", spec, log_path=log_path,
                                          echo=not args.quiet, timeout=args.timeout,
                                          header=f"bench {m.name} {label}")
            except engine_proc.EngineJobError as e:
                tqdm.write(f"bench: {m.name} ({label}) failed: {str(e)[-1500:]}", file=sys.stderr)
                row.setdefault("errors", {})[label] = str(e)[-4000:]
                continue
            for p in label:
                row[p] = res.pop(p)
            row[f"engine_{label}"] = res
            if on_row:
                on_row(m.name, label, row)
    return rows
