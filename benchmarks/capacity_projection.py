"""KV capacity of duo's two streaming-prefill modes, from vLLM's own sizing code (CPU).

vLLM sizes the pool and reports its capacity at startup from the KV-cache specs and the free
memory alone. This script runs that code (``get_kv_cache_configs``, ``get_kv_cache_capacity``)
on the CPU for the memory a GPU run measured: it takes FLASH_ATTN's block count from a
``benchmarks/capacity.py`` JSON and asks what duo gets in the same memory, with the real
DuoAttention patterns, for ``streaming_prefill="rswa"`` (every prompt token stored) and
``"window"`` (tail-only streaming slots). Both agree with the H100: the ``rswa`` rows reproduce
``capacity_2026-11-23.json`` exactly, the ``window`` rows (1.974x / 3.845x) what
``capacity_window_2026-11-23.json`` measured later (1.975x / 3.847x / 3.843x).

    python benchmarks/capacity_projection.py [--measured benchmarks/results/capacity_2026-11-23.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.capacity import LLAMA2_7B  # noqa: E402
from benchmarks.summary import RESULTS, save_result  # noqa: E402
from vllm_duo.eval.engine_proc import LLAMA3_8B  # noqa: E402
from vllm_duo.options import prefill_window  # noqa: E402

CASES = [  # (row, model, measured FLASH_ATTN row, pattern, sparsity)
    ("llama3_duo_s050", LLAMA3_8B, "llama3_full", "Llama-3-8B-Instruct-Gradient-1048k", 0.5),
    ("llama3_duo_s075", LLAMA3_8B, "llama3_full", "Llama-3-8B-Instruct-Gradient-1048k", 0.75),
    ("llama2_duo_s075", LLAMA2_7B, "llama2_full", "Llama-2-7B-32K-Instruct", 0.75),
]


def project(model_dir: str, cfg: dict, full_blocks: int, pattern: str, sparsity: float,
            args: argparse.Namespace) -> dict:
    import torch
    from vllm.config import ModelConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from tests.block_manager.conftest import bytes_per_block, make_vllm_config
    from vllm_duo import compat
    from vllm_duo.block_manager import duo_kv_cache_specs, register_duo_kv_cache_spec
    from vllm_duo.options import parse_options, resolve_options

    register_duo_kv_cache_spec()
    layers, heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=args.max_model_len)
    config = make_vllm_config(model, max_model_len=args.max_model_len,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              async_scheduling=not args.no_async, enable_prefix_caching=args.prefix_caching)
    full = {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
        block_size=16, num_kv_heads=heads, head_size=head_dim, dtype=torch.bfloat16) for i in range(layers)}
    memory = full_blocks * bytes_per_block(config, full)
    (full_cfg,) = compat.get_kv_cache_configs(config, [full], [memory])
    full_tokens, full_conc = get_kv_cache_capacity(config, full_cfg)
    mask = resolve_options(parse_options({"pattern": pattern, "sparsity": sparsity}), layers, heads).mask()
    row = {"memory_bytes": memory, "flash_attn": {"num_gpu_blocks": full_cfg.num_blocks,
                                                  "kv_cache_tokens": full_tokens,
                                                  "max_concurrency": round(full_conc, 2)}}
    for mode, batches in (("rswa", 0), ("window", config.max_concurrent_batches)):
        specs = duo_kv_cache_specs(mask, block_size=16, head_size=head_dim, dtype=torch.bfloat16,
                                   sink_size=64, recent_size=256, prefill_window=args.prefill_window,
                                   tail_only_batches=batches)
        (duo_cfg,) = compat.get_kv_cache_configs(config, [specs], [memory])
        tokens, conc = get_kv_cache_capacity(config, duo_cfg)
        row[mode] = {"num_gpu_blocks": duo_cfg.num_blocks, "kv_cache_tokens": tokens,
                     "max_concurrency": round(conc, 2), "ratio": round(conc / full_conc, 3)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measured", default=os.path.join(RESULTS, "capacity_2026-11-23.json"),
                    help="a benchmarks/capacity.py JSON (FLASH_ATTN's measured block counts)")
    ap.add_argument("--max-model-len", type=int, default=65536)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384, help="LLM's default on an H100")
    ap.add_argument("--no-async", action="store_true", help="without async scheduling (one batch in flight)")
    ap.add_argument("--prefill-window", type=int, default=prefill_window(256, None),
                    help="streaming heads' window while prefilling (default: the option's default)")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="size with prefix caching on (duo's default; vLLM's sizing does not depend on it)")
    args = ap.parse_args()
    with open(args.measured) as f:
        measured = json.load(f)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for name, cfg, full_row, pattern, sparsity in CASES:
            model_dir = os.path.join(d, name)
            os.makedirs(model_dir)
            with open(os.path.join(model_dir, "config.json"), "w") as f:
                json.dump(cfg, f)
            rows[name] = project(model_dir, cfg, measured["rows"][full_row]["num_gpu_blocks"],
                                 pattern, sparsity, args)  # built-in pattern names
            r = rows[name]
            print(f"{name}: FLASH_ATTN {r['flash_attn']['max_concurrency']} x 64K; duo rswa "
                  f"{r['rswa']['max_concurrency']} ({r['rswa']['ratio']}x), window "
                  f"{r['window']['max_concurrency']} ({r['window']['ratio']}x)")
    name = "capacity_projection_prefix" if args.prefix_caching else "capacity_projection"
    save_result(name, {"rows": rows, "measured": os.path.basename(args.measured),
                       "measured_device": measured.get("device"), "max_model_len": args.max_model_len,
                       "max_num_batched_tokens": args.max_num_batched_tokens, "prefill_window": args.prefill_window,
                       "async_scheduling": not args.no_async, "enable_prefix_caching": args.prefix_caching}, {})


if __name__ == "__main__":
    main()
