"""Regenerate the tables of README.md and docs/results.md from benchmarks/results (``--check``: only compare).

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
    ap.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    args = ap.parse_args()
    stale = []
    for name, generated in tables(os.path.join(ROOT, "benchmarks", "results")).items():
        path = os.path.join(ROOT, name)
        with open(path) as f:
            old = f.read()
        new = render(old, generated)
        if new != old:
            stale.append(name)
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    if args.check:
        print(f"stale tables in {stale}: run python benchmarks/readme_tables.py" if stale else "tables up to date",
              file=sys.stderr if stale else sys.stdout)
        return int(bool(stale))
    print(f"wrote {stale or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
