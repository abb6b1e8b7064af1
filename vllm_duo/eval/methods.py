"""The attention methods the evaluations compare, as ``LLM`` keyword arguments.

``full`` is vLLM's own FLASH_ATTN; ``duo_sXXX`` the duo backend with a trained pattern at
sparsity XXX/100; ``streaming`` the duo backend with every head streaming (StreamingLLM at
the same sink/recent), the paper's baseline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from vllm_duo.builtin_patterns import builtin
from vllm_duo.errors import DuoConfigError
from vllm_duo.hf_config import read_hf_config

METHOD_CHOICES = ("full", "duo", "streaming")


@dataclass(frozen=True)
class Method:
    name: str
    backend: str  # "FLASH_ATTN" or "duo"
    duo: dict[str, Any] = field(default_factory=dict)  # additional_config["duo_attention"]

    def engine_kwargs(self) -> dict[str, Any]:
        if self.backend != "duo":
            return {"attention_backend": self.backend}
        return {"attention_backend": "duo", "additional_config": {"duo_attention": dict(self.duo)}}


def duo_name(sparsity: float) -> str:
    """0.5 -> "duo_s050" (the figure keys' spelling)."""
    return f"duo_s{round(sparsity * 100):03d}"


def expand_methods(names: list[str], *, pattern: str | None, sparsities: list[float], sink: int,
                   recent: int, prefill_recent: int | None = None,
                   streaming_prefill: str | None = None) -> list[Method]:
    """``full``/``duo``/``streaming`` -> methods; ``duo`` gives one method per sparsity."""
    unknown = sorted(set(names) - set(METHOD_CHOICES))
    if unknown:
        raise DuoConfigError(f"unknown method(s) {unknown}; choose from {list(METHOD_CHOICES)}")
    window = {"sink_size": sink, "recent_size": recent}
    if prefill_recent is not None:
        window["prefill_recent_size"] = prefill_recent
    if streaming_prefill is not None:
        window["streaming_prefill"] = streaming_prefill
    out: list[Method] = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        if name == "full":
            out.append(Method("full", "FLASH_ATTN"))
        elif name == "streaming":
            out.append(Method("streaming", "duo", {"pattern": "streaming", **window}))
        else:
            if not pattern:
                raise DuoConfigError("method 'duo' needs --pattern (a built-in name, or a DuoAttention "
                                     "pattern folder or its full_attention_heads.tsv made for this model)")
            if not sparsities:
                raise DuoConfigError("method 'duo' needs at least one --sparsity value")
            for s in sparsities:
                if not 0 <= s <= 1:
                    raise DuoConfigError(f"--sparsity must be in [0, 1], got {s}")
                where = pattern if builtin(pattern) else os.path.abspath(pattern)  # engines run elsewhere
                out.append(Method(duo_name(s), "duo", {"pattern": where,
                                                       "sparsity": s, **window}))
    return out


def model_shape(config_path: str) -> tuple[int, int, int]:
    """(layers, KV heads, max_position_embeddings) of an HF model folder or config.json."""
    cfg = read_hf_config(config_path)
    heads = cfg["num_attention_heads"]
    return cfg["num_hidden_layers"], cfg.get("num_key_value_heads", heads), cfg.get("max_position_embeddings", 0)


def check_pattern(pattern: str, layers: int, kv_heads: int, model: str) -> None:
    """Fail before any engine starts if the pattern is missing or made for another model."""
    from vllm_duo.patterns import check_shape, load_gates

    check_shape(load_gates(pattern).gates, layers, kv_heads, model)
