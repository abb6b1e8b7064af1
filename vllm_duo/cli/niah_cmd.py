"""``vllm-duo niah``: passkey needle-in-a-haystack grid through vLLM, one engine per method.

Prompts (context lengths x needle depths x samples) are built once here as token ids; each
method (full = FLASH_ATTN, duo at each sparsity, all-streaming at the same sink/recent) then
generates all of them in one batch in its own process. Writes a JSON grid and one heatmap
PNG per method to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vllm_duo.builtin_patterns import pick_builtin
from vllm_duo.cli.needs import require_cuda, require_model_dir
from vllm_duo.errors import DuoConfigError
from vllm_duo.eval.niah import DEFAULT_MODEL
from vllm_duo.options import DEFAULT_RECENT, DEFAULT_SINK, PREFILL_KERNELS

class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except where there is none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_parser(sub) -> None:
    p = sub.add_parser("niah", help="passkey needle-in-a-haystack grid (GPU)", description=__doc__,
                       formatter_class=_DefaultsShown)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder (weights + tokenizer)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1000 * i for i in range(1, 9)],
                   help="context lengths in tokens (whole prompt)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths, fractions of the haystack")
    p.add_argument("--samples", type=int, default=1, help="prompts (different pass keys) per cell")
    p.add_argument("--methods", nargs="+", default=["full", "duo", "streaming"],
                   choices=["full", "duo", "streaming"])
    p.add_argument("--pattern", default=None,
                   help="duo head pattern: built-in name, folder or TSV (default: the built-in pattern "
                        "whose model name and shape match --model)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75],
                   help="duo sparsities (fraction of streaming heads); one method each")
    p.add_argument("--sink", type=int, default=DEFAULT_SINK, help="sink tokens of streaming heads")
    p.add_argument("--recent", type=int, default=DEFAULT_RECENT, help="recent window of streaming heads")
    p.add_argument("--streaming-prefill", choices=PREFILL_KERNELS, default=None,
                   help="duo's streaming-head prefill kernel (default: the option's default, 'window')")
    p.add_argument("--prefill-recent", type=int, default=None,
                   help="streaming heads' window while prefilling (default: the plugin's, 8192: prompts "
                        "up to 8K prefill densely, as the reference below its 32K chunk)")
    p.add_argument("--chat-template", choices=["on", "off"], default="off")
    p.add_argument("--max-tokens", type=int, default=12, help="tokens generated per prompt")
    p.add_argument("--seed", type=int, default=0, help="pass-key seed")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="KV cache of every method's engine (fp8: e4m3 with per-tensor scales)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="a fixed KV cache per engine, so the run can share a GPU (default: "
                        "--gpu-memory-utilization sizes it)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="skip torch.compile/CUDA graphs (faster start; accuracy is unaffected)")
    p.add_argument("--out", default=None, help="output folder (default $OUT/niah or ./niah_out)")
    p.add_argument("--record", default=None, metavar="FIGURE",
                   help="also record the accuracies as figure FIGURE in benchmarks/results/summary.json "
                        "(e.g. niah_smollm2)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per engine")
    p.add_argument("--quiet", action="store_true", help="do not echo engine logs (they still go to --out)")
    p.set_defaults(func=run)


def _check_grid(args: argparse.Namespace, max_positions: int) -> None:
    if args.samples < 1:
        raise DuoConfigError(f"--samples must be >= 1, got {args.samples}")
    if min(args.lengths) < 1:
        raise DuoConfigError(f"--lengths must be positive, got {args.lengths}")
    for d in args.depths:
        if not 0 <= d <= 1:
            raise DuoConfigError(f"--depths are fractions in [0, 1] (0.5, not 50); got {d}")
    need = max(args.lengths) + args.max_tokens
    if max_positions and need > max_positions:
        raise DuoConfigError(f"the longest prompt ({max(args.lengths)}) plus --max-tokens ({args.max_tokens}) "
                             f"is {need} tokens, beyond the model's {max_positions} positions; "
                             f"lower --lengths")


def run(args: argparse.Namespace) -> int:
    from vllm_duo.eval.engine_proc import memory_kwargs
    from vllm_duo.eval.methods import check_pattern, expand_methods, model_shape
    from vllm_duo.eval.niah import HFCodec, grid_prompts
    from vllm_duo.eval.niah_run import run_methods
    from vllm_duo.eval.results import default_out, record, write_json

    require_cuda()
    require_model_dir(args.model)
    layers, kv_heads, max_positions = model_shape(args.model)
    _check_grid(args, max_positions)
    if "duo" in args.methods and args.pattern is None:
        args.pattern = pick_builtin([args.model], layers, kv_heads, "pass --pattern NAME_OR_FOLDER").name
        print(f"niah: no --pattern; using the built-in {args.pattern} (model name and shape match)")
    methods = expand_methods(args.methods, pattern=args.pattern, sparsities=args.sparsity, sink=args.sink,
                             recent=args.recent, prefill_recent=args.prefill_recent,
                             streaming_prefill=args.streaming_prefill)
    if any(m.name.startswith("duo_") for m in methods):
        check_pattern(args.pattern, layers, kv_heads, args.model)
    out_dir = os.path.abspath(args.out or default_out("niah"))
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "niah.log")

    codec = HFCodec(args.model)
    prompts = grid_prompts(codec, args.chat_template == "on", args.lengths, args.depths, args.samples, args.seed)
    print(f"niah: {len(prompts)} prompts ({len(args.lengths)} lengths x {len(args.depths)} depths x "
          f"{args.samples}), methods {[m.name for m in methods]}, out {out_dir}", flush=True)

    engine_base = dict(max_model_len=max(args.lengths) + args.max_tokens, seed=0,
                       **memory_kwargs(args.gpu_memory_utilization, args.kv_cache_gib), max_num_seqs=args.max_num_seqs,
                       enforce_eager=args.enforce_eager, enable_prefix_caching=False,
                       kv_cache_dtype=args.kv_cache_dtype)
    results = run_methods(args.model, methods, prompts, codec, args.lengths, args.depths, engine_base,
                          max_tokens=args.max_tokens, out_dir=out_dir, log_path=log_path, echo=not args.quiet,
                          timeout=args.timeout, caption=f"{os.path.basename(os.path.normpath(args.model))}, "
                                                        f"sink {args.sink}, recent {args.recent}")
    payload = {
        "model": args.model, "lengths": args.lengths, "depths": args.depths, "samples": args.samples,
        "chat_template": args.chat_template, "sink": args.sink, "recent": args.recent,
        "prefill_recent": args.prefill_recent, "pattern": args.pattern, "max_tokens": args.max_tokens,
        "seed": args.seed, "grid_layout": "grid[depth index][length index] = fraction correct",
        "accuracy": {k: v.get("accuracy") for k, v in results.items()}, "methods": results,
    }
    _print_grids(results, args.lengths, args.depths)
    write_json(os.path.join(out_dir, "niah.json"), payload)
    print(f"niah: wrote {out_dir}")
    failed = [k for k, v in results.items() if "error" in v]
    if args.record and failed:
        print(f"niah: figure {args.record} not recorded: {failed} failed", file=sys.stderr)
    elif args.record:
        path = record(args.record, payload, {args.record: payload["accuracy"]}, out_dir)
        print(f"niah: recorded figure {args.record} = {payload['accuracy']} -> {path}")
    return 1 if failed else 0


def _print_grids(results: dict[str, Any], lengths: list[int], depths: list[float]) -> None:
    """A text copy of each heatmap: '#' found, '.' missed, digits = percent when mixed."""
    def mark(v: float | None) -> str:
        return " " if v is None else "#" if v == 1 else "." if v == 0 else str(min(9, int(v * 10)))

    for name, r in results.items():
        if "grid" not in r:
            print(f"{name:>12}: FAILED")
            continue
        print(f"{name:>12}: {r['accuracy']:.1%}  (rows = depth, columns = {lengths[0]}..{lengths[-1]} tokens)")
        for d, row in zip(depths, r["grid"]):
            print(f"{'':>12}  {d:4.0%} |{''.join(mark(v) for v in row)}|")
