"""Head patterns: read DuoAttention gate files, binarise them, slice them per TP rank.

Pure data (numpy only): no torch, no CUDA, no vLLM. A pattern is named by a built-in
name (:mod:`vllm_duo.builtin_patterns`) or a path. The reference format is a folder
holding ``full_attention_heads.tsv`` (rows = layers, columns = KV heads, gate values
alpha in [0, 1]) and optionally ``config.json`` (``sink_size``, ``recent_size``).
A mask value of 1 marks a retrieval head (full KV cache), 0 a streaming head.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from vllm_duo.builtin_patterns import builtin, builtin_names
from vllm_duo.errors import DuoConfigError

PATTERN_FILE = "full_attention_heads.tsv"
CALIBRATED_KEY = "calibrated_sparsity"  # written into a pattern's config.json by vllm-duo calibrate
# Tie-break noise exactly as the reference's sparsify_attention_heads (U(0, 1e-6)).
TIE_NOISE = 1e-6
DEFAULT_SEED = 42
# A 1,000-layer x 1,000-head TSV is ~10 MB; anything larger is not a head pattern (and
# reading a multi-GB file by mistake would stall startup).
MAX_FILE_BYTES = 16 << 20


@dataclass(frozen=True)
class GatePattern:
    """Continuous gates of one model, as trained, plus where they came from."""

    gates: np.ndarray  # float64 [num_layers, num_kv_heads], clipped to [0, 1]
    source: str
    sink_size: int | None = None  # training-time values from config.json, informational
    recent_size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.gates.shape)  # type: ignore[return-value]


def load_gates(path: str) -> GatePattern:
    """Load a built-in pattern (by name), a pattern folder or a bare TSV, validating what a
    user can get wrong."""
    if (found := builtin(path)) is not None:
        path = found.path
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        tsv = os.path.join(path, PATTERN_FILE)
        if not os.path.isfile(tsv):
            raise DuoConfigError(
                f"pattern folder {_short(path)} has no {PATTERN_FILE}; point 'pattern' at a "
                f"DuoAttention pattern folder or directly at its {PATTERN_FILE}")
        cfg_path = os.path.join(path, "config.json")
    elif os.path.isfile(path):
        tsv, cfg_path = path, os.path.join(os.path.dirname(path), "config.json")
    elif os.path.exists(path):
        # A FIFO or device would block or stream forever; only regular files are read.
        raise DuoConfigError(
            f"pattern {_short(path)} is not a regular file or a folder; pass a DuoAttention "
            f"pattern folder (with {PATTERN_FILE}) or the TSV file itself")
    else:
        raise DuoConfigError(
            f"pattern {_short(path)} is not a built-in name and does not exist; pass a built-in "
            f"name ({', '.join(builtin_names())}; see `vllm-duo patterns`), a pattern folder "
            f"(with {PATTERN_FILE}) or the TSV file")
    gates = _read_tsv(tsv)
    sink, recent = _read_pattern_config(cfg_path)
    return GatePattern(gates=gates, source=tsv, sink_size=sink, recent_size=recent)


def _short(path: str, limit: int = 160) -> str:
    """A path for a message: quoted, and cut in the middle if very long."""
    text = repr(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


def _read_bytes(path: str, what: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise DuoConfigError(
                f"{what} {_short(path)} is {size} bytes; a head pattern is at most a few MB "
                f"(one row of gates per layer). Is this the right file?")
        with open(path, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise DuoConfigError(f"{what} {_short(path)} cannot be read ({e.strerror or e}); "
                             f"check the path and its permissions") from None


def _read_tsv(tsv: str) -> np.ndarray:
    try:
        text = _read_bytes(tsv, "pattern file").decode("utf-8-sig")  # -sig: tolerate a BOM
    except UnicodeDecodeError:
        raise DuoConfigError(
            f"pattern file {_short(tsv)} is not text (invalid UTF-8); expected tab-separated gate values "
            f"(rows = layers, columns = KV heads)") from None
    rows = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not rows:
        raise DuoConfigError(f"pattern file {_short(tsv)} is empty; expected one row of gates per layer")
    parsed: list[list[float]] = []
    for i, ln in enumerate(rows):
        try:
            values = [float(x) for x in ln.replace(",", "\t").split()]
        except ValueError:
            raise DuoConfigError(
                f"pattern file {_short(tsv)}, row {i + 1}: {ln[:60]!r} is not a row of numbers; "
                f"expected tab-separated gate values") from None
        if not values:
            raise DuoConfigError(
                f"pattern file {_short(tsv)}, row {i + 1}: {ln[:60]!r} holds no gate values; "
                f"expected tab-separated numbers, one per KV head")
        parsed.append(values)
    widths = {len(r) for r in parsed}
    if len(widths) != 1:
        raise DuoConfigError(
            f"pattern file {_short(tsv)} is ragged (rows have {sorted(widths)[:6]} columns); every "
            f"row must have one gate per KV head. Is the file truncated?")
    gates = np.asarray(parsed, dtype=np.float64)
    bad = ~np.isfinite(gates)
    if bad.any():
        layer, head = map(int, np.argwhere(bad)[0])
        raise DuoConfigError(
            f"pattern file {_short(tsv)} has {int(bad.sum())} NaN/inf gate(s), first at layer "
            f"{layer}, KV head {head}; re-run identification or fix the file")
    # The reference clips (gates are trained with a clamp and stored slightly outside [0, 1]).
    return np.clip(gates, 0.0, 1.0)


def _read_pattern_config(cfg_path: str) -> tuple[int | None, int | None]:
    if not os.path.isfile(cfg_path):
        return None, None
    raw = _read_bytes(cfg_path, "pattern config")
    try:
        cfg = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise DuoConfigError(f"pattern config {_short(cfg_path)} is not valid JSON "
                             f"({str(e)[:80]}); fix or remove it") from None
    if not isinstance(cfg, dict):
        raise DuoConfigError(f"pattern config {_short(cfg_path)} must be a JSON object")
    sink, recent = cfg.get("sink_size"), cfg.get("recent_size")

    def whole(v: object) -> int | None:  # informational: anything but a sane token count is dropped
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 24 else None

    return whole(sink), whole(recent)


def binarize(gates: np.ndarray, *, sparsity: float | None = None,
             threshold: float | None = None, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Gates -> retrieval mask (uint8, 1 = retrieval), the reference's way.

    ``sparsity`` is the fraction of *streaming* heads: threshold = quantile(gates, sparsity)
    after adding seeded U(0, 1e-6) noise, mask = gates >= threshold (as
    ``sparsify_attention_heads`` with ``np.random.seed(seed)``). A plain ``threshold``
    skips the quantile. Same input and seed, same mask.
    """
    if (sparsity is None) == (threshold is None):
        raise DuoConfigError("give exactly one of 'sparsity' (fraction of streaming heads) or 'threshold'")
    noisy = gates + np.random.RandomState(seed).uniform(0, TIE_NOISE, gates.shape)
    if sparsity is not None:
        if sparsity >= 1:
            return np.zeros(gates.shape, dtype=np.uint8)
        if sparsity <= 0:
            return np.ones(gates.shape, dtype=np.uint8)
        threshold = float(np.quantile(noisy, sparsity))
    return (noisy >= threshold).astype(np.uint8)


def check_shape(mask: np.ndarray, num_layers: int, num_kv_heads: int, model: str = "the model") -> None:
    """Refuse a pattern made for another model, naming both shapes."""
    if tuple(mask.shape) != (num_layers, num_kv_heads):
        raise DuoConfigError(
            f"head pattern has shape {tuple(mask.shape)} (layers x KV heads) but {model} has "
            f"({num_layers}, {num_kv_heads}); use a pattern made for this model "
            f"(see `vllm-duo identify`)")


def check_tp(num_kv_heads: int, tp_size: int) -> None:
    """TP must split KV heads evenly, or replicate them evenly (vLLM's own rule)."""
    if tp_size < 1:
        raise DuoConfigError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if num_kv_heads >= tp_size and num_kv_heads % tp_size:
        raise DuoConfigError(
            f"tensor_parallel_size={tp_size} does not divide the {num_kv_heads} KV heads; "
            f"use a TP size that divides {num_kv_heads}")
    if num_kv_heads < tp_size and tp_size % num_kv_heads:
        raise DuoConfigError(
            f"tensor_parallel_size={tp_size} is larger than the {num_kv_heads} KV heads and "
            f"not a multiple of it; use a TP size that divides or is a multiple of {num_kv_heads}")


def rank_kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """Global KV-head indices that rank ``tp_rank`` holds, exactly as vLLM's QKVParallelLinear.

    KV heads are split into contiguous ranges; with more ranks than KV heads each head is
    replicated over tp_size // num_kv_heads consecutive ranks.
    """
    check_tp(num_kv_heads, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise DuoConfigError(f"tp_rank {tp_rank} outside [0, {tp_size})")
    if num_kv_heads >= tp_size:
        per_rank = num_kv_heads // tp_size
        return list(range(tp_rank * per_rank, (tp_rank + 1) * per_rank))
    return [tp_rank * num_kv_heads // tp_size]


def slice_for_rank(mask: np.ndarray, tp_size: int, tp_rank: int) -> np.ndarray:
    """The [num_layers, local_kv_heads] part of ``mask`` that one TP rank serves."""
    return mask[:, rank_kv_heads(mask.shape[1], tp_size, tp_rank)]


def kv_fraction(mask: np.ndarray, context: int, sink: int, recent: int, block_size: int = 1) -> float:
    """KV memory with duo / with full attention, for one sequence of ``context`` tokens."""
    if context <= 0:
        return 1.0
    full_blocks = math.ceil(context / block_size)
    stream_blocks = min(full_blocks, math.ceil(sink / block_size) + math.ceil(recent / block_size) + 1) \
        if block_size > 1 else min(context, sink + recent)
    r = float(mask.mean())
    return r + (1.0 - r) * stream_blocks / full_blocks


def _pattern_config(pattern: str) -> tuple[str, dict]:
    """(path, contents) of a pattern's config.json (a built-in name, a folder, or the folder
    beside a TSV); contents {} when absent or unreadable (the pattern loader reports that)."""
    if (found := builtin(pattern)) is not None:
        pattern = found.path
    folder = pattern if os.path.isdir(pattern) else os.path.dirname(os.path.abspath(pattern))
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return path, {}
    return path, cfg if isinstance(cfg, dict) else {}


def was_calibrated(pattern: str) -> bool:
    """Whether ``vllm-duo calibrate`` recorded a measurement in the pattern (even one where no
    sparsity stayed within its tolerance)."""
    return "calibration" in _pattern_config(pattern)[1]


def calibration_windows(pattern: str) -> dict[str, int]:
    """The streaming windows ``vllm-duo calibrate`` measured with (``sink_size``, ``recent_size``,
    ``prefill_window``): its sparsity holds for engines whose streaming heads see at least these."""
    suite = _pattern_config(pattern)[1].get("calibration", {}).get("suite") or {}
    recent = suite.get("recent")
    found = {"sink_size": suite.get("sink"), "recent_size": recent,
             "prefill_window": suite.get("prefill_recent") or recent}
    return {k: v for k, v in found.items() if isinstance(v, int) and not isinstance(v, bool)}


def calibrated_sparsity(pattern: str) -> float | None:
    """The sparsity ``vllm-duo calibrate`` wrote into a pattern's config.json; None if there is
    none. Used when no sparsity is given."""
    path, cfg = _pattern_config(pattern)
    value = cfg.get(CALIBRATED_KEY)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise DuoConfigError(f"{path}: {CALIBRATED_KEY} must be a fraction in [0, 1], got {value!r}; "
                             f"re-run vllm-duo calibrate or remove the key")
    return float(value)
