"""Models and patterns of the GPU tests and benchmarks (models never live in the repo).

Patterns: the package's built-in ones (tests/conftest.py PATTERNS). SmolLM2: ``$VLLM_DUO_SMOLLM2``,
default the devkit's SmolLM2-135M-Instruct folder. And a seeded model with Llama-3-8B's attention layout.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tests.conftest import PATTERNS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOLLM2 = os.environ.get("VLLM_DUO_SMOLLM2", "/tmp/models/smollm2-135m-instruct")
LLAMA3_PATTERN = "Llama-3-8B-Instruct-Gradient-1048k"
SMOLLM2_PATTERN = os.path.join(PATTERNS, "smollm2-135m-instruct")  # built-in, identified by vllm-duo
# Llama-3-8B's attention layout (32 layers x 8 KV heads, so its pattern applies; TP=2 gives 4 KV
# heads a rank) at 1/16 of the weights. Saved seeded weights, not load_format="dummy": vLLM draws
# dummy weights per parameter *shard*, so TP=1 and TP=2 would be different models.
LLAMA3_LAYOUT = dict(num_hidden_layers=32, num_key_value_heads=8, num_attention_heads=16, head_dim=64,
                     hidden_size=1024, intermediate_size=2816, vocab_size=32000,
                     max_position_embeddings=32768, rope_theta=500000.0)


def make_llama3_layout(path: str, seed: int = 0) -> str:
    """Write the seeded Llama-3-layout model (config.json + safetensors, about 0.9 GB) to ``path``."""
    from tests.e2e.reference_model import make_model

    return make_model(path, seed=seed, **LLAMA3_LAYOUT)


def find_pattern(name: str) -> str | None:
    """The pattern folder ``name`` under the tests' pattern root, or None when it is absent."""
    path = os.path.join(PATTERNS, name)
    return path if os.path.isdir(path) else None


def model_shape(model_dir: str) -> tuple[int, int]:
    """(layers, KV heads) from a HF folder's config.json, to size a retrieval mask."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    return int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))


def random_mask(layers: int, kv_heads: int, sparsity: float, seed: int = 0) -> list[list[int]]:
    """A seeded retrieval mask with round(sparsity * heads) streaming heads: plumbing tests for
    models with no identified pattern (it says nothing about accuracy)."""
    n = layers * kv_heads
    flat = np.ones(n, dtype=int)
    flat[np.random.RandomState(seed).permutation(n)[:round(sparsity * n)]] = 0
    return flat.reshape(layers, kv_heads).tolist()
