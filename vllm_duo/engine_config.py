"""Front-process resolution of duo options against the real model and parallel config."""

from __future__ import annotations

import logging
from typing import Any

from vllm_duo.errors import DuoConfigError
from vllm_duo.model_check import check_features, check_kv_cache_options, check_model
from vllm_duo.options import CONFIG_KEY, DuoOptions, parse_options, resolve_options
from vllm_duo.patterns import check_shape, check_tp

logger = logging.getLogger("vllm_duo")


def model_shape(model_config: Any) -> tuple[int, int]:
    """(num_layers, total KV heads) as vLLM sees the model."""
    return (int(model_config.hf_text_config.num_hidden_layers),
            int(model_config.get_total_num_kv_heads()))


def model_names(model_config: Any) -> list[str]:
    """The names a served model goes by: its path or HF id, config ``_name_or_path``, served names."""
    served = getattr(model_config, "served_model_name", None)
    served = [served] if isinstance(served, str) else list(served or [])
    names = [model_config.model, getattr(model_config.hf_config, "_name_or_path", None), *served]
    return [str(n) for n in names if n]


def resolve_duo_config(vllm_config: Any) -> DuoOptions:
    """Validate everything duo needs and embed the binary mask in ``additional_config``."""
    model_config = vllm_config.model_config
    check_model(model_config)
    check_features(vllm_config)
    extra = vllm_config.additional_config
    if not isinstance(extra, dict):
        raise DuoConfigError("additional_config must be a JSON object holding a 'duo_attention' entry")
    raw = extra.get(CONFIG_KEY)
    opts = parse_options(raw)
    check_kv_cache_options(vllm_config.cache_config, opts.streaming_prefill)
    num_layers, num_kv_heads = model_shape(model_config)
    check_tp(num_kv_heads, vllm_config.parallel_config.tensor_parallel_size)
    picking = opts.pattern is None and not opts.resolved
    opts = resolve_options(opts, num_layers, num_kv_heads, model=str(model_config.model),
                           model_names=model_names(model_config))
    if picking:
        logger.info("vllm-duo: no pattern given; using the built-in pattern %s (its model name and "
                    "shape %d x %d match %s).", opts.pattern, num_layers, num_kv_heads, model_config.model)
    extra[CONFIG_KEY] = opts.to_dict()
    mask = opts.mask()
    logger.info("vllm-duo: %d of %d KV heads are retrieval heads (pattern %s, sparsity %s); "
                "sink %d, recent %d, prefill window %d.%s", int(mask.sum()), mask.size,
                opts.pattern or "embedded", opts.sparsity, opts.sink_size, opts.recent_size,
                opts.prefill_window, concurrency_note(opts))
    return opts


def concurrency_note(opts: DuoOptions) -> str:
    """Why vLLM's "Maximum concurrency" line undercounts duo when the prefill window is wider
    than the recent one: vLLM counts every request at its peak, and a streaming head's peak
    lasts only while that request's prompt prefills."""
    if opts.prefill_window <= opts.recent_size:
        return ""
    return (f" vLLM's \"Maximum concurrency\" line counts every request at its prefill peak (a streaming "
            f"head may hold {opts.prefill_window}+ tokens while its prompt prefills, sink + "
            f"{opts.recent_size} once decoding), so the scheduler admits more requests than it says; "
            f"\"prefill_recent_size\": {opts.recent_size} trades accuracy for its figure.")


def options_from_vllm_config(vllm_config: Any) -> DuoOptions:
    """Worker side: the already-resolved options (never reads the pattern file).

    An embedded mask is still checked against the model: a config built without the front
    process's wrapper (or edited after it) must not reach the slot plan with the wrong shape.
    """
    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    opts = parse_options(extra.get(CONFIG_KEY))
    shape, model = model_shape(vllm_config.model_config), str(vllm_config.model_config.model)
    if not opts.resolved:
        return resolve_options(opts, *shape, model=model)
    check_shape(opts.mask(), *shape, model)
    return opts
