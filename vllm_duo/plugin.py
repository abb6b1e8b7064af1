"""vLLM general-plugin entry point (``vllm.general_plugins``: ``duo``).

vLLM runs it in every process (front end, engine core, each worker and Ray actor), possibly
more than once, so it is idempotent. It registers the backend through vLLM's own
``register_backend`` and the streaming KV spec through vLLM's spec registry; the few
monkeypatches that have no hook live in :mod:`vllm_duo.patches`.
"""

from __future__ import annotations

import logging

from vllm_duo.errors import DuoConfigError
from vllm_duo.selection import BACKEND_PATH

logger = logging.getLogger(__name__)

_registered = False


def check_vllm_version(version: str | None = None) -> None:
    from vllm_duo.compat import SUPPORTED_SERIES, series_of

    if version is None:
        import vllm

        version = vllm.__version__
    if series_of(version) is None:
        raise DuoConfigError(
            f"vllm-duo supports vLLM {' and '.join(s + '.x' for s in SUPPORTED_SERIES)} but vLLM "
            f"{version} is installed; install one of them (pip install 'vllm==0.33.0' or "
            f"'vllm==0.26.0'; each brings the torch it needs)")


def register() -> None:
    """Make ``--attention-backend duo`` work in this process."""
    global _registered
    if _registered:
        return
    check_vllm_version()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_duo import patches
    from vllm_duo.block_manager import register_duo_kv_cache_spec

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    register_duo_kv_cache_spec()
    patches.apply()
    _registered = True
