"""Bar charts of ``vllm-duo bench`` results: duo beside FLASH_ATTN for each part that ran.

    python -m vllm_duo.eval.bench_plot RESULT.json [RESULT.json ...] --out bench.png
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# (part, path inside a method's row, axis label)
PANELS = (("a", ("a", "decode", "decode_tokens_per_s"), "decode tok/s, 64K requests,\nlargest batch each fits"),
          ("b", ("b", "median", "decode", "decode_tokens_per_s"), "decode tok/s, 1K prompts,\nbatch 64"),
          ("c", ("c", "max_context_tokens"), "longest single context\n(tokens)"))


def _get(row: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(row, dict) or key not in row:
            return None
        row = row[key]
    return float(row) if isinstance(row, (int, float)) else None


def plot_bench(payloads: list[dict[str, Any]], out: str) -> str:
    """One panel per part found in ``payloads`` (bench JSONs), bars per method; writes ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[str, dict[str, Any]] = {}
    for p in payloads:
        for method, row in p["rows"].items():
            rows.setdefault(method, {}).update(row)
    panels = [(part, path, label) for part, path, label in PANELS
              if any(_get(r, path) is not None for r in rows.values())]
    if not panels:
        raise ValueError("no bench part with results in the given JSON files")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    methods = sorted(rows, key=lambda m: (m != "full", m))
    for ax, (part, path, label) in zip(axes[0], panels):
        values = [_get(rows[m], path) or 0.0 for m in methods]
        bars = ax.bar(methods, values, color=["#888888" if m == "full" else "#2a7ab9" for m in methods])
        for bar, m in zip(bars, methods):
            batch = rows[m].get(part, {}).get("batch") if part == "a" else None
            text = f"{bar.get_height():,.0f}" + (f"\nbatch {batch}" if batch else "")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(f"({part}) {label}", fontsize=9)
        ax.set_ylim(0, max(values) * 1.25 or 1)
    device = payloads[0].get("device", "")
    fig.suptitle(f"vllm-duo bench: Llama-3-8B shape, duo vs FLASH_ATTN ({device}, "
                 f"{payloads[0].get('date', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench result JSON files")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args(argv)
    payloads = []
    for path in args.results:
        with open(path) as f:
            payloads.append(json.load(f))
    print(f"bench_plot: wrote {plot_bench(payloads, args.out)}")


if __name__ == "__main__":
    main()
