"""``vllm-duo patterns``: the built-in head patterns, the models they are made for, and their source."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("patterns", help="list the built-in head patterns", description=__doc__)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_duo.builtin_patterns import BUILTINS, LICENSE_FILE
    from vllm_duo.patterns import load_gates

    rows = [("name", "model", "shape (layers x KV heads)", "source")]
    for p in BUILTINS:
        layers, kv = load_gates(p.path).shape
        rows.append((p.name, ", ".join(p.models), f"{layers} x {kv}", p.source))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    print(f"\nUse one by name (\"pattern\": NAME), or leave \"pattern\" out: duo picks the built-in whose "
          f"model name and shape match the served model.\nDuoAttention's MIT notice: {LICENSE_FILE}")
    return 0
