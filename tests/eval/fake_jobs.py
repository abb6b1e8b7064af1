"""Jobs for engine_proc tests: run in a child process like real engine jobs, without vLLM."""

from __future__ import annotations

import sys
import time


def echo(spec: dict) -> dict:
    print("GPU KV cache size: 412,496 tokens", flush=True)
    print("Maximum concurrency for 65,536 tokens per request: 6.29x", flush=True)
    print("progress to stderr", file=sys.stderr, flush=True)
    from vllm_duo.eval.engine_proc import engine_log_figures

    return {"spec": spec, "seen_in_child": engine_log_figures(wait=5)}


def fail(spec: dict) -> dict:
    print("about to fail", flush=True)
    raise ValueError("boom from the child")


def sleep(spec: dict) -> dict:
    time.sleep(spec["seconds"])
    return {}


def figures_only(spec: dict) -> dict:
    from vllm_duo.eval.engine_proc import engine_log_figures

    return {"seen_in_child": engine_log_figures(wait=0.5)}


def orphan(spec: dict) -> dict:
    """Leave a process behind, as vLLM's engine core can."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return {"pid": child.pid}
