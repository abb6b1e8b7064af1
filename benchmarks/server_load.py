"""``vllm serve`` with duo under load: concurrent streaming clients, a quarter hanging up mid-answer (GPU).

Checks, in this order: the greedy reference answer of every prompt, one request at a time; then
``--clients`` streaming clients for ``--duration`` seconds, the first ``--disconnect-frac`` of them
closing the socket halfway through each answer; then that the server is still up, no request
failed, the answers of clients that stayed equal the references, and the engine is idle again
(``/metrics``: no running or waiting request, KV-cache usage 0). Batching can flip a greedy
near-tie, so the exact-match rate must only reach ``--min-match``; the pass-key rate is reported too.

    python benchmarks/server_load.py [--backend duo] [--pattern PATH|full] [--duration 120] [--clients 64]
    python benchmarks/server_load.py --url http://127.0.0.1:8000     # a server already running

Without ``--pattern`` it uses patterns/smollm2-135m-instruct/ (identified by ``vllm-duo identify``)
at ``--sparsity`` when present, else a seeded random mask (plumbing, not accuracy). Writes
benchmarks/results/server_load_<date>.json (and $OUT/server_load.json); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.summary import save_result  # noqa: E402
from tests.e2e.models import ROOT, SMOLLM2, SMOLLM2_PATTERN, model_shape, random_mask  # noqa: E402
from tests.e2e.server import (  # noqa: E402
    MODEL_NAME,
    VllmServer,
    complete,
    free_port,
    get_text,
    parse_metrics,
    passkey_prompt,
    serve_argv,
    stream,
)


@dataclass
class Record:
    client: int
    prompt: int
    leaver: bool
    done: bool
    disconnected: bool
    latency: float
    ttft: float | None
    chunks: int
    text: str
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="use this running server instead of starting one")
    ap.add_argument("--model", default=SMOLLM2)
    ap.add_argument("--backend", default="duo", help="duo, or e.g. FLASH_ATTN for a baseline run")
    ap.add_argument("--pattern", help="pattern folder/TSV, 'full' or 'streaming' (default: see above)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    ap.add_argument("--disconnect-frac", type=float, default=0.25)
    ap.add_argument("--prompts", type=int, default=16, help="distinct pass-key prompts, 200..6.3K tokens")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--min-match", type=float, default=0.9, help="least exact-match rate that passes")
    ap.add_argument("--idle-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra vllm serve argument, repeatable (--server-arg=--enforce-eager)")
    return ap.parse_args(argv)


def duo_config(args: argparse.Namespace) -> dict | None:
    if args.backend.lower() != "duo":
        return None
    if args.pattern:
        return {"pattern": args.pattern, "sparsity": args.sparsity}
    if os.path.isdir(SMOLLM2_PATTERN):
        return {"pattern": SMOLLM2_PATTERN, "sparsity": args.sparsity}
    return {"retrieval_mask": random_mask(*model_shape(args.model), args.sparsity, args.seed)}


def build_prompts(n: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, pass key) pairs from about 200 to 6.3K tokens."""
    rng = random.Random(seed)
    out = []
    for repeats in np.linspace(8, 250, n).round().astype(int):
        key = rng.randrange(10000, 99999)
        out.append((passkey_prompt(key, int(repeats), rng.uniform(0.1, 0.9)), key))
    return out


def run_load(url: str, args: argparse.Namespace, alive: Callable[[], bool]) -> dict:
    prompts = build_prompts(args.prompts, args.seed)
    refs = [complete(url, p, args.max_tokens) for p, _ in tqdm(prompts, desc="references")]
    gpu_before = gpu_memory_used_mib()
    records: list[Record] = []
    deadline = time.monotonic() + args.duration
    leavers = round(args.clients * args.disconnect_frac)
    threads = [threading.Thread(target=_client, args=(url, c, c < leavers, prompts, args, deadline, records),
                                daemon=True) for c in range(args.clients)]
    for t in threads:
        t.start()
    _progress(args.duration, deadline, records, url)
    for t in threads:
        t.join(timeout=600)
    try:
        idle, metrics = wait_idle(url, args.idle_timeout)
    except (OSError, RuntimeError) as e:
        print(f"server did not answer after the load: {e}", flush=True)
        idle, metrics = False, {}
    return summarize(records, refs, prompts, args, alive=alive() and _healthy(url), idle=idle,
                     metrics=metrics, gpu_mib=(gpu_before, gpu_memory_used_mib()))


def _client(url: str, cid: int, leaver: bool, prompts: list[tuple[str, int]], args: argparse.Namespace,
            deadline: float, records: list[Record]) -> None:
    rng = random.Random(args.seed * 100003 + cid)
    while time.monotonic() < deadline:
        i = rng.randrange(len(prompts))
        body = dict(model=MODEL_NAME, prompt=prompts[i][0], max_tokens=args.max_tokens, temperature=0.0)
        t0 = time.perf_counter()
        try:
            s = stream(url, "/v1/completions", body, stop_after=max(1, args.max_tokens // 2) if leaver else None)
            records.append(Record(cid, i, leaver, s.done, s.disconnected, s.latency, s.ttft, s.chunks, s.text))
        except Exception as e:  # every failure is counted and reported, the load goes on
            records.append(Record(cid, i, leaver, False, False, time.perf_counter() - t0, None, 0, "",
                                  error=f"{type(e).__name__}: {e}"[:500]))
            time.sleep(0.5)


def _progress(duration: float, deadline: float, records: list[Record], url: str) -> None:
    with tqdm(total=round(duration), unit="s", desc="load") as bar:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            bar.n = round(duration - max(0.0, deadline - time.monotonic()))
            try:
                running = parse_metrics(get_text(url + "/metrics", timeout=5)).get("vllm:num_requests_running")
            except OSError:
                running = None
            bar.set_postfix(requests=len(records), errors=sum(r.error is not None for r in records),
                            running=running, refresh=False)
            bar.refresh()


def wait_idle(url: str, timeout: float) -> tuple[bool, dict[str, float]]:
    """Poll /metrics until no request runs or waits and KV-cache usage is 0. vLLM refreshes its
    gauges only when the engine steps (not after an abort), so each poll follows a one-token request."""
    deadline, metrics = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        complete(url, "Hello", 1)
        metrics = parse_metrics(get_text(url + "/metrics"))
        if (metrics.get("vllm:num_requests_running", 0) == 0 and metrics.get("vllm:num_requests_waiting", 0) == 0
                and metrics.get("vllm:kv_cache_usage_perc", 0) <= 1e-9):
            return True, metrics
        time.sleep(1)
    return False, metrics


def _healthy(url: str) -> bool:
    try:
        get_text(url + "/health")
        return True
    except OSError:
        return False


def gpu_memory_used_mib() -> int | None:
    """Device memory in use (MiB, all GPUs), from nvidia-smi; None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
        return sum(int(x) for x in out.stdout.split()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def _rate(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarize(records: list[Record], refs: list[str], prompts: list[tuple[str, int]], args: argparse.Namespace,
              alive: bool, idle: bool, metrics: dict[str, float], gpu_mib: tuple[int | None, int | None]) -> dict:
    stayed = [r for r in records if r.error is None and r.done and not r.disconnected]
    matched = [r for r in stayed if r.text == refs[r.prompt]]
    keyed = [r for r in stayed if str(prompts[r.prompt][1]) in refs[r.prompt]]
    errors = [r for r in records if r.error is not None]
    lat = [r.latency for r in stayed]
    ttft = [r.ttft for r in records if r.ttft is not None]
    match_rate = _rate(len(matched), len(stayed)) or 0.0
    disconnects = sum(r.disconnected for r in records)
    checks = {
        "server_alive": alive,
        "no_errors": not errors,
        "idle_after_load": idle,
        "match_rate_ok": match_rate >= args.min_match,
        "disconnects_happened": disconnects > 0 or args.disconnect_frac == 0,
    }
    return {
        "backend": args.backend, "clients": args.clients, "duration_s": args.duration,
        "disconnect_frac": args.disconnect_frac, "max_tokens": args.max_tokens, "prompts": len(prompts),
        "requests": len(records), "completed": len(stayed), "disconnects": disconnects,
        "errors": len(errors), "error_samples": sorted({r.error for r in errors})[:5],
        "exact_match": len(matched), "exact_match_rate": match_rate,
        "passkey_rate": _rate(sum(str(prompts[r.prompt][1]) in r.text for r in keyed), len(keyed)),
        "reference_passkey_rate": _rate(sum(str(k) in a for (_, k), a in zip(prompts, refs, strict=True)), len(refs)),
        "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "requests_per_s": round(len(stayed) / args.duration, 3),
        "gpu_mem_mib_before": gpu_mib[0], "gpu_mem_mib_after": gpu_mib[1],
        "metrics_after": {k: v for k, v in metrics.items() if k in (
            "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")},
        "mismatch_samples": [{"prompt": r.prompt, "got": r.text, "want": refs[r.prompt]}
                             for r in stayed if r.text != refs[r.prompt]][:3],
        "checks": checks, "ok": all(checks.values()),
    }


def print_table(p: dict) -> None:
    rows = [(k, p[k]) for k in ("backend", "requests", "completed", "disconnects", "errors",
                                "exact_match_rate", "passkey_rate", "reference_passkey_rate",
                                "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s",
                                "requests_per_s", "gpu_mem_mib_before", "gpu_mem_mib_after")]
    rows += [(f"check: {k}", "ok" if v else "FAILED") for k, v in p["checks"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    args = parse_args()
    out = os.environ.get("OUT")
    server = None
    if args.url is None:
        port = free_port()
        log = os.path.join(out or os.path.join(ROOT, "benchmarks", "results"), "server_load_server.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        extra = ["--max-num-seqs", str(args.clients), "--max-model-len", "8192", "--seed", str(args.seed),
                 "--gpu-memory-utilization", "0.5"] + args.server_arg
        server = VllmServer(serve_argv(args.model, port, args.backend, duo_config(args), extra), port, log)
        server.start()
        print(f"server up ({log})", flush=True)
    url = args.url or server.url
    try:
        payload = run_load(url, args, alive=server.alive if server else lambda: True)
    finally:
        if server is not None:
            print(f"server stopped (exit code {server.stop()})", flush=True)
    name = "server_load" if args.backend.lower() == "duo" else f"server_load_{args.backend.lower()}"
    save_result(name, payload, {f"{name}_errors": payload["errors"],
                                f"{name}_exact_match_rate": payload["exact_match_rate"],
                                f"{name}_p99_latency_s": payload["latency_p99_s"]})
    if out:
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(payload, f, indent=2)
    print_table(payload)
    sys.exit(0 if payload["ok"] else 1)


if __name__ == "__main__":
    main()
