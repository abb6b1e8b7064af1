"""Jobs for engine_proc tests: run in a child process like real engine jobs, without vLLM."""

from __future__ import annotations

import sys
import time


def echo(spec: dict) -> dict:
    print("Available KV cache memory: 50.35 GiB", flush=True)
    print("progress to stderr", file=sys.stderr, flush=True)
    return {"spec": spec}


def fail(spec: dict) -> dict:
    print("about to fail", flush=True)
    raise ValueError("boom from the child")


def sleep(spec: dict) -> dict:
    time.sleep(spec["seconds"])
    return {}


def orphan(spec: dict) -> dict:
    """Leave a process behind, as vLLM's engine core can."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return {"pid": child.pid}
