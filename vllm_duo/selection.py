"""Which attention backend a config names: duo's registry path and the names users type.

Shared by :mod:`vllm_duo.plugin` (registration) and :mod:`vllm_duo.patches` (the config
wrapper), so neither imports the other.
"""

from __future__ import annotations

from typing import Any

BACKEND_PATH = "vllm_duo.backend.backend.DuoAttentionBackend"
DUO_NAMES = ("DUO",)


def is_duo_backend_selected(backend: object) -> bool:
    """True when a config's attention backend is the CUSTOM slot and it is ours."""
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    return backend is AttentionBackendEnum.CUSTOM and _ATTN_OVERRIDES.get(backend) == BACKEND_PATH


def names_duo(backend: Any) -> bool:
    """True when engine args name duo ("duo", "DUO", the CUSTOM slot) before vLLM resolves them."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if isinstance(backend, str):
        return backend.upper() in DUO_NAMES + ("CUSTOM",)
    return backend is AttentionBackendEnum.CUSTOM
