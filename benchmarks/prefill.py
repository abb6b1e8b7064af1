"""Prefill speed: duo vs FLASH_ATTN, one attention layer and the whole model (GPU, issue 5).

Speedup = FLASH_ATTN time / duo time. With a fraction r of KV heads kept as retrieval heads,
attention ideally speeds up by 1/r (2x at sparsity 0.5, 4x at 0.75): streaming heads cost
O(sink + window) per query instead of O(context).

attention: one Llama-3-8B layer (32 q heads, 8 KV heads, head_dim 128, bf16, block 16), the
    whole prompt processed chunk by chunk (or in one piece). FA3 full causal over 8 heads vs duo:
    FA3 per retrieval slot + one ``streaming_prefill`` launch for the streaming slots, and
    optionally vLLM's Triton R-SWA per streaming slot (the earlier path: O(context)).
    CUDA-event time of the whole prompt, median of repeats.
model: ``LLM`` with Llama-3-8B's shape and dummy weights, one prompt at a time, max_tokens=1,
    FLASH_ATTN vs duo with a DuoAttention pattern; each engine in its own process, each prompt
    timed --repeats times (median). Duo runs
    with ``--streaming-prefill`` (default "window": the O(window) kernel).

    python benchmarks/prefill.py --part attention [--lengths 32768 131072] [--chunks 16384 0]
    python benchmarks/prefill.py --part model [--lengths 32768 131072] [--budgets default]
    python benchmarks/prefill.py --part window-configs --lengths 1024 32768 --batches 64 1

window-configs: the window kernel's launch tiles (BLOCK_M, BLOCK_N, warps, stages, GQA packing) on fresh
    prompts against FA3 causal over the same query heads; a table to choose
    ``ops.prefill.launch_config`` from (no summary figure).

``--chunks 0`` / ``--budgets unchunked`` = the whole prompt in one step; ``default`` = vLLM's
own max_num_batched_tokens (16384 for ``LLM`` on a >= 70 GB GPU). Writes
results/prefill_<part>_<date>.json (and a PNG beside it) and the summary entries
prefill_attn_ratio_128k_s050 (attention, 16K chunks) and prefill_ratio_128k_s050 / _256k_s050 (model, first
budget).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.summary import beside, device_name, save_result  # noqa: E402

HQ, HKV, D, BS, DTYPE = 32, 8, 128, 16, torch.bfloat16
G = HQ // HKV
PATTERN = "Llama-3-8B-Instruct-Gradient-1048k"  # built-in


# ---------------------------------------------------------------------------- attention layer

def gpu_time_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (Triton JIT, FA3 scheduler)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Layer:
    """One layer's inputs for an L-token prompt: q, a full 8-head FA cache and 8 slot caches.
    As in vLLM, all retrieval slots share one block table, and all streaming slots another."""

    def __init__(self, L: int, sink: int, window: int):
        self.L, self.sink, self.window = L, sink, window
        nb = L // BS + 1
        dev = "cuda"
        self.q = torch.randn(L, HQ, D, dtype=DTYPE, device=dev)
        self.k_new, self.v_new = torch.randn(2, L, HKV, D, dtype=DTYPE, device=dev)  # step's K/V
        self.out = torch.empty_like(self.q)
        self.kv = torch.empty(2, nb, BS, HKV, D, dtype=DTYPE, device=dev).uniform_(-1, 1)
        self.table = torch.randperm(nb, device=dev, dtype=torch.int32)[None, :]
        from vllm.utils.torch_utils import canonicalize_singleton_dim_strides as canon

        # vLLM's FlashAttention layout of a 1-head slot cache; K/V views as the impl makes them
        slots = torch.empty(HKV, nb, BS, 1, 2 * D, dtype=DTYPE, device=dev).uniform_(-1, 1)
        self.slots = list(slots)
        self.slot_k = [canon(c[..., :D]) for c in slots]
        self.slot_v = [canon(c[..., D:]) for c in slots]
        self.retrieval_table = torch.randperm(nb, device=dev, dtype=torch.int32)[None, :]
        self._streaming_table = torch.randperm(nb, device=dev, dtype=torch.int32)[None, :]

    def steps(self, chunk: int) -> list[tuple[int, int]]:
        c = chunk or self.L
        return [(s, min(self.L, s + c)) for s in range(0, self.L, c)]

    def step_meta(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        cu = torch.tensor([0, e - s], dtype=torch.int32, device="cuda")
        return cu, torch.tensor([e], dtype=torch.int32, device="cuda")

    def streaming_table(self, s: int) -> torch.Tensor:
        """The builder's streaming table for a step starting at s: freed gap -> null block 0."""
        t = self._streaming_table.clone()
        t[:, -(-self.sink // BS):max(0, s - self.window + 1) // BS] = 0
        return t


def full_fa(layer: Layer, chunk: int) -> Callable[[], None]:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    steps = [(s, e, *layer.step_meta(s, e)) for s, e in layer.steps(chunk)]

    def run() -> None:
        for s, e, cu, seq in steps:
            flash_attn_varlen_func(
                q=layer.q[s:e], k=layer.kv[0], v=layer.kv[1], out=layer.out[s:e], cu_seqlens_q=cu,
                max_seqlen_q=e - s, seqused_k=seq, max_seqlen_k=e, softmax_scale=D ** -0.5,
                causal=True, block_table=layer.table, fa_version=3)
    return run


def duo(layer: Layer, chunk: int, n_streaming: int, streaming_path: str) -> Callable[[], None]:
    """Retrieval slots 0..7-n (FA3 each), streaming slots the rest: one ``streaming_prefill``
    launch per step, or (``triton_rswa``, the earlier path: O(context)) vLLM's Triton R-SWA
    kernel per slot."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_duo.ops import streaming_prefill

    retrieval = range(HKV - n_streaming)
    streaming = list(range(HKV - n_streaming, HKV))
    steps = [(s, e, *layer.step_meta(s, e), layer.streaming_table(s)) for s, e in layer.steps(chunk)]
    sink_lens = torch.full((1,), layer.sink, dtype=torch.int32, device="cuda")
    dev = "cuda"
    kv_ptrs = torch.tensor([layer.slots[h].data_ptr() for h in streaming], dtype=torch.int64, device=dev)
    heads = torch.tensor(streaming, dtype=torch.int32, device=dev)
    strides = torch.full((len(streaming),), layer.table.shape[1], dtype=torch.int64, device=dev)

    def run() -> None:
        for s, e, cu, seq, table in steps:
            n = e - s
            for h in retrieval:
                flash_attn_varlen_func(
                    q=layer.q[s:e, h * G:(h + 1) * G], k=layer.slot_k[h], v=layer.slot_v[h],
                    out=layer.out[s:e, h * G:(h + 1) * G], cu_seqlens_q=cu, max_seqlen_q=n,
                    seqused_k=seq, max_seqlen_k=e, softmax_scale=D ** -0.5, causal=True,
                    block_table=layer.retrieval_table, fa_version=3)
            if not streaming:
                continue
            if streaming_path == "kernel":
                bt_ptrs = torch.full((len(streaming),), table.data_ptr(), dtype=torch.int64, device=dev)
                streaming_prefill(layer.q[s:e], layer.k_new[s:e], layer.v_new[s:e], kv_ptrs, bt_ptrs,
                                  strides, heads, cu, seq, max_query_len=n, num_kv_heads=HKV, block_size=BS,
                                  sink_size=layer.sink, window=layer.window, scale=D ** -0.5,
                                  out=layer.out[s:e])
                continue
            for h in streaming:
                unified_attention(
                    q=layer.q[s:e, h * G:(h + 1) * G], k=layer.slot_k[h], v=layer.slot_v[h],
                    out=layer.out[s:e, h * G:(h + 1) * G], cu_seqlens_q=cu, max_seqlen_q=n,
                    seqused_k=seq, max_seqlen_k=e, softmax_scale=D ** -0.5, causal=True,
                    window_size=(-1, -1), block_table=table, softcap=0, q_descale=None,
                    k_descale=None, v_descale=None, rswa_prefix_lens=sink_lens,
                    rswa_window=layer.window)
    return run


def attention_part(args) -> tuple[list[dict], dict[str, float]]:
    from tqdm import tqdm

    rows, figures = [], {}
    configs = [(L, c) for L in args.lengths for c in args.chunks]
    print(f"{'prompt':>7} {'chunk':>6} {'sparsity':>8} {'path':>12} {'full ms':>9} {'duo ms':>9} "
          f"{'speedup':>8} {'ideal':>6} {'of ideal':>8}")
    for L, chunk in tqdm(configs, desc="attention", disable=None):
        layer = Layer(L, args.sink, args.window)
        full_ms = gpu_time_ms(full_fa(layer, chunk), args.repeats)
        for sp in args.sparsities:
            n_str = round(sp * HKV)
            ideal = HKV / (HKV - n_str)
            paths = ["kernel"] + (["triton_rswa"] if L <= args.rswa_max_len else [])
            for path in paths:
                duo_ms = gpu_time_ms(duo(layer, chunk, n_str, path), args.repeats)
                speedup = full_ms / duo_ms
                row = dict(prompt=L, chunk=chunk or L, sparsity=sp, streaming_path=path,
                           full_ms=full_ms, duo_ms=duo_ms, speedup=speedup, ideal=ideal,
                           fraction_of_ideal=speedup / ideal)
                rows.append(row)
                tqdm.write(f"{L:>7} {chunk or L:>6} {sp:>8.2f} {path:>12} {full_ms:>9.1f} "
                           f"{duo_ms:>9.1f} {speedup:>8.2f} {ideal:>6.2f} {speedup / ideal:>8.0%}")
                if (L, chunk, sp, path) == (131072, 16384, 0.5, "kernel"):
                    figures["prefill_attn_ratio_128k_s050"] = round(speedup, 3)
        del layer
        torch.cuda.empty_cache()
    return rows, figures


# ---------------------------------------------------------------------------- window kernel tiles

WINDOW_CONFIGS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages, pack GQA heads); head_dim 128
    (64, 64, 8, 2, False), (64, 64, 8, 1, False), (64, 64, 8, 3, False), (64, 32, 4, 2, False),
    (64, 32, 8, 2, False), (32, 64, 4, 2, False), (128, 32, 8, 2, False), (128, 64, 8, 2, False),
    (64, 64, 8, 2, True), (128, 32, 8, 2, True), (128, 32, 8, 3, True), (128, 64, 8, 2, True),
    (64, 32, 8, 2, True), (128, 64, 8, 3, True), (128, 128, 8, 2, False), (64, 128, 8, 2, False)]


def window_configs_part(args) -> tuple[list[dict], dict[str, float]]:
    """The window kernel's launch tiles on fresh prompts (batch x length), timed against FA3's
    causal attention over the same query heads (the work the window kernel replaces); every
    config's output is checked against the default config's (the default is checked against the
    float32 reference by tests/kernels)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_duo.ops.prefill import launch, launch_config

    default = launch_config(D, HQ // HKV)
    n_str = round(0.5 * HKV)
    heads = torch.arange(HKV - n_str, HKV, dtype=torch.int32, device="cuda")
    rows = []
    print(f"{'batch':>5} {'prompt':>7} {'config':>28} {'window ms':>10} {'FA3 ms':>8} {'ratio':>6} {'max err':>8}")
    for batch, L in ((b, L) for b in args.batches for L in args.lengths):
        T = batch * L
        q = torch.randn(T, HQ, D, dtype=DTYPE, device="cuda")
        k, v = torch.randn(2, T, HKV, D, dtype=DTYPE, device="cuda")
        cu = torch.arange(0, T + 1, L, dtype=torch.int32, device="cuda")
        seq = torch.full((batch,), L, dtype=torch.int32, device="cuda")
        cache = torch.zeros(n_str, 1, BS, 1, 2 * D, dtype=DTYPE, device="cuda")  # fresh: never read
        kv_ptrs = torch.tensor([c.data_ptr() for c in cache], dtype=torch.int64, device="cuda")
        table = torch.zeros(batch, L // BS + 1, dtype=torch.int32, device="cuda")
        bt_ptrs = torch.full((n_str,), table.data_ptr(), dtype=torch.int64, device="cuda")
        strides = torch.full((n_str,), table.shape[1], dtype=torch.int64, device="cuda")
        qs = slice((HKV - n_str) * G, HQ)
        fa_out = torch.empty_like(q[:, qs])
        fa_ms = gpu_time_ms(lambda: flash_attn_varlen_func(
            q=q[:, qs], k=k[:, HKV - n_str:], v=v[:, HKV - n_str:], out=fa_out, cu_seqlens_q=cu,
            max_seqlen_q=L, cu_seqlens_k=cu, max_seqlen_k=L, softmax_scale=D ** -0.5, causal=True,
            fa_version=3), args.repeats)
        want = None
        for config in [default] + [c for c in WINDOW_CONFIGS if c != default]:
            out = torch.zeros_like(q)

            def run(config=config, out=out) -> None:
                launch(out, q, k, v, kv_ptrs, bt_ptrs, strides, heads, cu, seq, 0, L, HKV, BS,
                       args.sink, args.window, D ** -0.5, config)
            try:
                ms = gpu_time_ms(run, args.repeats)
            except Exception as e:  # a config that does not compile (shared memory, registers)
                rows.append(dict(batch=batch, prompt=L, config=list(config), error=str(e).splitlines()[0][:200]))
                print(f"{batch:>5} {L:>7} {str(config):>28} failed: {rows[-1]['error']}")
                continue
            got = out[:, qs].float()
            want = got if want is None else want
            err = float((got - want).abs().max() / want.abs().max())
            rows.append(dict(batch=batch, prompt=L, config=list(config), default=config == default,
                             window_ms=ms, fa3_same_heads_ms=fa_ms, ratio_to_fa3=ms / fa_ms,
                             max_err_vs_default=err))
            print(f"{batch:>5} {L:>7} {str(config):>28} {ms:>10.3f} {fa_ms:>8.3f} {ms / fa_ms:>6.2f} {err:>8.1e}")
        del q, k, v
        torch.cuda.empty_cache()
    return rows, {}


# ---------------------------------------------------------------------------- whole model

def prefill_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Engine job (child process): warm up, then time each prompt's prefill (max_tokens=1),
    ``repeats`` times (prefix caching is off, so every repeat prefills the whole prompt)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    llm.generate([TokensPrompt(prompt_token_ids=spec["warmup"])], params, use_tqdm=False)
    seconds = []
    for p in spec["prompts"]:
        times = []
        for _ in range(spec.get("repeats", 1)):
            t0 = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        seconds.append(times)
    return {"seconds": seconds,
            "max_num_batched_tokens": llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens}


def model_config(max_len: int) -> dict[str, Any]:
    """Llama-3-8B's shape, positions for the longest prompt."""
    from vllm_duo.eval.engine_proc import LLAMA3_8B

    return dict(LLAMA3_8B, max_position_embeddings=max(max_len, LLAMA3_8B["max_position_embeddings"]))


def model_engine(backend: str, sparsity: float | None, budget: str, max_len: int, pattern: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    """``LLM`` kwargs of one engine (dummy weights, no tokenizer, no prefix caching)."""
    engine = dict(load_format="dummy", skip_tokenizer_init=True, seed=0, max_model_len=max_len,
                  max_num_seqs=4, enable_prefix_caching=False,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  enforce_eager=not args.compile, attention_backend=backend)
    if budget != "default":
        engine["max_num_batched_tokens"] = max_len if budget == "unchunked" else int(budget)
    if backend == "duo":
        engine["additional_config"] = {"duo_attention": {
            "pattern": pattern, "sparsity": sparsity, "sink_size": args.sink,
            "recent_size": args.window, "streaming_prefill": args.streaming_prefill}}
    return engine


def model_part(args) -> tuple[list[dict], dict[str, float]]:
    import random

    from tqdm import tqdm

    from vllm_duo.eval.engine_proc import EngineJobError, run_job, write_model

    pattern = args.pattern or PATTERN
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(L)] for L in args.lengths]
    warmup = [rng.randrange(1000, 100000) for _ in range(2048)]
    max_len = max(args.lengths) + 64
    backends = [("FLASH_ATTN", None)] + [("duo", sp) for sp in args.sparsities]
    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as d:
        model = write_model(d, model_config(max_len))
        jobs = [(b, sp, budget) for budget in args.budgets for b, sp in backends]
        for backend, sp, budget in tqdm(jobs, desc="engines", disable=None):
            engine = model_engine(backend, sp, budget, max_len, pattern, args)
            try:
                res = run_job("benchmarks.prefill:prefill_job",
                              dict(model=model, engine=engine, prompts=prompts, warmup=warmup,
                                   repeats=args.repeats),
                              echo=args.verbose, timeout=1500)
            except EngineJobError as e:  # keep the other engines' figures
                tqdm.write(f"{backend} s={sp} budget={budget} failed: {str(e)[-1500:]}")
                continue
            for L, times in zip(args.lengths, res["seconds"]):
                rows.append(dict(prompt=L, budget=budget, resolved_budget=res["max_num_batched_tokens"],
                                 backend=backend, sparsity=sp, seconds=statistics.median(times),
                                 repeat_seconds=times,
                                 streaming_prefill=args.streaming_prefill if backend == "duo" else None))
    print(f"{'prompt':>7} {'budget':>9} {'backend':>10} {'sparsity':>8} {'prefill s':>9} {'speedup':>8}")
    for row in rows:
        base = next((r["seconds"] for r in rows if r["backend"] == "FLASH_ATTN"
                     and (r["prompt"], r["budget"]) == (row["prompt"], row["budget"])), float("nan"))
        row["speedup"] = base / row["seconds"]
        print(f"{row['prompt']:>7} {row['resolved_budget']:>9} {row['backend']:>10} "
              f"{row['sparsity'] or 0:>8.2f} {row['seconds']:>9.2f} {row['speedup']:>8.2f}")
        if row["prompt"] in (131072, 262144) and (row["budget"], row["sparsity"]) == (args.budgets[0], 0.5) \
                and math.isfinite(row["speedup"]):
            figures[f"prefill_ratio_{row['prompt'] // 1024}k_s050"] = round(row["speedup"], 3)
    return rows, figures


# ---------------------------------------------------------------------------- main

def plot(rows: list[dict], part: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.get("streaming_path", "kernel") == "kernel"
             and r.get("backend", "duo") == "duo"]
    labels = [f"{r['prompt'] // 1024}K\n" + (f"chunk {r['chunk'] // 1024}K" if part == "attention"
                                             else f"budget {r['resolved_budget']}")
              + f"\ns={r['sparsity']}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(shown) + 1), 4))
    x = range(len(shown))
    ax.bar(x, [r["speedup"] for r in shown], label="measured")
    if part == "attention":
        ax.scatter(x, [r["ideal"] for r in shown], color="red", marker="_", s=400, label="ideal 1/r")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("speedup vs FLASH_ATTN")
    ax.set_title(f"duo prefill speedup ({part}), {device_name()}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["attention", "model", "window-configs"], required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 1],
                    help="window-configs: prompts per step (each of every --lengths)")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256, help="streaming heads' (prefill) window")
    ap.add_argument("--chunks", type=int, nargs="+", default=[16384, 0], help="attention: 0 = one piece")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rswa-max-len", type=int, default=32768,
                    help="attention: also time Triton R-SWA streaming slots up to this prompt length")
    ap.add_argument("--budgets", nargs="+", default=["default"],
                    help="model: max_num_batched_tokens values, 'default' or 'unchunked'")
    ap.add_argument("--streaming-prefill", choices=["window", "rswa"], default="window",
                    help="model: duo's streaming-head prefill path (rswa is O(context): slow at 128K)")
    ap.add_argument("--pattern", help=f"model: built-in pattern name or folder (default: {PATTERN})")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--compile", action="store_true", help="model: torch.compile + CUDA graphs "
                    "(default eager: startup in seconds; prefill is GEMM/attention bound)")
    ap.add_argument("--verbose", action="store_true", help="model: echo the engines' logs")
    args = ap.parse_args(argv)
    for b in args.budgets:
        if b not in ("default", "unchunked") and not b.isdigit():
            ap.error(f"--budgets: {b!r} is not a number, 'default' or 'unchunked'")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("prefill: needs a CUDA GPU")
    print(f"device: {device_name()}")
    part = {"attention": attention_part, "model": model_part, "window-configs": window_configs_part}
    rows, figures = part[args.part](args)
    sizes = "_".join(f"{L // 1024}k" for L in args.lengths)
    name = f"prefill_{args.part}_{sizes}" + ("" if args.part == "attention" else
                                             "_" + "_".join(args.budgets))
    payload = dict(part=args.part, sink=args.sink, window=args.window, rows=rows)
    if args.part == "attention":  # the model part's shape is Llama-3-8B's whole config
        payload["layer"] = dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype="bf16")
    fname = save_result(name, payload, figures)
    if args.part == "window-configs":  # a table to pick tiles from: no figure, no plot
        print(f"wrote benchmarks/results/{fname}")
        return
    png = beside(fname)
    plot(rows, args.part, png)
    print(f"wrote benchmarks/results/{fname}, {os.path.basename(png)}"
          + (f"; summary keys {sorted(figures)}" if figures else ""))


if __name__ == "__main__":
    main()
