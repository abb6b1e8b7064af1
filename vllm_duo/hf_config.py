"""Reading an HF model's ``config.json`` without transformers or vLLM (CLI tools, checks)."""

from __future__ import annotations

import json
import os
from typing import Any

from vllm_duo.errors import DuoConfigError


def read_hf_config(path: str) -> dict[str, Any]:
    """The text-model config of an HF model folder or ``config.json`` path."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise DuoConfigError(f"model {path!r} has no config.json; pass an HF model folder or its "
                             "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise DuoConfigError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict) or "num_attention_heads" not in cfg.get("text_config", cfg):
        raise DuoConfigError(f"{cfg_path} is not an HF decoder config (no num_attention_heads)")
    return cfg.get("text_config", cfg)
