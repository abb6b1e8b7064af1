"""The retrieval suite (vllm_duo/eval/suite.py) per format for full attention, duo at several
sparsities and StreamingLLM, in HF transformers (``--runner hf``, CPU is fine) or through vLLM
(``--runner engine``, GPU: one engine per method, every format's prompts in one batch).

    # CPU, as long as --time-budget allows (formats round-robin, every method on each prompt):
    python benchmarks/niah_suite.py --runner hf --lengths 1500 2500 4000 --time-budget 1800
    # H200: 10 formats x 40 prompts (8 lengths x 5 depths) x 5 methods
    PYTHONPATH=$PWD python benchmarks/niah_suite.py --runner engine

Writes benchmarks/results/niah_suite_<runner>_<date>.json and .png (formats x methods heatmap) and
the summary figure --record (per-format accuracy per method); with $OUT set (the GPU machine)
copies of them to $OUT/niah_suite, with the engine log.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.summary import RESULTS, save_result  # noqa: E402
from vllm_duo.errors import DuoConfigError  # noqa: E402
from vllm_duo.eval import suite  # noqa: E402
from vllm_duo.eval.methods import expand_methods, model_shape  # noqa: E402
from vllm_duo.options import DEFAULT_RECENT, DEFAULT_SINK  # noqa: E402

DEFAULT_MODEL = "/tmp/models/smollm2-135m-instruct"
DEFAULT_PATTERN = os.path.join(os.path.dirname(RESULTS), "..", "patterns", "smollm2-135m-instruct")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runner", choices=["hf", "engine"], default="hf")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="HF model folder (weights + tokenizer)")
    ap.add_argument("--pattern", default=os.path.normpath(DEFAULT_PATTERN), help="duo pattern folder or TSV")
    ap.add_argument("--formats", nargs="+", default=None, help="suite formats (default: all 10)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1500 + 850 * i for i in range(8)],
                    help="token budgets (whole prompt); default 1500..7450 in 8 steps")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--samples", type=int, default=1, help="prompts per format x length x depth")
    ap.add_argument("--methods", nargs="+", default=["full", "duo", "streaming"], choices=["full", "duo", "streaming"])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--sink", type=int, default=DEFAULT_SINK)
    ap.add_argument("--recent", type=int, default=DEFAULT_RECENT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="hf runner: seconds after which no new prompt starts (the result says how many ran)")
    ap.add_argument("--record", default=None,
                    help="summary figure key (default niah_suite_smollm2 for the engine, niah_suite_smollm2_hf for hf)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--timeout", type=int, default=300, help="engine runner: seconds per engine")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.model):
        sys.exit(f"niah_suite: no model folder at {args.model}; pass --model PATH")
    from vllm_duo.eval.niah import HFCodec

    try:
        tasks = suite.parse_formats(args.formats)
        methods = expand_methods(args.methods, pattern=args.pattern, sparsities=args.sparsity, sink=args.sink,
                                 recent=args.recent)
        suite.method_masks(methods, args.model)  # a pattern made for another model fails here, before any work
        _, _, max_positions = model_shape(args.model)
        longest = max(args.lengths) + max(t.max_tokens for t in tasks)
        if max_positions and longest > max_positions:
            raise DuoConfigError(f"--lengths up to {max(args.lengths)} plus generated tokens need {longest} "
                                 f"positions; the model has {max_positions}: lower --lengths")
        codec = HFCodec(args.model)
        chat, prefix = suite.codec_chat(codec, tasks)
        prompts = suite.interleave(suite.build_suite(codec, tasks, args.lengths, args.depths, args.samples,
                                                     args.seed, chat=chat, prefix=prefix))
    except DuoConfigError as e:
        sys.exit(f"niah_suite: {e}")
    out_dir = os.path.join(os.environ["OUT"], "niah_suite") if os.environ.get("OUT") else None
    print(f"niah_suite: {len(prompts)} prompts ({len(tasks)} formats x {len(args.lengths)} lengths x "
          f"{len(args.depths)} depths x {args.samples}), methods {[m.name for m in methods]}", flush=True)

    t0 = time.monotonic()
    if args.runner == "hf":
        deadline = t0 + args.time_budget if args.time_budget else None
        cells = suite.run_hf(args.model, methods, prompts, codec.decode, sink=args.sink, recent=args.recent,
                             deadline=deadline,
                             on_prompt=lambda n: print(f"niah_suite: {n}/{len(prompts)} prompts, "
                                                       f"{time.monotonic() - t0:.0f} s", flush=True))
        results = {name: {"cells": c} for name, c in cells.items()}
    else:
        log_dir = out_dir or RESULTS
        os.makedirs(log_dir, exist_ok=True)
        engine = dict(max_model_len=longest, seed=0, gpu_memory_utilization=args.gpu_memory_utilization,
                      max_num_seqs=args.max_num_seqs, enforce_eager=True, enable_prefix_caching=False)
        results = suite.run_engine(args.model, methods, prompts, codec.decode, engine=engine,
                                   log_path=os.path.join(log_dir, "niah_suite_engine.log"), timeout=args.timeout)
    for m in methods:
        r = results[m.name]
        r["duo"] = m.duo
        if "cells" in r:
            r.update(suite.summarize(r["cells"]))
            print(f"niah_suite: {m.name:>10} {r['correct']}/{r['total']} ({r['accuracy']:.1%})", flush=True)

    table = suite.accuracy_table(results)
    counts = {}
    for r in results.values():
        for f, v in r.get("formats", {}).items():
            counts[f] = v["total"]
    ran = next((r["total"] for r in results.values() if "total" in r), 0)
    payload = dict(runner=args.runner, model=args.model, pattern=args.pattern, formats=[t.name for t in tasks],
                   format_specs={t.name: {k: getattr(t, k) for k in ("needle", "filler", "variant", "chat",
                                                                    "needles", "queries")} for t in tasks},
                   lengths=args.lengths, depths=args.depths, samples=args.samples, seed=args.seed, sink=args.sink,
                   recent=args.recent, prompts_planned=len(prompts), prompts_run=ran, prompts_per_format=counts,
                   seconds=round(time.monotonic() - t0, 1),
                   attention=("HF transformers float32 (duo: vllm_duo/eval/hf_duo.py)" if args.runner == "hf"
                              else "vLLM engine (full = FLASH_ATTN)"),
                   accuracy={m: r.get("accuracy") for m, r in results.items()}, per_format=table, methods=results)
    name = f"niah_suite_{args.runner}"
    key = args.record or ("niah_suite_smollm2" if args.runner == "engine" else "niah_suite_smollm2_hf")
    failed = [m for m, r in results.items() if "error" in r]
    fname = save_result(name, payload, {} if failed else {key: table})
    png = os.path.join(RESULTS, fname.replace(".json", ".png"))
    suite.plot_table(table, counts, png, f"{os.path.basename(os.path.normpath(args.model))}, {args.runner} runner, "
                                         f"sink {args.sink}, recent {args.recent}, {ran} prompts")
    print(f"niah_suite: wrote benchmarks/results/{fname} and {os.path.basename(png)}"
          + (f"; figure {key} not recorded: {failed} failed" if failed else f"; figure {key}"))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for f in (fname, os.path.basename(png), "summary.json"):
            shutil.copy(os.path.join(RESULTS, f), os.path.join(out_dir, f))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
