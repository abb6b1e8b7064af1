"""Collect the GPU tests' evidence rows (``$VLLM_DUO_EVIDENCE`` JSONL) into
``benchmarks/results/evidence_<date>.json`` and the summary keys.

    VLLM_DUO_EVIDENCE=/tmp/evidence.jsonl pytest -m gpu tests/kernels tests/e2e/test_agreement_gpu.py
    python benchmarks/evidence.py /tmp/evidence.jsonl   # on the GPU machine, or here on its copy
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.summary import save_result  # noqa: E402
from vllm_duo.eval.evidence import read_rows, summarize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", help="evidence JSONL files written by the GPU tests")
    parser.add_argument("--command", help="the GPU command(s) that wrote the rows, when collected elsewhere")
    args = parser.parse_args()
    rows = [r for path in args.jsonl for r in read_rows(path)]
    figures = summarize(rows)
    devices = sorted({r["device"] for r in rows})
    fname = save_result("evidence", {"rows": rows, **figures}, figures, device=", ".join(devices),
                        command=args.command)
    bad = [r["test"] for r in rows if not (r["passed"] and r["separated"])]
    print(f"{fname}: {len(rows)} rows; failing or not separated: {bad or 'none'}")


if __name__ == "__main__":
    main()
