"""Short prompts: duo (50 % streaming) vs FLASH_ATTN output throughput, side by side (GPU).

Llama-3-8B shape with dummy weights (speed only), 1K-token prompts, 128 output tokens, batch 64,
vLLM's defaults (torch.compile, FULL_AND_PIECEWISE CUDA graphs). One engine per backend, each
in a fresh process; throughput = batch x output tokens / wall time of the batch (median of
--repeats), through ``vllm_duo.eval.bench`` part b. Then, unless --no-profile, one in-process
engine per backend measures host overhead per decode step at the same batch with the torch
profiler (``vllm_duo.eval.traffic.profile_decode``). About 5 minutes on one H200.

    python benchmarks/short_prompt.py [--pattern Llama-3-8B-Instruct-Gradient-1048k]

Writes results/short_prompt_<date>.json and the summary key short_prompt_ratio_1k_b64.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.summary import save_result  # noqa: E402
from vllm_duo.eval.bench import ratio  # noqa: E402
from vllm_duo.eval.engine_proc import LLAMA3_8B, run_job, write_model  # noqa: E402

DEFAULT_PATTERN = "Llama-3-8B-Instruct-Gradient-1048k"  # built in


def check_pattern(pattern: str, script: str) -> None:
    """A built-in name or a folder; else one line before any GPU work."""
    from vllm_duo.builtin_patterns import builtin, builtin_names

    if builtin(pattern) is None and not os.path.isdir(pattern):
        sys.exit(f"{script}: {pattern!r} is neither a built-in pattern ({', '.join(builtin_names())}) "
                 "nor a pattern folder; pass --pattern")


def backends(pattern: str, sparsity: float) -> dict[str, dict]:
    return {"FLASH_ATTN": {"attention_backend": "FLASH_ATTN"},
            "duo": {"attention_backend": "duo", "additional_config": {"duo_attention": {
                "pattern": os.path.abspath(pattern) if os.path.isdir(pattern) else pattern,
                "sparsity": sparsity}}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default=DEFAULT_PATTERN, help="duo pattern: built-in name or folder")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--profile-steps", type=int, default=50)
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    check_pattern(args.pattern, "short_prompt")
    base = dict(load_format="dummy", skip_tokenizer_init=True, seed=0, enable_prefix_caching=False,
                disable_log_stats=False, gpu_memory_utilization=args.gpu_memory_utilization,
                max_model_len=args.max_model_len, max_num_seqs=max(args.batch, 64))
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        model = write_model(os.path.join(d, "llama3_8b"), LLAMA3_8B)
        for name, kw in backends(args.pattern, args.sparsity).items():
            print(f"== {name}: throughput", flush=True)
            r = run_job("vllm_duo.eval.bench:run_parts", dict(
                model=model, engine=dict(base, **kw), parts="b",
                b=dict(prompt_tokens=args.prompt_tokens, batch=args.batch,
                       output_tokens=args.output_tokens, repeats=args.repeats)), echo=True)
            rows[name] = {"engine_start_s": r["engine_start_s"], **r["b"]}
            print(name, rows[name]["output_tokens_per_s"], "output tokens/s", flush=True)
        if not args.no_profile:
            for name, kw in backends(args.pattern, args.sparsity).items():
                print(f"== {name}: host overhead per decode step", flush=True)
                rows[name]["profile"] = run_job("vllm_duo.eval.traffic:profile_decode", dict(
                    model=model, engine=dict(base, **kw), batch=args.batch,
                    prompt_tokens=args.prompt_tokens, steps=args.profile_steps), echo=True)
                print(name, rows[name]["profile"], flush=True)
    key = f"short_prompt_ratio_{args.prompt_tokens // 1024}k_b{args.batch}"
    figures = {key: ratio(rows["duo"]["output_tokens_per_s"], rows["FLASH_ATTN"]["output_tokens_per_s"])}
    print("figures:", figures)
    save_result("short_prompt", {"rows": rows, "figures": figures, "args": vars(args)}, figures)


if __name__ == "__main__":
    main()
