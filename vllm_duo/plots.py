"""Plots shared by the CLI tools (matplotlib, Agg; imported lazily so nothing else needs it)."""

from __future__ import annotations

import numpy as np


def plot_heatmap(gates: np.ndarray, mask: np.ndarray, path: str, title: str) -> None:
    """Gates as a layers x heads heatmap; retrieval heads outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    layers, heads = gates.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * heads + 2.5), max(4.0, 0.22 * layers + 1.5)))
    im = ax.imshow(gates, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for layer, head in np.argwhere(mask == 1):
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\nred = retrieval head ({int(mask.sum())}/{mask.size})", fontsize=9)
    fig.colorbar(im, ax=ax, label="gate α")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
