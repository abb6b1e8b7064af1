"""Multi-turn chat, duo vs FLASH_ATTN, both with prefix caching on (GPU).

``--conversations`` conversations (default 64) x ``--turns`` turns (default 8); each turn appends
200-2,000 new token ids to the last prompt and its output and generates ``--max-tokens`` greedy
tokens (ignore_eos). All conversations take turn k together (one ``generate`` per turn); each
backend runs in its own fresh process on the same conversations. Llama-3-8B shape with dummy
weights (what is measured is the prefix cache and attention, not the answers), duo with the
Llama-3-8B-1048k pattern at ``--sparsity`` (a seeded random mask when the pattern is absent).

Figures (summary.json): ``prefix_hit_ratio_vs_fa`` = duo's cached prompt tokens / FLASH_ATTN's
(``num_cached_tokens`` of every request), ``chat_throughput_ratio`` = duo's generated tokens/s
over the whole run / FLASH_ATTN's, ``chat_ttft_p50_ratio`` = FLASH_ATTN's median TTFT / duo's.

    python benchmarks/chat.py [--conversations 64] [--turns 8] [--max-tokens 128] [--profile]

``--profile`` then serves the same conversations once more per backend in an in-process engine
and profiles the last turn up to every conversation's first token (``vllm_duo.eval.chat.profile_turn``:
wall, GPU-busy and host time, top kernels), to show where duo's TTFT goes. About 2 more minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.summary import beside, device_name, save_result  # noqa: E402
from tests.e2e.models import LLAMA3_PATTERN, find_pattern, random_mask  # noqa: E402
from vllm_duo.eval.chat import conversations, summary  # noqa: E402
from vllm_duo.eval.latency_plot import plot_latencies  # noqa: E402
from vllm_duo.eval.engine_proc import LLAMA3_8B, run_job, write_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--max-model-len", type=int, default=20480)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start, slower decode)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also profile the last turn's prefill per backend")
    return ap.parse_args(argv)


def engine(args: argparse.Namespace, backend: str) -> dict:
    kwargs = dict(load_format="dummy", skip_tokenizer_init=True, seed=0, max_model_len=args.max_model_len,
                  max_num_seqs=args.conversations, gpu_memory_utilization=args.gpu_memory_utilization,
                  enforce_eager=args.enforce_eager, enable_prefix_caching=True, disable_log_stats=False,
                  attention_backend=backend)
    if backend == "duo":
        pattern = find_pattern(LLAMA3_PATTERN)
        duo = {"pattern": pattern, "sparsity": args.sparsity} if pattern else \
            {"retrieval_mask": random_mask(32, 8, args.sparsity, seed=args.seed)}
        kwargs["additional_config"] = {"duo_attention": duo}
    return kwargs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    convs = conversations(args.conversations, args.turns, vocab=(1000, 120000), seed=args.seed)
    # Two short chats first, unmeasured, longer than sink + window and resumed once: every prefill
    # path compiles its kernels before the timed turns (both backends alike).
    warmup = conversations(2, 2, growth=(600, 1200), vocab=(1000, 120000), seed=args.seed + 1)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(os.path.join(tmp, "llama3-8b"), LLAMA3_8B)
        for backend in ("FLASH_ATTN", "duo"):
            result = run_job("vllm_duo.eval.chat:chat", dict(model=model, engine=engine(args, backend),
                                                             conversations=convs, warmup=warmup,
                                                             max_tokens=args.max_tokens),
                             timeout=600)
            runs[backend] = dict(summary(result), engine={k: v for k, v in engine(args, backend).items()
                                                          if k != "additional_config"})
            print(backend, {k: v for k, v in runs[backend].items() if k not in ("engine", "turn_s")}, flush=True)
        for backend in ("FLASH_ATTN", "duo") if args.profile else ():
            runs[backend]["profile"] = run_job("vllm_duo.eval.chat:profile_turn", dict(
                model=model, engine=engine(args, backend), conversations=convs, warmup=warmup,
                max_tokens=args.max_tokens), timeout=600)
            print(backend, "last turn:", runs[backend]["profile"], flush=True)
    fa, duo = runs["FLASH_ATTN"], runs["duo"]
    if not (fa["ttft_s"] and duo["ttft_s"]):
        raise SystemExit("vLLM returned no request stats (TTFT): the engines need disable_log_stats=False")
    figures = {
        "prefix_hit_ratio_vs_fa": round(duo["cached_tokens"] / max(fa["cached_tokens"], 1), 4),
        "chat_throughput_ratio": round(duo["output_tokens_per_s"] / fa["output_tokens_per_s"], 4),
        "chat_ttft_p50_ratio": round(fa["ttft_s"]["p50"] / duo["ttft_s"]["p50"], 4),
    }
    payload = dict(figures, runs=runs, workload=dict(conversations=args.conversations, turns=args.turns,
                                                     growth=[200, 2000], max_tokens=args.max_tokens),
                   method="each backend in a fresh process; one generate() per turn for all conversations; "
                          "TTFT = vLLM's first_token_latency per request; throughput = generated tokens / "
                          "summed turn wall time")
    fname = save_result("chat", payload, figures)
    print(f"wrote benchmarks/results/{fname}: {figures}")
    title = (f"multi-turn chat: {args.conversations} conversations x {args.turns} turns, "
             f"prefix caching on, {device_name()}")
    print("plot:", plot_latencies(runs, title, beside(fname)))


if __name__ == "__main__":
    main()
