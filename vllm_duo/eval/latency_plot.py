"""Bar charts of a serving comparison: output tokens/s, TTFT and TPOT percentiles per backend.

Used by ``benchmarks/mixed_traffic.py`` and ``benchmarks/chat.py`` (a PNG beside each result
JSON), or by hand:

    python -m vllm_duo.eval.latency_plot RESULT.json --out result.png
"""

from __future__ import annotations

import argparse
import json
from typing import Any

# (row key, axis label, percentiles shown)
PANELS = (("output_tokens_per_s", "output tokens/s (higher: better)", None),
          ("ttft_s", "time to first token, s", ("p50", "p99")),
          ("tpot_s", "time per output token, s", ("p50", "p99")))


def panels_of(rows: dict[str, dict[str, Any]]) -> list[tuple[str, str, tuple[str, ...] | None]]:
    """The panels some backend has numbers for."""
    return [(key, label, pcts) for key, label, pcts in PANELS
            if any(isinstance(r.get(key), (int, float)) or (pcts and isinstance(r.get(key), dict)
                                                             and any(p in r[key] for p in pcts))
                   for r in rows.values())]


def plot_latencies(rows: dict[str, dict[str, Any]], title: str, out: str) -> str:
    """One panel per measured quantity, one bar (group) per backend; writes ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_of(rows)
    if not panels:
        raise ValueError("latency_plot: no output_tokens_per_s, ttft_s or tpot_s in the rows")
    backends = sorted(rows, key=lambda b: b != "FLASH_ATTN")  # the baseline first, in grey
    colors = {"FLASH_ATTN": "tab:gray", **{b: f"C{i}" for i, b in enumerate(b for b in backends if b != "FLASH_ATTN")}}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, label, pcts) in zip(axes[0], panels):
        groups = pcts or ("",)
        width = 0.8 / len(backends)
        for i, backend in enumerate(backends):
            value = rows[backend].get(key)
            ys = [value.get(p, 0.0) if isinstance(value, dict) else (value or 0.0) for p in groups]
            xs = [g + (i - (len(backends) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, ys, width, label=backend, color=colors[backend])
            ax.bar_label(bars, fmt="%.4g", fontsize=7)
        ax.set_xticks(range(len(groups)), groups if pcts else [""])
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=8)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def rows_of(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Backend rows of a mixed_traffic (``rows``) or chat (``runs``) result JSON."""
    rows = payload.get("rows") or payload.get("runs")
    if not isinstance(rows, dict) or not rows:
        raise ValueError("latency_plot: the JSON has no 'rows' or 'runs' per backend")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a mixed_traffic_*.json or chat_*.json result")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    with open(args.result) as f:
        payload = json.load(f)
    print(plot_latencies(rows_of(payload), args.title or args.result, args.out))


if __name__ == "__main__":
    main()
