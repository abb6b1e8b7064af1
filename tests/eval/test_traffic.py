"""``vllm_duo.eval.traffic``'s pure helpers: the mixed request set and the latency figures (CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vllm_duo.eval.traffic import gpu_busy_us, mixed_requests, request_latencies, top_kernels


def test_mixed_requests_are_log_uniform_and_reproducible():
    reqs = mixed_requests(2000, seed=0, prompt_range=(64, 32768), output_range=(16, 512))
    lengths = np.array([len(p) for p, _ in reqs])
    outputs = np.array([m for _, m in reqs])
    assert lengths.min() >= 64 and lengths.max() <= 32768 and outputs.min() >= 16 and outputs.max() <= 512
    # log-uniform: the median sits near the geometric mean of the range
    assert abs(np.log(np.median(lengths)) - math.log(math.sqrt(64 * 32768))) < 0.2
    assert 0.2 < np.mean(lengths < 512) < 0.4  # log(512/64) / log(32768/64) = 1/3
    again = mixed_requests(2000, seed=0, prompt_range=(64, 32768), output_range=(16, 512))
    assert [len(p) for p, _ in again] == lengths.tolist() and again[0][0] == reqs[0][0]


def test_request_latencies():
    finished = [{"ttft_s": 0.1, "first_token_ts": 10.0, "last_token_ts": 11.0, "tokens": 11},
                {"ttft_s": 0.3, "first_token_ts": 5.0, "last_token_ts": 5.0, "tokens": 1}]
    lat = request_latencies(finished)
    assert lat["ttft_s"]["p50"] == 0.2
    assert lat["tpot_s"]["p50"] == 0.1  # one-token requests have no TPOT


def test_gpu_busy_is_the_union_of_kernel_intervals():
    assert gpu_busy_us([]) == 0
    assert gpu_busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


def test_combine_refuses_parts_of_different_requests(tmp_path):
    import json
    import subprocess
    import sys

    row = {"output_tokens_per_s": 100.0}
    parts = []
    for name, count in (("duo", 1000), ("FLASH_ATTN", 300)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"rows": {name: row}, "requests": {"count": count}, "command": "x"}))
        parts.append(str(path))
    out = subprocess.run([sys.executable, "benchmarks/mixed_traffic.py", "--combine", *parts],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("mixed_traffic: the two parts ran different requests")


def test_combine_records_the_parts_device_not_this_machines(tmp_path):
    import json
    import os
    import subprocess
    import sys

    row = {"output_tokens_per_s": 100.0, "ttft_s": {"p50": 1.0, "p99": 2.0}, "tpot_s": {"p50": 0.1, "p99": 0.2}}
    results = tmp_path / "results"

    def combine(devices):
        parts = []
        for name, device in zip(("duo", "FLASH_ATTN"), devices):
            path = tmp_path / f"{name}.json"
            part = {"rows": {name: row}, "requests": {"count": 3}, "command": f"run {name}"}
            path.write_text(json.dumps(dict(part, device=device) if device else part))
            parts.append(str(path))
        return subprocess.run([sys.executable, "benchmarks/mixed_traffic.py", "--combine", *parts],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, VLLM_DUO_RESULTS=str(results)))

    for devices in (("GPU A", None), ("GPU A", "GPU B")):
        out = combine(devices)
        assert out.returncode != 0 and "must name one device" in out.stderr.strip().splitlines()[-1]
    out = combine(("GPU A", "GPU A"))
    assert out.returncode == 0, out.stderr
    entry = json.loads((results / "summary.json").read_text())["mixed_traffic_ratio"]
    assert entry["device"] == "GPU A" and entry["value"] == 1.0
    assert "run duo" in entry["command"] and "run FLASH_ATTN" in entry["command"]


def test_top_kernels_sums_by_name_largest_first() -> None:
    got = top_kernels([("gemm", 1000), ("attn", 300), ("gemm", 500), ("x" * 100, 2000), ("tiny", 1)],
                      n=3, width=10)
    assert list(got) == ["x" * 10, "gemm", "attn"] and got["gemm"] == 1.5


def test_latency_plot_draws_the_measured_panels(tmp_path) -> None:
    from vllm_duo.eval.latency_plot import panels_of, plot_latencies, rows_of

    rows = {"duo": {"output_tokens_per_s": 880.0, "ttft_s": {"p50": 80.0, "p99": 160.0}},
            "FLASH_ATTN": {"output_tokens_per_s": 790.0, "ttft_s": {"p50": 90.0, "p99": 180.0}}}
    assert [key for key, _, _ in panels_of(rows)] == ["output_tokens_per_s", "ttft_s"]  # no TPOT measured
    out = plot_latencies(rows, "t", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.endswith("p.png")
    assert rows_of({"runs": rows}) is rows
    with pytest.raises(ValueError, match="no output_tokens_per_s"):
        plot_latencies({"duo": {}}, "t", str(tmp_path / "q.png"))
