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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.summary import RESULTS, beside, save_result  # noqa: E402
from vllm_duo.errors import DuoConfigError  # noqa: E402
from vllm_duo.eval import suite  # noqa: E402
from vllm_duo.eval.engine_proc import memory_kwargs  # noqa: E402
from vllm_duo.eval.methods import expand_methods  # noqa: E402
from vllm_duo.options import DEFAULT_RECENT, DEFAULT_SINK, prefill_window  # noqa: E402

DEFAULT_MODEL = "/tmp/models/smollm2-135m-instruct"
DEFAULT_PATTERN = "smollm2-135m-instruct"  # built in


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
    ap.add_argument("--prefill-recent", type=int, default=None,
                    help="engine runner: streaming heads' window while a prompt is prefilled (default: the "
                         "plugin's, 8192: dense up to 8K, as the reference's NIAH runs below its 32K chunk)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="hf runner: seconds after which no new prompt starts (the result says how many ran)")
    ap.add_argument("--record", default=None,
                    help="summary figure key (default niah_suite_smollm2 for the engine, niah_suite_smollm2_hf for hf)")
    ap.add_argument("--name", default=None, help="result file name (default niah_suite_<runner>; _<date>.json added)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-gib", type=float, default=None,
                    help="engine runner: a fixed KV cache per engine, so the run can share a GPU "
                         "(default: --gpu-memory-utilization sizes it)")
    ap.add_argument("--timeout", type=int, default=300, help="engine runner: seconds per engine")
    return ap.parse_args(argv)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(memory_kwargs(args.gpu_memory_utilization, args.kv_cache_gib), max_num_seqs=args.max_num_seqs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prefill_recent is not None and args.runner != "engine":
        sys.exit("niah_suite: --prefill-recent needs --runner engine (the hf runner attends with --recent "
                 "while prefilling too)")
    if not os.path.isdir(args.model):
        sys.exit(f"niah_suite: no model folder at {args.model}; pass --model PATH")
    out_dir = os.path.join(os.environ["OUT"], "niah_suite") if os.environ.get("OUT") else None
    os.makedirs(out_dir or RESULTS, exist_ok=True)  # the engine log goes there from the start
    try:
        methods = expand_methods(args.methods, pattern=args.pattern, sparsities=args.sparsity, sink=args.sink,
                                 recent=args.recent, prefill_recent=args.prefill_recent)
        payload = suite.measure(
            args.model, methods, suite.parse_formats(args.formats), lengths=args.lengths, depths=args.depths,
            samples=args.samples, seed=args.seed, sink=args.sink, recent=args.recent, runner=args.runner,
            time_budget=args.time_budget, timeout=args.timeout,
            engine=engine_kwargs(args),
            log_path=os.path.join(out_dir or RESULTS, "niah_suite_engine.log"),
            log=lambda line: print(line, flush=True))
    except DuoConfigError as e:
        sys.exit(f"niah_suite: {e}")
    payload["pattern"] = args.pattern
    payload["prefill_recent"] = prefill_window(args.recent, args.prefill_recent, args.runner)
    results, table, counts = payload["methods"], payload["per_format"], payload["prompts_per_format"]
    ran = next((r["total"] for r in results.values() if "total" in r), 0)
    name = args.name or f"niah_suite_{args.runner}"
    key = args.record or ("niah_suite_smollm2" if args.runner == "engine" else "niah_suite_smollm2_hf")
    failed = [m for m, r in results.items() if "error" in r]
    fname = save_result(name, payload, {} if failed else {key: table})
    png = beside(fname)
    suite.plot_table(table, counts, png, f"{os.path.basename(os.path.normpath(args.model))}, {args.runner} runner, "
                                         f"sink {args.sink}, recent {args.recent}"
                                         + (f", prefill recent {args.prefill_recent}" if args.prefill_recent else "")
                                         + f", {ran} prompts")
    print(f"niah_suite: wrote benchmarks/results/{fname} and {os.path.basename(png)}"
          + (f"; figure {key} not recorded: {failed} failed" if failed else f"; figure {key}"))
    if out_dir:
        for f in (fname, os.path.basename(png), "summary.json"):
            shutil.copy(os.path.join(RESULTS, f), os.path.join(out_dir, f))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
