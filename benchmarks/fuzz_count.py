"""Run the config fuzz suite and record how many malformed cases it refused (figure ``fuzz_cases``).

Each case (a malformed ``duo_attention`` dict or pattern file, see tests/reliability/test_fuzz.py)
goes through parse/resolve, the front process's resolve_duo_config, the worker's
options_from_vllm_config and EngineArgs.create_engine_config, and must be refused with a clear
DuoConfigError. CPU only; the test itself writes nothing, this script writes the results.

    python benchmarks/fuzz_count.py [--examples 150]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from benchmarks.summary import save_result  # noqa: E402

ENTRY_POINTS = ("parse_options+resolve_options", "resolve_duo_config", "options_from_vllm_config",
                "EngineArgs.create_engine_config")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=150, help="hypothesis examples per fuzz test")
    args = ap.parse_args()
    os.environ["VLLM_DUO_FUZZ_EXAMPLES"] = str(args.examples)  # read when the test module is imported
    os.chdir(ROOT)
    start = time.perf_counter()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "tests/reliability/test_fuzz.py"])
    from tests.reliability import test_fuzz  # the module pytest just ran (same sys.modules entry)

    cases = dict(test_fuzz.CASES)
    total = sum(cases.values())
    print(f"fuzz: {total} malformed cases {cases}, pytest exit {int(rc)}")
    if rc != 0 or total == 0:
        sys.exit(int(rc) or 1)
    payload = dict(fuzz_cases=total, by_test=cases, examples_per_test=args.examples,
                   entry_points=list(ENTRY_POINTS), wall_s=round(time.perf_counter() - start, 1),
                   note="every case refused with DuoConfigError at every entry point (CPU)")
    print("wrote benchmarks/results/" + save_result("fuzz", payload, {"fuzz_cases": total}))


if __name__ == "__main__":
    main()
