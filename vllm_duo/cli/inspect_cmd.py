"""``vllm-duo inspect PATTERN``: which heads a pattern keeps, what it saves, and a heatmap."""

from __future__ import annotations

import argparse
import os

from vllm_duo.errors import DuoConfigError
from vllm_duo.hf_config import read_hf_config
from vllm_duo.builtin_patterns import builtin_names
from vllm_duo.options import DEFAULT_RECENT, DEFAULT_SINK, DEFAULT_SPARSITY, PATTERN_FULL, PATTERN_STREAMING
from vllm_duo.patterns import DEFAULT_SEED, binarize, check_shape, kv_fraction, load_gates
from vllm_duo.plots import plot_heatmap

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a head pattern and plot its gates",
                       description=__doc__)
    p.add_argument("pattern", help="built-in pattern name (`vllm-duo patterns`), pattern folder "
                                   "(with full_attention_heads.tsv) or TSV file")
    p.add_argument("--sparsity", type=float, default=None,
                   help=f"fraction of streaming heads (default {DEFAULT_SPARSITY})")
    p.add_argument("--threshold", type=float, default=None, help="gate threshold instead of --sparsity")
    p.add_argument("--model", default=None,
                   help="HF config.json (or its folder) to check the shape and size memory")
    p.add_argument("--context", type=int, default=131072, help="context length for memory figures")
    p.add_argument("--sink", type=int, default=DEFAULT_SINK, help="sink tokens of streaming heads")
    p.add_argument("--recent", type=int, default=DEFAULT_RECENT, help="recent window of streaming heads")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--out", default=None, help="heatmap PNG path (default: <pattern>_heatmap.png here)")
    p.set_defaults(func=run)


def _model_shape(path: str) -> tuple[int, int, int, int, str]:
    """(layers, kv heads, head_dim, dtype bytes, name) from an HF config.json."""
    cfg = read_hf_config(path)
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    dtype = _DTYPE_BYTES.get(str(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))), 2)
    return cfg["num_hidden_layers"], kv, head_dim, dtype, os.path.basename(os.path.normpath(
        path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))))


def _out_path(args: argparse.Namespace) -> str:
    """The heatmap path, refused up front when its folder is missing or not writable."""
    out = args.out or f"{os.path.basename(os.path.normpath(args.pattern))}_heatmap.png"
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise DuoConfigError(f"--out {out!r}: folder {folder!r} does not exist; create it or pick another path")
    if not os.access(folder, os.W_OK):
        raise DuoConfigError(f"--out {out!r}: folder {folder!r} is not writable; pick another path")
    return out


def _check_args(args: argparse.Namespace) -> float | None:
    """Everything a user can get wrong, before any output. Returns the sparsity to use."""
    if args.pattern in (PATTERN_FULL, PATTERN_STREAMING):
        raise DuoConfigError(
            f"'{args.pattern}' has no gates to inspect (every head is a "
            f"{'retrieval' if args.pattern == PATTERN_FULL else 'streaming'} head); pass a built-in name "
            f"({', '.join(builtin_names())}) or a pattern folder")
    if args.sparsity is not None and args.threshold is not None:
        raise DuoConfigError("give --sparsity or --threshold, not both")
    sparsity = DEFAULT_SPARSITY if args.sparsity is None and args.threshold is None else args.sparsity
    if sparsity is not None and not 0 <= sparsity <= 1:
        raise DuoConfigError(f"--sparsity must be in [0, 1], got {sparsity}")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise DuoConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    for flag, value, least in (("--context", args.context, 1), ("--sink", args.sink, 0),
                               ("--recent", args.recent, 1)):
        if value < least:
            raise DuoConfigError(f"{flag} is a number of tokens >= {least}, got {value}")
    return sparsity


def run(args: argparse.Namespace) -> int:
    sparsity = _check_args(args)
    gp = load_gates(args.pattern)
    mask = binarize(gp.gates, sparsity=sparsity, threshold=args.threshold, seed=args.seed)
    layers, kv_heads = mask.shape
    model = _model_shape(args.model) if args.model else None
    if model:
        check_shape(mask, model[0], model[1], model[4])
    out = _out_path(args)
    print(f"pattern   {gp.source}")
    print(f"shape     {layers} layers x {kv_heads} KV heads; trained with sink {gp.sink_size}, recent {gp.recent_size}")
    how = f"sparsity {sparsity}" if sparsity is not None else f"threshold {args.threshold}"
    print(f"selection {how} (seed {args.seed}): {int(mask.sum())} of {mask.size} KV heads are "
          f"retrieval heads ({mask.mean():.1%})")
    print("retrieval heads per layer:")
    for i, row in enumerate(mask):
        print(f"  layer {i:3d}: {int(row.sum()):3d}/{kv_heads}  {''.join('R' if v else '.' for v in row)}")
    frac = kv_fraction(mask, args.context, args.sink, args.recent)
    print(f"KV memory at {args.context} tokens (sink {args.sink}, recent {args.recent}): "
          f"{frac:.1%} of full attention ({1 / frac:.2f}x less)")
    if model:
        m_layers, m_kv, head_dim, nbytes, name = model
        full = m_layers * m_kv * 2 * head_dim * nbytes * args.context
        print(f"model     {name}: full KV {full / 2**30:.2f} GiB per {args.context}-token sequence, "
              f"duo {full * frac / 2**30:.2f} GiB, saved {full * (1 - frac) / 2**30:.2f} GiB")
    plot_heatmap(gp.gates, mask, out, title=f"{os.path.basename(os.path.normpath(args.pattern))} ({how})")
    print(f"heatmap   {out}")
    return 0
