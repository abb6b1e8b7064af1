"""GPU soak through the real engine: many requests, a small KV budget, a tenth aborted (GPU).

``--requests`` requests (default 1000) of random token ids, prompt lengths log-uniform in
[``--min-len``, ``--max-len``] = [10, 16384] (log-uniform so short prompts, where streaming heads
see everything, and long ones both occur), 1..``--max-out`` new tokens each; at most
``--inflight`` in the engine at once; ``--abort-frac`` of them aborted a random 1..60 engine steps
after submission, whatever state they are in then (waiting, prefilling, decoding, preempted). The
KV cache holds about ``--kv-tokens`` tokens on either backend (``kv_cache_memory_bytes``: full
attention's bytes for that many tokens, times the retrieval share for duo), far less than the
in-flight requests want, so vLLM preempts and recomputes on both.

Checks: every request finishes (with all its tokens) or is aborted; afterwards the block pool is
as free as before the soak (``soak_leaked_blocks`` = 0) and no request holds blocks; and a
sample of ``--alone`` finished requests (a sample: each is a serial run), run again one at a time
on the same engine, gives the same greedy tokens. Batching can flip a greedy near-tie even on
FLASH_ATTN (``--backend FLASH_ATTN`` to compare), so that rate must only reach ``--min-match``;
with ``--batch-invariant`` (vLLM's batch-invariant mode) it must be 1.0. That mode is for
``--backend FLASH_ATTN`` only: vLLM refuses backends that do not declare
``supports_batch_invariance()``, and duo does not (yet).

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set here) so its block
pool is readable: ``llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool``.

    python benchmarks/soak_gpu.py [--model smollm2|llama3-layout] [--backend duo|FLASH_ATTN] [--requests 1000]
    python benchmarks/soak_gpu.py --dry-run        # the request mix and KV budget only, no GPU
    python benchmarks/soak_gpu.py --prefix-caching # prefix caching on, half the prompts share a prefix

SmolLM2 (real weights, context stretched to fit 16K; patterns/smollm2-135m-instruct at
``--sparsity`` when present, else a seeded random mask) is the default, sized for one 10-minute
H100 call.
``llama3-layout`` is a seeded model with Llama-3-8B's 32 x 8 KV-head layout (tests/e2e/models.py)
so the real Llama-3-8B pattern applies; about 3x SmolLM2's weights: start with ``--requests 500``
(an estimate; ``--time-limit`` stops submitting in any case). Writes
benchmarks/results/soak_gpu[_variant]_<date>.json (``device_run.sh`` copies it to $OUT); exits 1 on a failed check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.summary import save_result  # noqa: E402
from tests.e2e.models import (  # noqa: E402
    LLAMA3_LAYOUT,
    LLAMA3_PATTERN,
    SMOLLM2,
    SMOLLM2_PATTERN,
    find_pattern,
    make_llama3_layout,
    random_mask,
)
from vllm_duo.eval.admission import count_preemptions  # noqa: E402


@dataclass(frozen=True)
class Req:
    rid: str
    prompt: list[int]
    max_tokens: int
    abort_after: int | None  # engine steps after submission; None = runs to the end


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "llama3-layout"], default="smollm2")
    ap.add_argument("--backend", default="duo", help="duo, or FLASH_ATTN for the baseline")
    ap.add_argument("--pattern", help="pattern folder/TSV (default: see above)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--min-len", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--max-out", type=int, default=64)
    ap.add_argument("--abort-frac", type=float, default=0.1)
    ap.add_argument("--inflight", type=int, default=96, help="requests in the engine at once")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-tokens", type=int, default=20000,
                    help="KV budget in tokens, either backend (40,000 gave only 2 preemptions on the H100)")
    ap.add_argument("--alone", type=int, default=50, help="finished requests re-run alone")
    ap.add_argument("--min-match", type=float,
                    help="least alone-match rate that passes (default 1.0 with --batch-invariant, else 0.9)")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="VLLM_BATCH_INVARIANT=1 (FLASH_ATTN only): batched must equal alone exactly")
    ap.add_argument("--time-limit", type=float, default=300.0,
                    help="seconds after which no new request is submitted (the rest count as not run)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="vLLM's start-up check of free memory (the KV cache is --kv-tokens); lower it to share a GPU")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="prefix caching on (duo's default), and half the prompts start with one of "
                         "--shared-prefixes shared prefixes (system prompts) so hits happen")
    ap.add_argument("--shared-prefixes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the request mix and budget, no engine")
    return ap.parse_args(argv)


def make_requests(n: int, min_len: int, max_len: int, max_out: int, abort_frac: float, vocab: int,
                  seed: int, shared_prefixes: int = 0) -> list[Req]:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(math.log(min_len), math.log(max_len), n)).round().astype(int)
    aborted = set(rng.permutation(n)[:round(abort_frac * n)].tolist())
    reqs = [Req(rid=f"soak-{i}", prompt=rng.integers(100, vocab - 100, int(lengths[i])).tolist(),
                max_tokens=int(rng.integers(1, max_out + 1)),
                abort_after=int(rng.integers(1, 61)) if i in aborted else None) for i in range(n)]
    if shared_prefixes:  # half the prompts start with a shared prefix of 300..3,000 tokens
        share = np.random.default_rng([seed, 1])
        prefixes = [share.integers(100, vocab - 100, int(share.integers(300, 3001))).tolist()
                    for _ in range(shared_prefixes)]
        reqs = [Req(r.rid, (prefixes[int(share.integers(shared_prefixes))] + r.prompt)[:max_len], r.max_tokens,
                    r.abort_after) if share.random() < 0.5 else r for r in reqs]
    return reqs


def kv_budget_bytes(args: argparse.Namespace, cfg: dict) -> int:
    """Bytes for about ``--kv-tokens`` tokens: duo's retrieval heads take the (1 - sparsity) share
    of full attention's bytes per token (its streaming heads' constant sets are small), so duo
    is under the same pressure as FLASH_ATTN (with full attention's bytes it never preempted)."""
    share = 1 - args.sparsity if args.backend.lower() == "duo" else 1.0
    return int(args.kv_tokens * full_bytes_per_token(cfg) * share)


def full_bytes_per_token(cfg: dict) -> int:
    """KV bytes per token of full attention, bf16: K and V, every layer and KV head."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim * 2


def model_setup(args: argparse.Namespace, tmp: str) -> tuple[str, dict, dict]:
    """(model folder, its config, extra LLM kwargs)."""
    model = make_llama3_layout(os.path.join(tmp, "llama3_layout")) if args.model == "llama3-layout" else SMOLLM2
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    extra = {}
    if cfg.get("max_position_embeddings", 0) < args.max_len + args.max_out:  # 8K model, 16K prompts
        extra["hf_overrides"] = {"max_position_embeddings": 2 * (args.max_len + args.max_out)}
    return model, cfg, extra


def duo_config(args: argparse.Namespace, cfg: dict) -> dict:
    if args.pattern:
        return {"pattern": args.pattern, "sparsity": args.sparsity}
    if args.model == "llama3-layout":
        pattern = find_pattern(LLAMA3_PATTERN)
        if pattern is None:
            raise SystemExit(f"pattern {LLAMA3_PATTERN} not found: pass --pattern or set VLLM_DUO_PATTERNS")
        return {"pattern": pattern, "sparsity": args.sparsity}
    if os.path.isdir(SMOLLM2_PATTERN):
        return {"pattern": SMOLLM2_PATTERN, "sparsity": args.sparsity}
    layers, heads = cfg["num_hidden_layers"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    return {"retrieval_mask": random_mask(layers, heads, args.sparsity, args.seed)}


def kv_state(llm) -> dict[str, int]:
    """Block-pool occupancy of the in-process engine core."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    kvm = sched.kv_cache_manager
    pool = kvm.block_pool
    holders = {rid for m in kvm.coordinator.single_type_managers for rid, b in m.req_to_blocks.items() if b}
    return {"num_gpu_blocks": pool.num_gpu_blocks, "free_blocks": pool.get_num_free_blocks(),
            "requests_holding_blocks": len(holders), "scheduler_requests": len(sched.requests)}


def drive(llm, reqs: list[Req], inflight: int, time_limit: float) -> dict:
    """Feed ``reqs`` through ``llm.llm_engine`` step by step, aborting the marked ones."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    pending, live = deque(reqs), {}
    tokens: dict[str, list[int]] = {r.rid: [] for r in reqs}
    status: dict[str, str] = {}
    step, t0 = 0, time.monotonic()
    with tqdm(total=len(reqs), desc="soak", unit="req") as bar:
        while pending or live:
            if pending and time.monotonic() - t0 > time_limit:
                status.update((r.rid, "not_run") for r in pending)
                pending.clear()
            while pending and len(live) < inflight:
                r = pending.popleft()
                engine.add_request(r.rid, {"prompt_token_ids": r.prompt}, SamplingParams(
                    temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True, detokenize=False,
                    output_kind=RequestOutputKind.DELTA))
                live[r.rid] = (r, step)
            for out in engine.step():
                tokens[out.request_id].extend(out.outputs[0].token_ids)
                if out.finished and out.request_id in live:
                    status[out.request_id] = "finished"
                    del live[out.request_id]
                    bar.update()
            step += 1
            for rid, (r, added) in list(live.items()):
                if r.abort_after is not None and step - added >= r.abort_after:
                    engine.abort_request([rid])
                    status[rid] = "aborted_decoding" if tokens[rid] else "aborted_before_first_token"
                    del live[rid]
                    bar.update()
            bar.set_postfix(step=step, live=len(live), refresh=False)
    return {"tokens": tokens, "status": status, "steps": step, "seconds": round(time.monotonic() - t0, 1)}


def settle(llm, max_steps: int = 20) -> None:
    """Step until the scheduler holds nothing (an async-scheduled batch may still be queued)."""
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    for _ in range(max_steps):
        if not sched.has_requests():
            return
        llm.llm_engine.step()


def alone_check(llm, reqs: list[Req], tokens: dict[str, list[int]], n: int, seed: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = np.random.default_rng(seed + 1)
    sample = [reqs[i] for i in sorted(rng.permutation(len(reqs))[:n])]
    mismatches = []
    for r in tqdm(sample, desc="alone"):
        out = llm.generate([TokensPrompt(prompt_token_ids=r.prompt)], SamplingParams(
            temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True, detokenize=False), use_tqdm=False)
        alone = list(out[0].outputs[0].token_ids)
        if alone != tokens[r.rid]:
            first = next((i for i, (a, b) in enumerate(zip(alone, tokens[r.rid], strict=False)) if a != b), None)
            mismatches.append({"rid": r.rid, "prompt_len": len(r.prompt), "first_diff": first})
    return {"sampled": len(sample), "matched": len(sample) - len(mismatches), "mismatches": mismatches[:10]}


def mix_summary(reqs: list[Req], kv_tokens: int) -> dict:
    lengths = [len(r.prompt) for r in reqs]
    return {"requests": len(reqs), "marked_abort": sum(r.abort_after is not None for r in reqs),
            "prompt_tokens": sum(lengths), "prompt_len_p50": int(np.median(lengths)), "prompt_len_max": max(lengths),
            "kv_budget_tokens": kv_tokens}


def run_soak(args: argparse.Namespace, tmp: str) -> dict:
    """Start the engine in this process, soak it, re-run the sample alone; the result payload."""
    model, cfg, extra = model_setup(args, tmp)
    reqs = make_requests(args.requests, args.min_len, args.max_len, args.max_out, args.abort_frac,
                         cfg["vocab_size"], args.seed, args.shared_prefixes if args.prefix_caching else 0)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: block pool readable
    if args.batch_invariant:
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    from vllm import LLM

    backend = {"attention_backend": "duo", "additional_config": {"duo_attention": duo_config(args, cfg)}} \
        if args.backend.lower() == "duo" else {"attention_backend": args.backend}
    t0 = time.monotonic()
    llm = LLM(model, skip_tokenizer_init=True, seed=args.seed, enable_prefix_caching=args.prefix_caching,
              max_model_len=args.max_len + args.max_out, max_num_seqs=args.max_num_seqs,
              kv_cache_memory_bytes=kv_budget_bytes(args, cfg),
              gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager, **backend, **extra)
    startup = round(time.monotonic() - t0, 1)
    before = kv_state(llm)
    preemptions = count_preemptions(llm)
    run = drive(llm, reqs, args.inflight, args.time_limit)
    settle(llm)
    after = kv_state(llm)
    finished = [r for r in reqs if run["status"].get(r.rid) == "finished"]
    short = [r.rid for r in finished if len(run["tokens"][r.rid]) != r.max_tokens]
    alone = alone_check(llm, finished, run["tokens"], args.alone, args.seed)
    settle(llm)
    after_alone = kv_state(llm)

    leaked = before["free_blocks"] - after["free_blocks"]
    statuses = list(run["status"].values())
    match_rate = round(alone["matched"] / alone["sampled"], 4) if alone["sampled"] else 0.0
    min_match = args.min_match if args.min_match is not None else (1.0 if args.batch_invariant else 0.9)
    checks = {
        "every_request_accounted": len(run["status"]) == len(reqs),
        "finished_have_all_tokens": not short,
        "no_leaked_blocks": leaked == 0 and after["requests_holding_blocks"] == 0,
        "no_leak_after_alone_runs": before["free_blocks"] == after_alone["free_blocks"],
        "alone_match_ok": match_rate >= min_match,
        "preempted": preemptions[0] > 0,
    }
    return dict(mix_summary(reqs, args.kv_tokens), model=args.model, backend=args.backend,
                batch_invariant=args.batch_invariant, min_match=min_match,
                startup_s=startup, soak_s=run["seconds"], engine_steps=run["steps"],
                finished=len(finished), **{k: statuses.count(k) for k in (
                    "aborted_before_first_token", "aborted_decoding", "not_run")},
                preemptions=preemptions[0], kv_before=before, kv_after=after, kv_after_alone=after_alone,
                soak_leaked_blocks=leaked, alone=alone, alone_match_rate=match_rate,
                short_outputs=short[:10], checks=checks, ok=all(checks.values()))


def main() -> None:
    args = parse_args()
    if args.dry_run:
        vocab = LLAMA3_LAYOUT["vocab_size"] if args.model == "llama3-layout" else 49152
        reqs = make_requests(args.requests, args.min_len, args.max_len, args.max_out, args.abort_frac,
                             vocab, args.seed, args.shared_prefixes if args.prefix_caching else 0)
        print(json.dumps(mix_summary(reqs, args.kv_tokens), indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        payload = run_soak(args, tmp)
    variant = "".join(part for part, on in ((f"_{args.backend.lower()}", args.backend.lower() != "duo"),
                                             ("_llama3", args.model == "llama3-layout"),
                                             ("_prefix", args.prefix_caching),
                                             ("_bi", args.batch_invariant)) if on)
    name = "soak_gpu" + variant  # figures soak_gpu_leaked_blocks, ... (soak_leaked_blocks is the CPU soak's)
    save_result(name, payload, {f"{name}_leaked_blocks": payload["soak_leaked_blocks"],
                                f"{name}_alone_match_rate": payload["alone_match_rate"],
                                f"{name}_preemptions": payload["preemptions"]})
    for k in ("requests", "finished", "aborted_before_first_token", "aborted_decoding", "not_run",
              "preemptions", "soak_leaked_blocks", "alone_match_rate", "startup_s", "soak_s"):
        print(f"{k:<28}{payload[k]}")
    for k, v in payload["checks"].items():
        print(f"check: {k:<25}{'ok' if v else 'FAILED'}")
    sys.exit(0 if payload["ok"] else 1)


if __name__ == "__main__":
    main()
