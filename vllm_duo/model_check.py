"""Refuse model kinds and vLLM features that duo does not serve, before any GPU work.

Works on duck-typed configs (vLLM's ModelConfig/VllmConfig), so tests can pass stand-ins.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_duo.errors import DuoConfigError

logger = logging.getLogger(__name__)

# --kv-cache-dtype values duo serves: the model's dtype, or fp8 e4m3 with per-tensor scales.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "half", "fp8", "fp8_e4m3")
# Architectures the duo path is tested with; others run with a warning.
TESTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def check_model(model_config: Any) -> None:
    """MLA, native sliding-window and encoder-decoder models cannot use duo."""
    name = getattr(model_config, "model", "the model")
    if getattr(model_config, "use_mla", False):
        raise DuoConfigError(
            f"{name} uses multi-head latent attention (MLA); duo needs per-KV-head caches. "
            f"Use another --attention-backend for this model")
    if getattr(model_config, "is_encoder_decoder", False):
        raise DuoConfigError(f"{name} is an encoder-decoder model; duo serves decoder-only models")
    window = model_config.get_sliding_window() if hasattr(model_config, "get_sliding_window") else None
    layer_types = getattr(getattr(model_config, "hf_text_config", None), "layer_types", None) or ()
    if window is not None or any("sliding" in str(t) for t in layer_types):
        raise DuoConfigError(
            f"{name} already uses sliding-window attention (window={window}); duo's streaming "
            f"heads would conflict with it. Use the model's native backend instead")
    archs = tuple(getattr(model_config, "architectures", None) or ())
    if archs and not set(archs) & set(TESTED_ARCHITECTURES):
        logger.warning("vllm-duo is tested with %s; %s may work but is untested.",
                       ", ".join(TESTED_ARCHITECTURES), ", ".join(archs))


def check_features(vllm_config: Any) -> None:
    """vLLM features duo cannot combine with yet; each error says which and what to drop."""
    cache = vllm_config.cache_config
    par = vllm_config.parallel_config
    problems = []
    if str(getattr(cache, "cache_dtype", "auto")) not in KV_CACHE_DTYPES:
        problems.append(f"KV cache dtype {cache.cache_dtype} (--kv-cache-dtype); use fp8 (e4m3 with "
                        f"per-tensor scales, as FLASH_ATTN on Hopper) or drop the flag")
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding (--speculative-config); drop it")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        problems.append("KV connectors / disaggregated prefill (--kv-transfer-config); drop it")
    if getattr(par, "decode_context_parallel_size", 1) > 1 or getattr(par, "prefill_context_parallel_size", 1) > 1:
        problems.append("context parallelism (--decode/prefill-context-parallel-size > 1); use 1")
    if (interval := retention_interval(cache)) and interval > 0:
        problems.append(f"a prefix-cache retention interval ({interval}; duo caches streaming heads' blocks "
                        "densely, as full attention does); unset VLLM_PREFIX_CACHE_RETENTION_INTERVAL / "
                        "--prefix-cache-retention-interval")
    sched = vllm_config.scheduler_config
    if getattr(sched, "disable_hybrid_kv_cache_manager", False) and _platform_has_hybrid_kv_cache():
        problems.append("--disable-hybrid-kv-cache-manager (duo's memory saving needs it); drop the flag")
    if problems:
        raise DuoConfigError("the duo attention backend does not support: " + "; ".join(problems))


def is_fp8(cache_dtype: object) -> bool:
    return str(cache_dtype).startswith("fp8")


def check_kv_cache_options(cache_config: Any, streaming_prefill: str) -> None:
    """The fp8 cache is read by duo's own kernels and FA3; vLLM's Triton R-SWA path is not wired
    to its scales."""
    if is_fp8(getattr(cache_config, "cache_dtype", "auto")) and streaming_prefill == "rswa":
        raise DuoConfigError("streaming_prefill='rswa' does not read an fp8 KV cache; use the default "
                             "'window' or drop --kv-cache-dtype fp8")


def retention_interval(cache_config: Any) -> int | None:
    """vLLM's sliding-window prefix-cache retention interval: a config field on 0.33, an
    environment variable on 0.26 (unset there means dense)."""
    if hasattr(cache_config, "prefix_cache_retention_interval"):
        return cache_config.prefix_cache_retention_interval
    import os

    value = os.environ.get("VLLM_PREFIX_CACHE_RETENTION_INTERVAL")
    return int(value) if value and value.strip().lstrip("-").isdigit() else None


def _platform_has_hybrid_kv_cache() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.support_hybrid_kv_cache())
