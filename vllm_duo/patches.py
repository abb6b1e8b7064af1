"""Every monkeypatch of vLLM in vllm-duo, in one place, each with why.

Only for what vLLM 0.26 offers no hook for; guarded by the version check in
:func:`vllm_duo.plugin.check_vllm_version` (we pin vllm==0.26.0) and idempotent.
"""

from __future__ import annotations

import functools
from typing import Any

DUO_NAMES = ("DUO",)
_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _alias_backend_name()
    _wrap_create_engine_config()
    _wrap_attention_init()
    _applied = True


def _alias_backend_name() -> None:
    """``--attention-backend duo``: vLLM resolves names with ``AttentionBackendEnum[name.upper()]``.

    Enum members cannot be added after class creation, and out-of-tree backends only get
    the ``CUSTOM`` member, so ``DUO`` is added as an alias of ``CUSTOM`` in the enum's
    ``_member_map_`` (all lookups go through it; iteration is unchanged).
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    for name in DUO_NAMES:
        AttentionBackendEnum._member_map_.setdefault(name, AttentionBackendEnum.CUSTOM)


def _wrap_create_engine_config() -> None:
    """Resolve duo options once, in the front process, before any worker starts.

    There is no config hook for general plugins. Wrapping ``EngineArgs.create_engine_config``
    lets us (1) refuse bad patterns, models and feature combinations with a clear message
    before GPU work, and (2) embed the binary pattern in ``additional_config`` so workers on
    other nodes never read the pattern file. Prefix caching keeps vLLM's default (on) and an
    explicit ``--no-enable-prefix-caching``: cache hits bring back the streaming heads' sink and
    window blocks (:class:`vllm_duo.block_manager.DuoStreamingManager`).
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_duo_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self: EngineArgs, *args: Any, **kwargs: Any):
        config = original(self, *args, **kwargs)
        from vllm_duo.plugin import is_duo_backend_selected

        if is_duo_backend_selected(config.attention_config.backend):
            from vllm_duo.engine_config import resolve_duo_config

            resolve_duo_config(config)
        return config

    create_engine_config._duo_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def _wrap_attention_init() -> None:
    """Give each duo ``Attention`` layer its per-KV-head slot layers.

    vLLM collects KV-cache specs from the layers in ``static_forward_context``; a backend
    cannot change its layer's spec. After the stock ``Attention.__init__`` we register one
    1-head slot layer per local KV head (see :mod:`vllm_duo.backend.slots`).
    """
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.__init__
    if getattr(original, "_duo_wrapped", False):
        return

    @functools.wraps(original)
    def __init__(self: Attention, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from vllm_duo.backend.backend import DuoAttentionBackend

        if getattr(self, "attn_backend", None) is DuoAttentionBackend:
            from vllm_duo.backend.slots import attach_slots

            attach_slots(self)

    __init__._duo_wrapped = True  # type: ignore[attr-defined]
    Attention.__init__ = __init__  # type: ignore[method-assign]
