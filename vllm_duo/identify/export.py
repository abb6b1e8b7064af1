"""Write an identified pattern in the reference format, plus its log and heatmap.

The folder holds ``full_attention_heads.tsv`` (rows = layers, columns = KV heads, tab-separated
gates, numpy ``savetxt`` like the reference) and ``config.json`` with the reference's training keys,
so ``vllm_duo.patterns.load_gates`` (and the DuoAttention code) read it like the shipped patterns.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vllm_duo.patterns import DEFAULT_SEED, PATTERN_FILE, binarize
from vllm_duo.plots import plot_heatmap

CONFIG_FILE = "config.json"
LOG_FILE = "identify_log.json"
HEATMAP_FILE = "gates_heatmap.png"
HEATMAP_SPARSITY = 0.5


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def write_pattern(out_dir: str, gates: np.ndarray, config: dict[str, Any]) -> str:
    """Write the TSV and config.json; returns the TSV path."""
    os.makedirs(out_dir, exist_ok=True)
    tsv = os.path.join(out_dir, PATTERN_FILE)
    _atomic_write(tsv, lambda p: np.savetxt(p, np.asarray(gates, dtype=np.float64), delimiter="\t"))
    write_json(os.path.join(out_dir, CONFIG_FILE), config)
    return tsv


def write_json(path: str, payload: dict[str, Any]) -> None:
    def dump(p: str) -> None:
        with open(p, "w") as f:
            json.dump(payload, f, indent=1)
    _atomic_write(path, dump)


def write_heatmap(out_dir: str, gates: np.ndarray, title: str) -> str:
    """Heatmap of the gates with the retrieval heads at sparsity 0.5 outlined."""
    mask = binarize(np.clip(gates, 0, 1), sparsity=HEATMAP_SPARSITY, seed=DEFAULT_SEED)
    path = os.path.join(out_dir, HEATMAP_FILE)
    plot_heatmap(gates, mask, path, title=f"{title} (sparsity {HEATMAP_SPARSITY})")
    return path


def reference_config(settings: dict[str, Any], *, model: str, out_dir: str, steps_done: int) -> dict[str, Any]:
    """config.json with the reference's keys where they mean the same thing here."""
    s = settings
    return {
        "model_name": model, "dataset_name": "synthetic_story_filler", "dataset_format": "multiple_passkey",
        "lr": s["lr"], "num_steps": s["steps"], "batch_size": s["batch_size"],
        "max_length": s["max_length"], "context_length_min": s["min_length"],
        "context_length_max": s["max_length"], "context_lengths_num_intervals": s["num_lengths"],
        "depth_ratio_num_intervals": s["depth_intervals"], "num_passkeys": s["num_passkeys"],
        "passkey_length": s["passkey_length"], "output_dir": out_dir,
        "sink_size": s["sink_size"], "recent_size": s["recent_size"], "reg_weight": s["reg_weight"],
        "initial_value": 1.0, "min_needle_depth_ratio": s["min_depth"],
        "max_needle_depth_ratio": s["max_depth"], "save_steps": s["save_steps"],
        "gradient_accumulation_steps": 1, "streaming_attn_implementation": "exact_chunked_sdpa",
        "supervision": "distill", "seed": s["seed"],
        # Not in the reference: how this pattern was made.
        "identified_by": "vllm-duo identify", "warmup_steps": s["warmup_steps"],
        "decay_steps": s["decay_steps"], "dtype": s["dtype"], "steps_done": steps_done,
        "dense_prompt": s.get("dense_prompt", False),
        "context_lengths": "total tokens per sample (the reference counts filler tokens only)",
    }
