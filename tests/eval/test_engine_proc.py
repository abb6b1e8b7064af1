"""The subprocess runner: result JSON, live log copy, vLLM's logged memory figures, failures (CPU)."""

from __future__ import annotations

import time

import pytest

from vllm_duo.eval.engine_proc import EngineJobError, parse_engine_log, run_job

VLLM_LOG = """INFO 11-23 [gpu_worker.py:561] Available KV cache memory: 50.35 GiB
INFO 11-23 [default_loader.py:1] Model loading took 14.99 GiB memory and 3.2 seconds
INFO 11-23 [kv_cache_utils.py:2177] GPU KV cache size: 412,496 tokens
INFO 11-23 [kv_cache_utils.py:2179] Maximum concurrency for 65,536 tokens per request: 6.29x
"""


def test_parse_engine_log():
    """Only memory figures: capacity comes from vLLM's API (kv_capacity), never its log text."""
    assert parse_engine_log(VLLM_LOG) == {"kv_cache_gib": 50.35, "model_load_gib": 14.99}
    assert parse_engine_log("nothing here") == {}


def test_run_job_returns_result_and_log_figures(tmp_path, capfd):
    log = tmp_path / "run.log"
    res = run_job("tests.eval.fake_jobs:echo", {"x": [1, 2]}, log_path=str(log), echo=True, header="first")
    assert res["spec"] == {"x": [1, 2]} and res["kv_cache_gib"] == 50.35
    text = log.read_text()
    assert "==== first ====" in text and "progress to stderr" in text
    assert "Available KV cache memory" in capfd.readouterr().err  # echoed live
    second = run_job("tests.eval.fake_jobs:sleep", {"seconds": 0}, log_path=str(log), header="second")
    assert "==== first ====" in log.read_text() and "==== second ====" in log.read_text()  # appended
    assert "kv_cache_gib" not in second  # figures only from its own part of the log


def test_run_job_failure_carries_log_tail(tmp_path):
    with pytest.raises(EngineJobError, match="boom from the child") as e:
        run_job("tests.eval.fake_jobs:fail", {}, log_path=str(tmp_path / "f.log"))
    assert "about to fail" in str(e.value) and "exited with 1" in str(e.value)


def test_run_job_timeout_kills_child(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(EngineJobError, match="timed out"):
        run_job("tests.eval.fake_jobs:sleep", {"seconds": 60}, timeout=2)
    assert time.monotonic() - t0 < 30


def test_run_job_reaps_what_the_child_left_behind():
    pid = run_job("tests.eval.fake_jobs:orphan", {})["pid"]
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except FileNotFoundError:
        return  # gone
    assert "Z" in state  # killed, waiting for init to reap it


def test_kv_capacity_reads_vllm_config():
    """The fields vLLM 0.26's engine core syncs to the front process's cache_config at startup."""
    from types import SimpleNamespace as NS

    from vllm.config import CacheConfig

    from vllm_duo.eval.engine_proc import kv_capacity

    cache = CacheConfig()
    cache.num_gpu_blocks, cache.kv_cache_size_tokens, cache.kv_cache_max_concurrency = 25781, 412496, 6.294
    llm = NS(llm_engine=NS(vllm_config=NS(cache_config=cache, model_config=NS(max_model_len=65536))))
    assert kv_capacity(llm) == {"num_gpu_blocks": 25781, "kv_cache_tokens": 412496, "max_concurrency": 6.294,
                                "concurrency_request_tokens": 65536}
