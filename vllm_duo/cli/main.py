"""``vllm-duo``: tools around DuoAttention head patterns."""

from __future__ import annotations

import argparse
import sys

from vllm_duo.errors import DuoConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-duo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from vllm_duo.cli import bench_cmd, calibrate_cmd, identify_cmd, inspect_cmd, niah_cmd, patterns_cmd

    patterns_cmd.add_parser(sub)
    inspect_cmd.add_parser(sub)
    identify_cmd.add_parser(sub)
    niah_cmd.add_parser(sub)
    calibrate_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DuoConfigError as e:
        print(f"vllm-duo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
