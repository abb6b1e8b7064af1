"""Regenerate README.md's results and evidence tables from benchmarks/results (``--check``: only compare).

    python benchmarks/readme_tables.py [--check]
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package

from vllm_duo.eval.readme_tables import render, tables  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's tables are stale")
    args = ap.parse_args()
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        old = f.read()
    new = render(old, tables(os.path.join(ROOT, "benchmarks", "results")))
    if args.check:
        print("README tables up to date" if new == old else "README tables are stale: run "
              "python benchmarks/readme_tables.py", file=sys.stderr if new != old else sys.stdout)
        return int(new != old)
    with open(path, "w") as f:
        f.write(new)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
