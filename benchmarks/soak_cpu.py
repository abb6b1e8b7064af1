"""CPU soak of vLLM's real scheduler + KV-cache manager with duo specs (no GPU needed).

Runs the CI soak workloads (tests/reliability/sim.py) at full size and records leaked blocks,
preemptions and aborts: 1,000 seeded requests (prompts 10 to 16K tokens), 10% aborted midway,
a KV pool small enough to force preemption, a batch-independent fake model whose every
finished request must equal its solo run. The ``*-prefix`` runs turn prefix caching on (duo's
default) with shared prefixes and 6-turn conversations, and record the cached tokens; every
read is checked against a shadow of each block's contents (no stale hit).

    python benchmarks/soak_cpu.py [--runs sync async-tail-only-prefix ...] [--requests N] [--num-blocks N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from benchmarks.summary import save_result  # noqa: E402
from tests.conftest import use_cpu_platform  # noqa: E402
from tests.reliability.sim import SOAK_RUNS, run_soak, write_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", choices=list(SOAK_RUNS), default=list(SOAK_RUNS))
    ap.add_argument("--requests", type=int, help="override the number of requests")
    ap.add_argument("--num-blocks", type=int, help="override the KV pool size (block ids)")
    ap.add_argument("--seed", type=int, help="override the workload seed")
    args = ap.parse_args()
    use_cpu_platform()
    overrides = {k: v for k, v in (("num_requests", args.requests), ("num_blocks", args.num_blocks),
                                   ("seed", args.seed)) if v is not None}
    runs = []
    with tempfile.TemporaryDirectory() as d:
        model_dir = write_model_dir(d)
        for name in args.runs:
            cfg = dataclasses.replace(SOAK_RUNS[name], **overrides)
            bar = tqdm(total=cfg.num_requests, desc=f"soak {name}", unit="req")
            start = time.perf_counter()
            r = run_soak(model_dir, cfg, progress=lambda n, bar=bar: bar.update(n - bar.n))
            bar.close()
            row = dict(name=name, wall_s=round(time.perf_counter() - start, 1), config=dataclasses.asdict(cfg),
                       **{k: v for k, v in dataclasses.asdict(r).items() if k != "mismatches"},
                       mismatches=len(r.mismatches))
            print({k: v for k, v in row.items() if k != "config"}, flush=True)
            runs.append(row)
    total = {k: sum(r[k] for r in runs) for k in ("requests", "aborts", "preemptions", "finished",
                                                  "mismatches", "leaked_blocks")}
    payload = dict(total, runs=runs,
                   note="scheduler + KV-cache manager only (fake model on CPU); device is 'cpu' by design")
    fname = save_result("soak_cpu", payload, {"soak_leaked_blocks": total["leaked_blocks"]})
    print(f"wrote benchmarks/results/{fname}: {total}")
    if total["leaked_blocks"] or total["mismatches"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
