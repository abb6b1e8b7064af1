"""Registration of the streaming spec with vLLM's KV-cache spec registry."""

from __future__ import annotations

from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_duo.block_manager.manager import DuoStreamingManager
from vllm_duo.block_manager.spec import DuoStreamingSpec


def register_duo_kv_cache_spec() -> None:
    """Map ``DuoStreamingSpec`` to ``DuoStreamingManager``, as its own group type.

    Idempotent. Must run in every process that builds KV-cache configs or a
    scheduler (the general plugin does): unregistered, the registry's MRO walk
    would silently hand our spec to ``SlidingWindowManager``, which frees the
    sink. The built-ins are registered first because the registry fills itself
    only while empty: registering ours first would leave ``FullAttentionSpec``
    without a manager.

    The admission cap needs nothing here: ``get_manager_for_kv_cache_spec``
    passes it to any ``SlidingWindowSpec`` instance, computed by our spec's
    ``max_admission_blocks_per_request``.
    """
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(DuoStreamingSpec, DuoStreamingManager,
                                 uniform_type_base_spec=DuoStreamingSpec)
