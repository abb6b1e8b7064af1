"""KV-cache capacity with duo vs FLASH_ATTN, side by side in one run (GPU).

Starts one engine per configuration (fresh process each, dummy weights, same model shape,
gpu_memory_utilization 0.85) and reads vLLM's own startup figures: KV-cache size in tokens
and the maximum concurrency of 64K-token requests. Duo runs once per ``--modes`` entry
(``streaming_prefill``: "window", the default, stores only chunk tails, "rswa" every prompt
token); the summary figures are the first mode's, the others' go to ``extra``. Writes
results/capacity_<date>.json (capacity_<modes>_<date>.json for other ``--modes``).

    python benchmarks/capacity.py [--max-model-len 65536] [--modes window rswa] [--fp8] [--admit]

``--fp8`` adds FLASH_ATTN and duo (window, Llama-3-8B at 50 % and 75 %) with an fp8 KV cache:
``capacity_ratio_llama3_s050_fp8`` / ``_s075_fp8`` are duo fp8 over FLASH_ATTN in bf16.

Patterns: the built-in Llama-3-8B-Instruct-Gradient-1048k and Llama-2-7B-32K-Instruct.

``--admit``: capacity as it runs (vllm_duo/eval/admission.py): Llama-3-8B, FLASH_ATTN and duo at
50 % (first mode), each submits floor(vLLM's max concurrency) 64K-token requests (prompt +
generated) at once and the scheduler's count of requests decoding together is read; ``capacity_ratio_llama3_s050`` is then
the ratio of those counts (results/capacity_admitted_<date>.json). vLLM's figure assumes every
request at its peak at once; duo's streaming heads peak only while their prompt is prefilled
(the prefill window), so ``--requests N`` submits N to each engine to find what is admitted
beyond it (preemption-free runs only count).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.summary import save_result  # noqa: E402
from tests.e2e.engine_run import LLAMA3_8B, run_engine, write_model  # noqa: E402

LLAMA2_7B = dict(LLAMA3_8B, hidden_size=4096, intermediate_size=11008, num_key_value_heads=32,
                 vocab_size=32000, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-model-len", type=int, default=65536)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--modes", nargs="+", default=["window", "rswa"], choices=["window", "rswa"])
    ap.add_argument("--fp8", action="store_true",
                    help="also FLASH_ATTN and duo (window) with --kv-cache-dtype fp8 (Llama-3-8B, 50 %% and 75 %%)")
    ap.add_argument("--admit", action="store_true", help="admit the claimed requests and count them (Llama-3-8B, 50 %%)")
    ap.add_argument("--requests", type=int, default=None,
                    help="--admit: requests submitted to each engine (default: floor of vLLM's max concurrency)")
    args = ap.parse_args()
    if args.requests is not None and (not args.admit or args.requests < 1):
        ap.error(f"--requests {args.requests}: give a positive count, with --admit")
    if args.admit:
        return admitted(args)
    duo = [("llama3_duo_s050", LLAMA3_8B, "Llama-3-8B-Instruct-Gradient-1048k", 0.5),
           ("llama3_duo_s075", LLAMA3_8B, "Llama-3-8B-Instruct-Gradient-1048k", 0.75),
           ("llama2_duo_s075", LLAMA2_7B, "Llama-2-7B-32K-Instruct", 0.75)]
    cases = [("llama3_full", LLAMA3_8B, None, None, None), ("llama2_full", LLAMA2_7B, None, None, None)]
    for i, mode in enumerate(args.modes):
        cases += [(name + ("" if i == 0 else f"_{mode}"), cfg, p, sp, mode) for name, cfg, p, sp in duo]
    if args.fp8:
        cases += [("llama3_full_fp8", LLAMA3_8B, None, None, None)] + \
                 [(name + "_fp8", cfg, p, sp, "window") for name, cfg, p, sp in duo if name.startswith("llama3")]
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for name, cfg, pattern, sparsity, mode in cases:
            model = write_model(os.path.join(d, name.split("_")[0]), cfg)
            # Prefix caching on for every engine (vLLM's default, and duo's).
            engine = dict(max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                          max_num_seqs=64, enforce_eager=True, enable_prefix_caching=True,
                          kv_cache_dtype="fp8" if name.endswith("_fp8") else "auto")
            if pattern:
                engine.update(attention_backend="duo", additional_config={"duo_attention": {
                    "pattern": pattern, "sparsity": sparsity,
                    "streaming_prefill": mode}})
            else:
                engine.update(attention_backend="FLASH_ATTN")
            r = run_engine(dict(model=model, prompts=[[1000] * 16], max_tokens=4, engine=engine))
            rows[name] = {k: r.get(k) for k in ("kv_cache_tokens", "max_concurrency", "num_gpu_blocks")}
            print(name, rows[name], flush=True)

    def ratio(a: str, b: str, key: str) -> float:
        return round(rows[a][key] / rows[b][key], 3)

    figures = {
        "capacity_ratio_llama3_s050": ratio("llama3_duo_s050", "llama3_full", "max_concurrency"),
        "capacity_ratio_llama2_s075": ratio("llama2_duo_s075", "llama2_full", "max_concurrency"),
    }
    # The issue-17 name of the same figure: measured with prefix caching on.
    figures["capacity_ratio_llama3_s050_prefix"] = figures["capacity_ratio_llama3_s050"]
    extra = {"capacity_ratio_llama3_s075": ratio("llama3_duo_s075", "llama3_full", "max_concurrency")}
    for mode in args.modes[1:]:
        for model, sp in (("llama3", "s050"), ("llama3", "s075"), ("llama2", "s075")):
            extra[f"capacity_ratio_{model}_{sp}_{mode}"] = \
                ratio(f"{model}_duo_{sp}_{mode}", f"{model}_full", "max_concurrency")
    if args.fp8:  # duo fp8 over FLASH_ATTN in bf16 (the two savings together), and over FLASH_ATTN fp8
        for sp in ("s050", "s075"):
            figures[f"capacity_ratio_llama3_{sp}_fp8"] = ratio(f"llama3_duo_{sp}_fp8", "llama3_full", "max_concurrency")
            extra[f"capacity_ratio_llama3_{sp}_fp8_vs_fa_fp8"] = \
                ratio(f"llama3_duo_{sp}_fp8", "llama3_full_fp8", "max_concurrency")
    print("figures:", figures, extra)
    default_modes = ap.get_default("modes")
    name = ("capacity" if args.modes == default_modes else "capacity_" + "_".join(args.modes)) + \
        ("_fp8" if args.fp8 else "")
    save_result(name, {"rows": rows, "figures": figures, "extra": extra, "modes": args.modes,
                             "max_model_len": args.max_model_len}, figures)


def admitted(args: argparse.Namespace) -> None:
    from vllm_duo.eval.engine_proc import run_job

    pattern = "Llama-3-8B-Instruct-Gradient-1048k"  # built in
    engines = {"full": dict(attention_backend="FLASH_ATTN"),
               "duo_s050": dict(attention_backend="duo", additional_config={"duo_attention": {
                   "pattern": pattern, "sparsity": 0.5, "streaming_prefill": args.modes[0]}})}
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        model = write_model(os.path.join(d, "llama3"), LLAMA3_8B)
        for name, engine in engines.items():
            engine = dict(engine, load_format="dummy", skip_tokenizer_init=True, seed=0, enforce_eager=True,
                          max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                          max_num_seqs=64, enable_prefix_caching=True)  # vLLM's default, and duo's
            rows[name] = run_job("vllm_duo.eval.admission:admit", dict(
                model=model, engine=engine, context_tokens=args.max_model_len, requests=args.requests), timeout=1200)
            print(name, rows[name], flush=True)
    # Floor(vLLM's figure) must all be admitted; with --requests, more than fit may wait.
    clean = all(r["preemptions"] == 0 and (args.requests or r["max_decoding_at_once"] == r["requests"])
                for r in rows.values())
    ratio = round(rows["duo_s050"]["max_decoding_at_once"] / rows["full"]["max_decoding_at_once"], 3)
    # Prefix caching is on (the default), so the issue-17 figure is the same measurement.
    figures = {"capacity_ratio_llama3_s050": ratio, "capacity_ratio_llama3_s050_prefix": ratio} if clean else {}
    print("admitted at once:", {k: r["max_decoding_at_once"] for k, r in rows.items()}, "ratio", ratio,
          "" if clean else "(preempted or not all admitted: no summary figure)")
    save_result("capacity_admitted", {"rows": rows, "ratio": ratio, "clean": clean, "requests": args.requests,
                                      "context_tokens": args.max_model_len, "mode": args.modes[0]}, figures)


if __name__ == "__main__":
    main()
