"""DuoAttention options: parse, validate and resolve ``additional_config["duo_attention"]``.

Pure data. The front process (``LLM``/``vllm serve``) resolves the pattern once into a
binary ``retrieval_mask`` that travels inside ``VllmConfig`` to every engine and worker
process, so remote Ray nodes never read the pattern file.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from vllm_duo.builtin_patterns import pick_builtin
from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import (DEFAULT_SEED, binarize, calibrated_sparsity, calibration_windows, check_shape,
                               load_gates, was_calibrated)

logger = logging.getLogger("vllm_duo")
CONFIG_KEY = "duo_attention"
PATTERN_FULL = "full"  # every head a retrieval head (testing: must equal FLASH_ATTN)
PATTERN_STREAMING = "streaming"  # every head a streaming head (StreamingLLM baseline)
DEFAULT_SINK = 64  # paper's NIAH/LongBench deployment setting
DEFAULT_RECENT = 256
# Streaming heads' window while a prompt is prefilled, unless set: prompts up to sink + 8192 tokens
# prefill densely, as the reference prefills below its 32K chunk (its accuracy figures), and take
# FLASH_ATTN's own one-call prefill; decode still reads sink + recent only.
DEFAULT_PREFILL_RECENT = 8192
DEFAULT_SPARSITY = 0.5
# Streaming heads' prompt-chunk kernel: "window" (default) = vllm-duo's Triton kernel that visits
# only sink + window tiles, O(sink + window), and lets streaming slots keep only each chunk's last
# window; "rswa" = vLLM's Triton unified attention with the same exact mask, O(context), every
# prompt token stored. Both pass the float32 reference on H100; both serve prefix-cache hits.
PREFILL_KERNELS = ("window", "rswa")
_MAX_TOKENS = 1 << 24


@dataclass(frozen=True)
class DuoOptions:
    """Validated options. ``retrieval_mask`` is set once the pattern is resolved."""

    pattern: str | None = None  # built-in name, path, "full" or "streaming"; None = pick for the model
    sparsity: float | None = None
    threshold: float | None = None
    sink_size: int = DEFAULT_SINK
    recent_size: int = DEFAULT_RECENT
    # Streaming heads' recent window while a prompt is prefilled (>= recent_size).
    prefill_recent_size: int | None = None
    seed: int = DEFAULT_SEED
    streaming_prefill: str = PREFILL_KERNELS[0]
    retrieval_mask: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)

    @property
    def prefill_window(self) -> int:
        if self.prefill_recent_size is None:
            return max(self.recent_size, DEFAULT_PREFILL_RECENT)
        return self.prefill_recent_size

    @property
    def resolved(self) -> bool:
        return self.retrieval_mask is not None

    def mask(self) -> np.ndarray:
        if self.retrieval_mask is None:
            raise DuoConfigError("duo_attention pattern was not resolved; call resolve_options first")
        return np.asarray(self.retrieval_mask, dtype=np.uint8)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["retrieval_mask"] = None if self.retrieval_mask is None else [list(r) for r in self.retrieval_mask]
        return {k: v for k, v in d.items() if v is not None}


_FIELDS = tuple(DuoOptions.__dataclass_fields__)


def prefill_window(recent_size: int, prefill_recent_size: int | None, runner: str = "engine") -> int:
    """The streaming heads' window while a prompt is prefilled, as an evaluation runner applies it
    (the engine: the option's default when unset; the HF reference: always ``recent_size``), so a
    result records the window it was measured with."""
    if runner != "engine":
        return recent_size
    return DuoOptions(recent_size=recent_size, prefill_recent_size=prefill_recent_size).prefill_window


def show(value: Any, limit: int = 60) -> str:
    """A short repr for error messages: never huge, never raising (ints past Python's
    4300-digit str limit, objects with broken __repr__)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - any repr failure just means "show the type"
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 15]}...({type(value).__name__})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(name: str, value: Any, minimum: int) -> int:
    if not _is_number(value) or (isinstance(value, float) and (not math.isfinite(value) or not value.is_integer())):
        raise DuoConfigError(f"duo_attention.{name} must be a whole number of tokens, got {show(value)}")
    if not minimum <= value <= _MAX_TOKENS:
        raise DuoConfigError(
            f"duo_attention.{name} must be between {minimum} and {_MAX_TOKENS}, got {show(value)}")
    return int(value)


def _fraction(name: str, value: Any) -> float:
    # Ints are compared exactly (math.isfinite overflows on ints past float range).
    if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise DuoConfigError(f"duo_attention.{name} must be a number in [0, 1], got {show(value)}")
    if not 0 <= value <= 1:
        raise DuoConfigError(
            f"duo_attention.{name} must be in [0, 1] (the fraction of streaming heads for "
            f"sparsity), got {show(value)}")
    return float(value)


def _mask(value: Any) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(r, (list, tuple)) and r for r in value):
        raise DuoConfigError("duo_attention.retrieval_mask must be a non-empty list of rows (layers) of 0/1")
    if len({len(r) for r in value}) != 1:
        raise DuoConfigError("duo_attention.retrieval_mask is ragged; every layer needs one entry per KV head")
    # Type first: ``v in (0, 1)`` would call __eq__ of arbitrary objects (numpy arrays raise).
    if not all(isinstance(v, (int, np.integer)) and v in (0, 1) for r in value for v in r):
        raise DuoConfigError("duo_attention.retrieval_mask entries must be 0 (streaming) or 1 (retrieval)")
    return tuple(tuple(int(v) for v in r) for r in value)


def parse_options(raw: Any) -> DuoOptions:
    """Validate a user's ``duo_attention`` dict (types, ranges, unknown keys)."""
    if raw is None:  # no duo_attention entry: defaults, and the pattern is picked for the model
        return DuoOptions()
    if not isinstance(raw, dict):
        raise DuoConfigError(f"additional_config['{CONFIG_KEY}'] must be a JSON object, got {type(raw).__name__}")
    unknown = [show(k) for k in raw if not (isinstance(k, str) and k in _FIELDS)]
    if unknown:
        raise DuoConfigError(f"unknown duo_attention option(s) {', '.join(sorted(unknown)[:5])}; "
                             f"valid options are {', '.join(_FIELDS)}")
    pattern = raw.get("pattern")
    if pattern is not None and (not isinstance(pattern, str) or not pattern.strip()):
        raise DuoConfigError(
            f"duo_attention.pattern must be a built-in name (`vllm-duo patterns`), a path, "
            f"'{PATTERN_FULL}' or '{PATTERN_STREAMING}', got {show(pattern)}")
    sparsity = None if raw.get("sparsity") is None else _fraction("sparsity", raw["sparsity"])
    threshold = None if raw.get("threshold") is None else _fraction("threshold", raw["threshold"])
    if sparsity is not None and threshold is not None:
        raise DuoConfigError("give either duo_attention.sparsity or duo_attention.threshold, not both")
    sink = _whole("sink_size", raw.get("sink_size", DEFAULT_SINK), 0)
    recent = _whole("recent_size", raw.get("recent_size", DEFAULT_RECENT), 1)
    prefill = raw.get("prefill_recent_size")
    if prefill is not None:
        prefill = _whole("prefill_recent_size", prefill, 1)
        if prefill < recent:
            raise DuoConfigError(
                f"duo_attention.prefill_recent_size ({prefill}) must be >= recent_size ({recent}); "
                f"it widens the streaming window during prefill, it cannot narrow it")
    seed = raw.get("seed", DEFAULT_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise DuoConfigError(f"duo_attention.seed must be an integer in [0, 2**32), got {show(seed)}")
    kernel = raw.get("streaming_prefill", PREFILL_KERNELS[0])
    if not isinstance(kernel, str) or kernel not in PREFILL_KERNELS:
        raise DuoConfigError(f"duo_attention.streaming_prefill must be one of "
                             f"{', '.join(map(repr, PREFILL_KERNELS))}, got {show(kernel)}")
    mask = None if raw.get("retrieval_mask") is None else _mask(raw["retrieval_mask"])
    return DuoOptions(pattern=pattern, sparsity=sparsity, threshold=threshold, sink_size=sink,
                      recent_size=recent, prefill_recent_size=prefill, seed=seed,
                      streaming_prefill=kernel, retrieval_mask=mask)


def resolve_options(opts: DuoOptions, num_layers: int, num_kv_heads: int, model: str = "the model",
                    model_names: list[str] | None = None) -> DuoOptions:
    """Turn the pattern into a validated binary mask for a model of the given shape.

    With no pattern and no mask, the built-in pattern whose model name (``model_names``, else
    ``model``) and shape match is used; none matching is an error listing the built-ins.
    """
    if opts.pattern is None and opts.retrieval_mask is None:
        picked = pick_builtin(model_names or [model], num_layers, num_kv_heads)
        opts = replace(opts, pattern=picked.name)
    if opts.pattern == PATTERN_FULL:
        mask = np.ones((num_layers, num_kv_heads), dtype=np.uint8)
    elif opts.pattern == PATTERN_STREAMING:
        mask = np.zeros((num_layers, num_kv_heads), dtype=np.uint8)
    elif opts.pattern is not None:
        gates = load_gates(opts.pattern).gates
        check_shape(gates, num_layers, num_kv_heads, model)
        sparsity = opts.sparsity if opts.threshold is None else None
        if opts.threshold is None and sparsity is None:
            sparsity = calibrated_sparsity(opts.pattern)
            if sparsity is None:
                sparsity = DEFAULT_SPARSITY
                if was_calibrated(opts.pattern):
                    logger.warning("vllm-duo: the calibration in pattern %s found no sparsity within its "
                                   "tolerance of full attention; using the default %g. Set \"sparsity\" "
                                   "(lower loses less) or re-run vllm-duo calibrate", opts.pattern, sparsity)
            elif narrower := {k: v for k, v in calibration_windows(opts.pattern).items() if getattr(opts, k) < v}:
                logger.warning("vllm-duo: pattern %s's calibrated sparsity %g was measured with %s; this engine's "
                               "streaming heads see less (%s), so the default %g applies. Set \"sparsity\", or "
                               "those windows to use the calibration", opts.pattern, sparsity,
                               ", ".join(f"{k}={v}" for k, v in narrower.items()),
                               ", ".join(f"{k}={getattr(opts, k)}" for k in narrower), DEFAULT_SPARSITY)
                sparsity = DEFAULT_SPARSITY
            else:
                logger.info("vllm-duo: sparsity %g from the calibration in pattern %s (vllm-duo calibrate); "
                            "set \"sparsity\" to override", sparsity, opts.pattern)
        mask = binarize(gates, sparsity=sparsity, threshold=opts.threshold, seed=opts.seed)
        opts = replace(opts, sparsity=sparsity)
    else:
        mask = opts.mask()
    check_shape(mask, num_layers, num_kv_heads, model)
    return replace(opts, retrieval_mask=tuple(tuple(int(v) for v in r) for r in mask))
