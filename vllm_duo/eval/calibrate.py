"""Calibrated sparsity: the largest sparsity whose retrieval-suite accuracy stays within a
tolerance of full attention, written into the pattern folder's ``config.json``.

Why: how many heads a model can stream varies by model (users report lower usable sparsity on
GQA models, drops on Qwen2.5), so a fixed default is wrong somewhere; measured on the suite
(vllm_duo/eval/suite.py) the pattern carries its own. The choice is the largest sparsity that
passes with every smaller measured sparsity passing too: with a few hundred prompts accuracy is
not monotone in sparsity, and a high sparsity passing by luck above a failing one is noise.

    python -m vllm_duo.eval.calibrate MODEL --pattern PATTERN_DIR [--runner engine]
    python -m vllm_duo.eval.calibrate MODEL --pattern PATTERN_DIR --from-results niah_suite_engine_DATE.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import CALIBRATED_KEY as CONFIG_KEY
from vllm_duo.patterns import calibrated_sparsity as read  # noqa: F401 - the reader of what write() writes
RECORD_KEY = "calibration"  # the measurement the sparsity came from
DEFAULT_TOLERANCE = 1 / 40  # one case in 40
DEFAULT_SPARSITIES = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
_EPS = 1e-9  # accuracies are ratios of counts: compare with room for float rounding


def choose(full: float, measured: Mapping[float, float], tolerance: float = DEFAULT_TOLERANCE) -> float | None:
    """The largest sparsity s with accuracy(s') >= full - tolerance for every measured s' <= s.

    ``measured``: sparsity -> accuracy. None when even the smallest measured sparsity fails.
    """
    if not 0 <= tolerance < 1:
        raise DuoConfigError(f"tolerance is an accuracy fraction in [0, 1) (0.025 = one case in 40), got {tolerance}")
    best = None
    for s in sorted(measured):
        if measured[s] < full - tolerance - _EPS:
            break
        best = s
    return best


def from_results(payload: Mapping[str, Any]) -> tuple[dict[str, Any], dict[float, dict[str, Any]]]:
    """(full attention's summary, {sparsity: duo's summary}) from a suite result payload."""
    methods = payload.get("methods", {})
    full = methods.get("full")
    duo = {float(r["duo"]["sparsity"]): r for r in methods.values()
           if isinstance(r.get("duo"), Mapping) and "sparsity" in r["duo"] and "accuracy" in r}
    if not full or "accuracy" not in full or not duo:
        raise DuoConfigError("the suite results need method 'full' and duo at one or more sparsities, all "
                             "finished; run the suite with --methods full duo")
    return full, duo


def calibration(payload: Mapping[str, Any], tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """The record written next to the chosen sparsity: the choice, and what it was measured on."""
    full, duo = from_results(payload)
    chosen = choose(full["accuracy"], {s: r["accuracy"] for s, r in duo.items()}, tolerance)
    return {
        CONFIG_KEY: chosen, "tolerance": tolerance, "full": _brief(full),
        "sparsities": {f"{s:g}": _brief(r) for s, r in sorted(duo.items())},
        "suite": {k: payload.get(k) for k in ("runner", "formats", "lengths", "depths", "samples", "seed", "sink",
                                              "recent", "prefill_recent", "device", "date", "command")},
        "rule": "largest sparsity whose suite accuracy, and every smaller measured one's, is >= full - tolerance",
    }


def _brief(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"correct": r["correct"], "total": r["total"], "accuracy": round(r["accuracy"], 4),
            "per_format": {f: v["accuracy"] for f, v in r.get("formats", {}).items()}}


def write(pattern: str, record: Mapping[str, Any]) -> str:
    """Put ``record`` into ``pattern``/config.json (other keys kept); returns the file's path."""
    from vllm_duo.builtin_patterns import builtin

    if (found := builtin(pattern)) is not None:
        pattern = found.path
    if not os.path.isdir(pattern):
        raise DuoConfigError(f"--pattern must be a pattern folder (with config.json) to write the calibration "
                             f"into, got {pattern}")
    path = os.path.join(pattern, "config.json")
    cfg = {}
    if os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
    cfg[CONFIG_KEY] = record[CONFIG_KEY]
    cfg[RECORD_KEY] = {k: v for k, v in record.items() if k != CONFIG_KEY}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vllm-duo calibrate`` (the CLI registers them, then calls :func:`run`)."""
    from vllm_duo.options import DEFAULT_RECENT, DEFAULT_SINK

    p.add_argument("model", help="HF model folder (weights + tokenizer)")
    p.add_argument("--pattern", required=True, help="the pattern folder to calibrate (its config.json is updated)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="accuracy below full attention allowed (a fraction; 0.025 = one case in 40)")
    p.add_argument("--from-results", default=None, metavar="JSON",
                   help="choose from a suite result (benchmarks/niah_suite.py) instead of measuring")
    p.add_argument("--runner", choices=["hf", "engine"], default="engine",
                   help="engine: vLLM on a GPU; hf: HF transformers (CPU is fine, slow)")
    p.add_argument("--formats", nargs="+", default=None, help="suite formats (default: all)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1500 + 850 * i for i in range(8)])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sink", type=int, default=DEFAULT_SINK)
    p.add_argument("--recent", type=int, default=DEFAULT_RECENT)
    p.add_argument("--prefill-recent", type=int, default=None,
                   help="engine runner: streaming heads' window while prefilling (default: the plugin's, "
                        "8192); the plugin then uses the calibration only with at least this prefill_recent_size")
    p.add_argument("--time-budget", type=float, default=None, help="hf runner: seconds after which no prompt starts")
    p.add_argument("--out", default=None, help="folder for the measurement JSON (default $OUT/calibrate or ./calibrate_out)")
    p.add_argument("--dry-run", action="store_true", help="report the choice; leave config.json as it is")


def run(args: argparse.Namespace) -> int:
    from vllm_duo.eval.results import default_out, write_json

    if args.prefill_recent is not None and (args.from_results or args.runner != "engine"):
        raise DuoConfigError("--prefill-recent needs --runner engine and no --from-results (a suite result "
                             "carries its own prefill window)")
    if args.from_results:
        with open(args.from_results) as f:
            payload = json.load(f)
    else:
        from vllm_duo.eval import suite
        from vllm_duo.eval.methods import expand_methods
        from vllm_duo.options import prefill_window

        methods = expand_methods(["full", "duo"], pattern=args.pattern, sparsities=args.sparsities,
                                 sink=args.sink, recent=args.recent, prefill_recent=args.prefill_recent)
        out_dir = os.path.abspath(args.out or default_out("calibrate"))
        os.makedirs(out_dir, exist_ok=True)
        payload = suite.measure(args.model, methods, suite.parse_formats(args.formats), lengths=args.lengths,
                                depths=args.depths, samples=args.samples, seed=args.seed, sink=args.sink,
                                recent=args.recent, runner=args.runner, time_budget=args.time_budget,
                                log_path=os.path.join(out_dir, "engine.log"), log=lambda s: print(s, flush=True))
        payload.update(pattern=args.pattern, date=datetime.date.today().isoformat(), device=_device(),
                       prefill_recent=prefill_window(args.recent, args.prefill_recent, args.runner),
                       command=" ".join(sys.argv))
        print(f"calibrate: measurement -> {write_json(os.path.join(out_dir, 'calibration_suite.json'), payload)}")
    record = calibration(payload, args.tolerance)
    full = record["full"]
    for s, r in record["sparsities"].items():
        print(f"calibrate: sparsity {s}: {r['correct']}/{r['total']} (full {full['correct']}/{full['total']})")
    chosen = record[CONFIG_KEY]
    if chosen is None:
        print(f"calibrate: no measured sparsity is within {args.tolerance:g} of full attention's accuracy "
              f"({full['accuracy']:.1%}); measure lower sparsities (--sparsities).")
        if not args.dry_run:  # an earlier calibrated sparsity would contradict this measurement
            print(f"calibrate: recorded the measurement and cleared {CONFIG_KEY} in {write(args.pattern, record)}; "
                  f"the plugin's default sparsity applies (with a warning)")
        return 1
    print(f"calibrate: calibrated sparsity {chosen:g} (tolerance {args.tolerance:g})")
    if not args.dry_run:
        print(f"calibrate: wrote {CONFIG_KEY}={chosen:g} into {write(args.pattern, record)}")
    return 0


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vllm-duo calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except DuoConfigError as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
