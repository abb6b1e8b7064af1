"""The longest request that completes on one GPU: duo at 50 % vs FLASH_ATTN's largest (GPU).

Llama-3-8B-Instruct-Gradient-1048k's shape (Llama-3-8B, 1,048,576 positions) with dummy weights
(memory and speed only). Each backend starts with ``max_model_len=-1`` (vLLM fits the longest
context its KV pool holds, up to the positions) and ``max_num_seqs=1``. Duo then runs one request
of that length (prompt + ``--output-tokens``) to completion: its prefill time (TTFT) and decode
tokens/s are recorded. FLASH_ATTN's figure is its admissible length (add --verify-fa to run
that request too). About 8 minutes on one H200 (the 1M-token prefill dominates).

    python benchmarks/max_context.py [--kv-cache-dtype fp8] [--verify-fa]

Writes results/max_context[_fp8]_<date>.json and the summary keys max_context_tokens_verified and
max_context_tokens_fa_admissible (with _fp8 for --kv-cache-dtype fp8).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.short_prompt import DEFAULT_PATTERN, backends, check_pattern  # noqa: E402
from benchmarks.summary import save_result  # noqa: E402
from vllm_duo.eval.engine_proc import LLAMA3_8B, EngineJobError, run_job, write_model  # noqa: E402

POSITIONS = 1_048_576  # Llama-3-8B-Instruct-Gradient-1048k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default=DEFAULT_PATTERN, help="duo pattern: built-in name or folder")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--positions", type=int, default=POSITIONS, help="the model's max_position_embeddings")
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="both backends' KV cache (fp8: e4m3); the figures get a _fp8 suffix")
    ap.add_argument("--verify-fa", action="store_true", help="also run FLASH_ATTN's longest request")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per engine")
    args = ap.parse_args()
    check_pattern(args.pattern, "max_context")
    if args.output_tokens < 2:
        sys.exit("max_context: --output-tokens must be >= 2 (decode speed needs a second token)")
    base = dict(load_format="dummy", skip_tokenizer_init=True, seed=0, max_model_len=-1, max_num_seqs=1,
                disable_log_stats=False, gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_dtype=args.kv_cache_dtype)
    rows: dict[str, dict] = {}
    engines = backends(args.pattern, args.sparsity)
    with tempfile.TemporaryDirectory() as d:
        model = write_model(os.path.join(d, "llama3_8b_1m"), dict(LLAMA3_8B, max_position_embeddings=args.positions))
        for name in ("duo", "FLASH_ATTN"):  # duo's request first: it is the figure
            verify = name == "duo" or args.verify_fa
            print(f"== {name}: longest context{' and one request of it' if verify else ''}", flush=True)
            try:
                rows[name] = run_job("vllm_duo.eval.bench:run_parts", dict(
                    model=model, engine=dict(base, **engines[name]), parts="c",
                    c=dict(max_positions=args.positions, verify=1.0 if verify else 0.0,
                           verify_tokens=args.output_tokens)), echo=True, timeout=args.timeout)
            except EngineJobError as e:
                rows[name] = {"error": str(e)[-2000:]}
                print(f"max_context: {name} failed: {str(e)[-500:]}", file=sys.stderr, flush=True)
                continue
            print(name, rows[name]["c"], flush=True)
    figures: dict[str, int] = {}
    if "c" in rows["FLASH_ATTN"]:
        figures["max_context_tokens_fa_admissible"] = rows["FLASH_ATTN"]["c"]["max_context_tokens"]
    done = rows["duo"].get("c", {}).get("verify", {})
    if done.get("generated") == args.output_tokens:  # the request completed
        figures["max_context_tokens_verified"] = done["prompt_tokens"] + done["generated"]
    suffix = "" if args.kv_cache_dtype == "auto" else f"_{args.kv_cache_dtype}"
    figures = {k + suffix: v for k, v in figures.items()}
    print("figures:", figures)
    save_result("max_context" + suffix, {"rows": rows, "figures": figures, "args": vars(args)}, figures)


if __name__ == "__main__":
    main()
