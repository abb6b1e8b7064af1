"""vLLM internals that moved or changed between the supported series, 0.26.x and 0.33.x.

Every other module reaches these through here, so a vLLM release touches one file. The series
is read once, when this module is first imported (the plugin's ``register`` does it in every
vLLM process); each entry below is bound then to that series' implementation and says which
versions it covers. Nothing here patches vLLM: duo's behaviour that differs by version lives in
subclass overrides (e.g. ``DuoStreamingSpec.num_retained_tokens``, 0.33 only) or in
:mod:`vllm_duo.patches`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheSpec

SUPPORTED_SERIES = ("0.26", "0.33")


def series_of(version: str) -> str | None:
    """The supported series (``"0.26"``/``"0.33"``) a vLLM version string belongs to, else None."""
    for series in SUPPORTED_SERIES:
        if version == series or version.startswith(series + "."):
            return series
    return None


def _installed_series() -> str:
    import vllm

    # An unsupported vLLM is refused by the plugin's version check with a clear message; here
    # it gets the newest series' bindings so that the check can run and report it.
    return series_of(vllm.__version__) or SUPPORTED_SERIES[-1]


SERIES = _installed_series()
V033 = SERIES == "0.33"


# --- KV-cache planning -------------------------------------------------------------------
# 0.26: vllm.v1.core.kv_cache_utils.{get_kv_cache_groups, get_kv_cache_configs(cfg, specs, mem),
#       _pool_bytes_per_block}; the KV-cache layout is fixed.
# 0.33: moved to vllm.v1.core.kv_cache_planning; get_kv_cache_configs takes a 4th argument,
#       get_global_kv_cache_groups(cfg, specs); sizing reads cache_config.kv_cache_layout,
#       which the engine core resolves (resolve_kv_cache_layout) before building configs.
PLANNING_MODULE = "vllm.v1.core.kv_cache_planning" if V033 else "vllm.v1.core.kv_cache_utils"


def _planning() -> Any:
    # Imported on use, so that importing this module (the version check does) cannot fail.
    return importlib.import_module(PLANNING_MODULE)


def get_kv_cache_groups(config: VllmConfig, specs: dict[str, KVCacheSpec]) -> list[KVCacheGroupSpec]:
    """vLLM's grouping of one worker's layer specs (0.26, 0.33)."""
    return _planning().get_kv_cache_groups(config, specs)


def pool_bytes_per_block(config: VllmConfig, groups: list[KVCacheGroupSpec]) -> int:
    """Bytes one block id costs in the pool, as vLLM sizes it (0.26, 0.33: private helper)."""
    return _planning()._pool_bytes_per_block(config, groups)


def get_kv_cache_configs(config: VllmConfig, specs: list[dict[str, KVCacheSpec]],
                         memory: list[int]) -> list[KVCacheConfig]:
    """One KVCacheConfig per worker, as the engine core builds them (0.26, 0.33); on 0.33 the
    KV-cache layout is resolved first when nothing set it, as the engine core does."""
    planning = _planning()
    if V033:
        resolve_kv_cache_layout(config, specs)
        groups = planning.get_global_kv_cache_groups(config, specs)
        return planning.get_kv_cache_configs(config, specs, memory, groups)
    return planning.get_kv_cache_configs(config, specs, memory)


def resolve_kv_cache_layout(config: VllmConfig, specs: list[dict[str, KVCacheSpec]]) -> None:
    """Fix the KV-cache layout the duo backend gets, as the engine core does before sizing.

    0.33 only (0.26 has one layout; no-op). Standalone tools and tests that build configs
    without an engine call this first; a layout already set is kept.
    """
    if not V033 or config.cache_config.kv_cache_layout is not None:
        return
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout as resolve

    from vllm_duo.backend.backend import DuoAttentionBackend

    names = [layout.name for layout in get_supported_kv_cache_layouts([DuoAttentionBackend])]
    resolve(config, [names], [s for worker in specs for s in worker.values()])


# --- Single-type KV-cache managers ---------------------------------------------------------
# The per-request admission cap a sliding-window manager enforces:
# 0.26: attribute ``_max_admission_blocks_per_request``; 0.33: ``max_admission_blocks_per_request``.
_ADMISSION_CAP_ATTR = "max_admission_blocks_per_request" if V033 else "_max_admission_blocks_per_request"


def admission_cap(manager: Any) -> int:
    """The admission cap (blocks per request) of a ``SlidingWindowManager`` (0.26, 0.33)."""
    return getattr(manager, _ADMISSION_CAP_ATTR)


# --- Entry points --------------------------------------------------------------------------
# ``make_arg_parser`` of ``vllm serve``:
# 0.26: vllm.entrypoints.openai.cli_args; 0.33: vllm.entrypoints.common.cli_args.
CLI_ARGS_MODULE = "vllm.entrypoints.common.cli_args" if V033 else "vllm.entrypoints.openai.cli_args"


def make_arg_parser(parser: Any) -> Any:
    """``vllm serve``'s argument parser (0.26, 0.33)."""
    return importlib.import_module(CLI_ARGS_MODULE).make_arg_parser(parser)
