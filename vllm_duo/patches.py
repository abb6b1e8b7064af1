"""Every monkeypatch of vLLM in vllm-duo, in one place, each with why.

Only for what vLLM 0.26 offers no hook for; guarded by the version check in
:func:`vllm_duo.plugin.check_vllm_version` (we pin vllm==0.26.0) and idempotent.

Log (why / what vLLM lacks / when it can go):
- ``_alias_backend_name``: ``--attention-backend duo``. vLLM lacks named out-of-tree backends
  (only ``CUSTOM``). Goes when ``register_backend`` accepts a new name.
- ``_wrap_create_engine_config``: resolve duo options and refuse bad input before GPU work. vLLM lacks a config hook for general plugins. Goes with such a hook.
- ``_wrap_attention_init``: add per-KV-head slot layers. vLLM lacks a way for a backend to give
  its layer several KV-cache specs. Goes when a layer may own more than one KV cache.
- :func:`set_layer_kv_cache_spec` (per instance): the layer's own spec becomes its slot 0's.
  Same missing hook and same removal as above.
- :func:`add_forward_context_layer`: slot objects enter ``static_forward_context`` so vLLM sizes,
  allocates and binds their caches. vLLM lacks a registry for cache-only layers. Same removal.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any, Callable

from vllm_duo.selection import DUO_NAMES, is_duo_backend_selected

logger = logging.getLogger("vllm_duo")

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    _alias_backend_name()
    _wrap_create_engine_config()
    _wrap_attention_init()
    logger.debug("vllm-duo: patched vLLM (backend name alias, create_engine_config, Attention.__init__)")
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


def set_layer_kv_cache_spec(layer: Any, spec: Callable[[Any, Any], Any]) -> None:
    """Replace one duo layer's ``get_kv_cache_spec`` (this instance only) with ``spec(layer, cfg)``.

    vLLM asks each layer for one spec; a duo layer is slot 0 of its KV heads, so it must report
    that slot's spec (retrieval or streaming), not the stock full-attention one.
    """
    layer.get_kv_cache_spec = types.MethodType(spec, layer)


def add_forward_context_layer(vllm_config: Any, name: str, obj: Any) -> None:
    """Register a cache-only slot object under ``name`` in ``static_forward_context``.

    vLLM sizes, allocates and binds KV caches for exactly the layers found there.
    """
    ctx = vllm_config.compilation_config.static_forward_context
    if name in ctx:
        raise ValueError(f"duplicate duo slot layer name {name}")
    ctx[name] = obj
