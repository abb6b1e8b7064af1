"""Mixed traffic: duo (50 % streaming) vs FLASH_ATTN output throughput, TTFT and TPOT (GPU).

Requests with prompt lengths log-uniform over 64..32K tokens and output lengths log-uniform over
16..512, all submitted at once; Llama-3-8B shape with dummy weights, vLLM's defaults (compile,
FULL_AND_PIECEWISE CUDA graphs). Output tokens/s = all output tokens / wall time to the last
finish; TTFT and TPOT p50/p99 from vLLM's request stats (``vllm_duo.eval.traffic``). Both
backends get the same requests, one engine each in a fresh process, in one run.

The issue's 1,000 requests hold 5.3M prompt tokens: on one H200 each backend serves them in
about 190 s after a 40-90 s engine start (2026-11-30), so both rarely fit one 9-minute device
call with the rest of a session's work. ``--backends`` runs one
backend and writes its row (``--part-out``); ``--combine A.json B.json`` then computes the
figures from two such rows (same requests: same --requests and --seed). Default: both backends,
300 requests (about 1.6M prompt tokens).

    python benchmarks/mixed_traffic.py [--requests 300] [--pattern NAME_OR_PATH]
    python benchmarks/mixed_traffic.py --requests 1000 --backends duo --part-out /tmp/duo.json
    python benchmarks/mixed_traffic.py --requests 1000 --backends FLASH_ATTN --part-out /tmp/fa.json
    python benchmarks/mixed_traffic.py --combine /tmp/duo.json /tmp/fa.json

Writes results/mixed_traffic_<date>.json and the summary key mixed_traffic_ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.short_prompt import DEFAULT_PATTERN, backends, check_pattern  # noqa: E402
from benchmarks.summary import beside, device_name, save_result  # noqa: E402
from vllm_duo.eval.bench import ratio  # noqa: E402
from vllm_duo.eval.engine_proc import LLAMA3_8B, run_job, write_model  # noqa: E402
from vllm_duo.eval.traffic import mixed_requests  # noqa: E402


def figures_of(rows: dict[str, dict]) -> dict[str, float | None]:
    return {"mixed_traffic_ratio": ratio(rows["duo"]["output_tokens_per_s"],
                                         rows["FLASH_ATTN"]["output_tokens_per_s"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default=DEFAULT_PATTERN, help="duo pattern: built-in name or folder")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=32768)
    ap.add_argument("--min-output", type=int, default=16)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--backends", nargs="+", default=["duo", "FLASH_ATTN"], choices=["duo", "FLASH_ATTN"])
    ap.add_argument("--part-out", help="write the rows of --backends here instead of the results")
    ap.add_argument("--combine", nargs=2, metavar="ROWS.json", help="figures from two --part-out files")
    args = ap.parse_args()
    if args.combine:
        parts = [json.load(open(p)) for p in args.combine]
        if len({json.dumps(p["requests"]) for p in parts}) != 1:
            sys.exit("mixed_traffic: the two parts ran different requests (--requests/--seed/lengths differ)")
        rows = {k: v for p in parts for k, v in p["rows"].items()}
        if set(rows) != {"duo", "FLASH_ATTN"}:
            sys.exit(f"mixed_traffic: --combine needs one duo and one FLASH_ATTN part, got {sorted(rows)}")
        devices = {p.get("device") for p in parts}
        if len(devices) != 1 or None in devices:
            sys.exit(f"mixed_traffic: the parts must name one device (their 'device' field), got {sorted(map(str, devices))}")
        figures = figures_of(rows)
        print("figures:", figures)
        commands = [re.sub(r"\s--part-out\s+\S+", "", p["command"]) for p in parts]  # paths of the GPU machine
        device = devices.pop()
        fname = save_result("mixed_traffic", {"rows": rows, "figures": figures, "requests": parts[0]["requests"],
                                              "parts": commands}, figures, device=device,
                            command=" and ".join(commands) + "; then --combine")
        plot(rows, parts[0]["requests"], device, fname)
        return
    if "duo" in args.backends:
        check_pattern(args.pattern, "mixed_traffic")
    requests = mixed_requests(args.requests, args.seed, (args.min_prompt, args.max_prompt),
                              (args.min_output, args.max_output))
    described = {"count": args.requests, "seed": args.seed, "prompt_range": [args.min_prompt, args.max_prompt],
                 "output_range": [args.min_output, args.max_output],
                 "prompt_tokens": sum(len(p) for p, _ in requests), "output_tokens": sum(m for _, m in requests)}
    print("requests:", described, flush=True)
    base = dict(load_format="dummy", skip_tokenizer_init=True, seed=0, enable_prefix_caching=False,
                disable_log_stats=False, gpu_memory_utilization=args.gpu_memory_utilization,
                max_model_len=args.max_prompt + args.max_output, max_num_seqs=args.max_num_seqs)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        model = write_model(os.path.join(d, "llama3_8b"), LLAMA3_8B)
        for name, kw in backends(args.pattern, args.sparsity).items():
            if name not in args.backends:
                continue
            print(f"== {name}", flush=True)
            rows[name] = run_job("vllm_duo.eval.traffic:run_requests", dict(
                model=model, engine=dict(base, **kw), requests=requests, warmup=8), echo=True)
            print(name, {k: v for k, v in rows[name].items() if k != "requests"}, flush=True)
    if args.part_out:
        from benchmarks.summary import command_line

        with open(args.part_out, "w") as f:
            json.dump({"rows": rows, "requests": described, "command": command_line(), "device": device_name()},
                      f, indent=2)
        print("wrote", args.part_out)
        return
    if set(rows) != {"duo", "FLASH_ATTN"}:
        sys.exit("mixed_traffic: a figure needs both backends; use --part-out and --combine for one at a time")
    figures = figures_of(rows)
    print("figures:", figures)
    fname = save_result("mixed_traffic", {"rows": rows, "figures": figures, "requests": described}, figures)
    plot(rows, described, device_name(), fname)


def plot(rows: dict[str, dict], requests: dict, device: str, fname: str) -> None:
    """The result's PNG beside its JSON: throughput, TTFT and TPOT per backend."""
    from vllm_duo.eval.latency_plot import plot_latencies

    lo, hi = requests.get("prompt_range", ("?", "?"))
    title = f"mixed traffic: {requests.get('count')} requests, prompts {lo}..{hi} tokens, {device}"
    print("plot:", plot_latencies(rows, title, beside(fname)))


if __name__ == "__main__":
    main()
