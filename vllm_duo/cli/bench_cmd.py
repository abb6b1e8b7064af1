"""``vllm-duo bench``: end-to-end throughput, duo vs FLASH_ATTN side by side (GPU).

Llama-3-8B shape with dummy weights (a config.json is written), the Llama-3-8B-1048k pattern.
  a  decode tokens/s at the largest batch of long requests each backend holds
  b  throughput of a batch of short prompts
  c  the longest single context each backend holds
Each backend runs in its own process; a and b share one engine, c starts another (eager:
nothing in c is timed). The timing method is in vllm_duo/eval/bench.py and in the JSON.
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace
from typing import Any

from vllm_duo.cli.needs import require_cuda
from vllm_duo.errors import DuoConfigError
from vllm_duo.model_check import check_kv_cache_options
from vllm_duo.options import DEFAULT_RECENT, DEFAULT_SINK, PREFILL_KERNELS

PATTERN_NAME = "Llama-3-8B-Instruct-Gradient-1048k"  # built-in


def parse_parts(values: list[str]) -> str:
    """``a b``, ``ab`` or ``a,c`` -> "ab" / "ac" (ordered, unique)."""
    chars = "".join(values).replace(",", "").lower()
    bad = sorted(set(chars) - set("abc"))
    if bad or not chars:
        raise DuoConfigError(f"--only takes parts among a, b, c (e.g. --only a b); got {values}")
    return "".join(p for p in "abc" if p in chars)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="end-to-end throughput, duo vs FLASH_ATTN (GPU)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=["abc"], metavar="PART", help="parts to run: a, b, c (default all)")
    p.add_argument("--methods", nargs="+", default=["full", "duo"], choices=["full", "duo"])
    p.add_argument("--pattern", default=PATTERN_NAME,
                   help=f"duo pattern: built-in name or folder (default: built-in {PATTERN_NAME})")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--sink", type=int, default=DEFAULT_SINK)
    p.add_argument("--recent", type=int, default=DEFAULT_RECENT)
    p.add_argument("--streaming-prefill", choices=PREFILL_KERNELS, default=None,
                   help="duo's streaming-head prefill kernel (default: the option's default, 'window')")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="KV cache of every engine (full and duo alike); fp8 adds _fp8 to the figure names")
    p.add_argument("--enforce-eager", action="store_true",
                   help="a/b without torch.compile/CUDA graphs (faster start, slower decode)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="a/b engine's max_num_seqs (caps a's batch)")
    p.add_argument("--a-prompt", type=int, default=65536, help="a: tokens per request prompt")
    p.add_argument("--a-decode", type=int, default=256, help="a: tokens generated per request")
    p.add_argument("--a-batch", type=int, default=None, help="a: batch (default floor(vLLM's max concurrency))")
    p.add_argument("--a-admitted", action="store_true",
                   help="a: submit 1.5x vLLM's max concurrency and time the largest batch the scheduler "
                        "admits (vLLM's figure counts each duo request at its prefill peak)")
    p.add_argument("--b-prompt", type=int, default=1024)
    p.add_argument("--b-batch", type=int, default=64)
    p.add_argument("--b-output", type=int, default=128)
    p.add_argument("--b-repeats", type=int, default=3)
    p.add_argument("--c-max-positions", type=int, default=2 ** 21,
                   help="c: max_position_embeddings written to the config (the search's upper bound)")
    p.add_argument("--c-verify", type=float, default=0.0,
                   help="c: also prefill one prompt of this fraction of the found maximum (0 = skip)")
    p.add_argument("--out", default=None, help="output folder (default $OUT/bench or ./bench_out)")
    p.add_argument("--timeout", type=int, default=540, help="seconds per engine")
    p.add_argument("--quiet", action="store_true", help="do not echo engine logs (they still go to --out)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_duo.eval import bench
    from vllm_duo.eval.bench_plot import plot_bench
    from vllm_duo.eval.bench_run import failed_all, figures_for, run_engines
    from vllm_duo.eval.engine_proc import LLAMA3_8B
    from vllm_duo.eval.methods import check_pattern, expand_methods
    from vllm_duo.eval.results import default_out, record, write_json

    require_cuda()
    parts = parse_parts(args.only)
    if args.a_admitted and args.a_batch is not None:
        raise DuoConfigError("--a-admitted sets part a's batch to what the scheduler admits; drop --a-batch")
    if args.kv_cache_dtype != "auto" and "duo" in args.methods:
        check_kv_cache_options(SimpleNamespace(cache_dtype=args.kv_cache_dtype), args.streaming_prefill or "window")
    pattern = args.pattern
    methods = expand_methods(args.methods, pattern=pattern, sparsities=[args.sparsity], sink=args.sink,
                             recent=args.recent, streaming_prefill=args.streaming_prefill)
    if pattern and "duo" in args.methods:
        check_pattern(pattern, LLAMA3_8B["num_hidden_layers"], LLAMA3_8B["num_key_value_heads"], "Llama-3-8B")
    out_dir = os.path.abspath(args.out or default_out("bench"))
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "bench.log")
    duo = next((m.name for m in methods if m.name.startswith("duo_")), "duo")

    rows = run_engines(args, parts, methods, log_path, on_row=_print_row)
    figures, extra = figures_for(rows, args, duo)
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    payload = {"parts": parts, "settings": dict(settings, pattern=pattern), "model": "Llama-3-8B shape, dummy weights",
               "timing_method": bench.__doc__, "rows": rows, "figures": figures, "extra": extra}
    name = f"e2e_bench_{parts}"
    write_json(os.path.join(out_dir, f"{name}.json"), payload)
    _print_table(rows)
    if not failed_all(rows):
        print(f"bench: plot {plot_bench([payload], os.path.join(out_dir, f'{name}.png'))}")
    print(f"bench: figures {figures}; extra {extra}")
    failed = [m for m, r in rows.items() if r.get("errors")]
    if figures:
        print(f"bench: recorded -> {record(name, payload, figures, out_dir)}")
    print(f"bench: wrote {out_dir}")
    return 1 if failed else 0


def _print_row(method: str, label: str, row: dict[str, Any]) -> None:
    eng = row.get(f"engine_{label}", {})
    print(f"bench: {method} [{label}] start {eng.get('engine_start_s')} s, KV {eng.get('kv_cache_gib')} GiB = "
          f"{eng.get('kv_cache_tokens')} tokens, concurrency {eng.get('max_concurrency')}x "
          f"at {eng.get('max_model_len')} tokens, GPU used {eng.get('gpu_memory_used_gib')} GiB", flush=True)
    if "a" in label and "a" in row:
        a = row["a"]
        print(f"bench:   a: batch {a['batch']} x {a['prompt_tokens']} -> decode "
              f"{a['decode']['decode_tokens_per_s']} tok/s ({a['decode_tokens_per_s_per_seq']} per seq), "
              f"step {a['decode']['step_ms']} ms, TTFT {a['ttft_s']} s", flush=True)
    if "b" in label and "b" in row:
        b = row["b"]
        print(f"bench:   b: {b['batch']} x {b['prompt_tokens']} + {b['output_tokens']}: {b['output_tokens_per_s']} "
              f"out tok/s, {b['total_tokens_per_s']} total tok/s, walls {b['walls_s']} s", flush=True)
    if "c" in label and "c" in row:
        c = row["c"]
        print(f"bench:   c: longest context {c['max_context_tokens']} tokens "
              f"(bounded by positions: {c['bounded_by_positions']}) {c.get('verify', '')}", flush=True)


def _print_table(rows: dict[str, Any]) -> None:
    """One line per backend: the numbers the figures come from."""
    def at(row: dict, *keys: str):
        for k in keys:
            row = row.get(k) if isinstance(row, dict) else None
        return "-" if row is None else row

    print(f"{'method':>10} {'a batch':>8} {'a decode tok/s':>15} {'a step p50 ms':>14} {'b out tok/s':>12} "
          f"{'c max context':>14} {'KV GiB':>7}")
    for name, r in rows.items():
        kv = next((v["kv_cache_gib"] for k, v in r.items() if k.startswith("engine_") and k != "engine_kwargs"
                   and "kv_cache_gib" in v), "-")
        print(f"{name:>10} {at(r, 'a', 'batch'):>8} {at(r, 'a', 'decode', 'decode_tokens_per_s'):>15} "
              f"{at(r, 'a', 'decode', 'step_ms', 'p50'):>14} {at(r, 'b', 'output_tokens_per_s'):>12} "
              f"{at(r, 'c', 'max_context_tokens'):>14} {kv:>7}" + ("  ERRORS: " + ", ".join(r["errors"])
                                                                   if r.get("errors") else ""))
