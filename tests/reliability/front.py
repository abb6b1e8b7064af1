"""The front process's config path on CPU: ``EngineArgs(...).create_engine_config()`` with duo.

This is where ``LLM(...)`` and ``vllm serve`` resolve duo options (vllm_duo/patches.py wraps
it), before any engine core, worker or GPU exists.
"""

from __future__ import annotations

from typing import Any

from vllm.config import VllmConfig


def load_plugins() -> None:
    """Register duo through its real entry point (idempotent)."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()


def create_engine_config(model_dir: str, duo: Any, **kwargs: Any) -> VllmConfig:
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=model_dir, attention_backend="duo", load_format="dummy",
                      skip_tokenizer_init=True, max_model_len=4096,
                      additional_config={"duo_attention": duo}, **kwargs)
    return args.create_engine_config()
