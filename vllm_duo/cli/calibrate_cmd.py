"""``vllm-duo calibrate``: the largest sparsity whose retrieval-suite accuracy stays within a
tolerance of full attention, written into the pattern's config.json (used when no sparsity is set)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from vllm_duo.eval import calibrate

    p = sub.add_parser("calibrate", help="choose a pattern's sparsity by retrieval accuracy", description=__doc__)
    calibrate.add_arguments(p)
    p.set_defaults(func=calibrate.run)
