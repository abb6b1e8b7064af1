"""bench: the decode-window analysis, engine specs, figure names, and the CLI with a fake runner (CPU)."""

from __future__ import annotations

import json
import time

import pytest

from vllm_duo.cli import bench_cmd, needs
from vllm_duo.cli.main import main
from vllm_duo.errors import DuoConfigError
from vllm_duo.eval import bench_run
from vllm_duo.eval.bench import decode_window, decode_window_at_peak, percentiles, random_prompts, ratio


def _staggered(batch: int, tokens: int, prefill_dt: float, decode_dt: float):
    """Request i gets its first token after i+1 prefill steps, then one token per decode step;
    decode steps cost ``decode_dt`` once every request decodes, ``prefill_dt`` while one prefills."""
    events, t, step = [], 0.0, 0
    produced = [0] * batch
    while min(produced) < tokens:
        step += 1
        t += prefill_dt if step <= batch else decode_dt
        for r in range(batch):
            if step >= r + 1 and produced[r] < tokens:
                events.append((f"r{r}", t, 1))
                produced[r] += 1
    return events


def test_decode_window_is_pure_decode():
    events = _staggered(batch=4, tokens=50, prefill_dt=0.5, decode_dt=0.02)
    w = decode_window(events)
    assert w["decode_tokens_per_s"] == pytest.approx(4 / 0.02)  # prefill-mixed steps excluded
    assert w["batch_in_window"] == [4, 4] and w["requests"] == 4
    assert w["window_steps"] == 50 - 4  # from the last first token to the first finish
    assert w["step_ms"]["p50"] == pytest.approx(20.0)


def test_decode_window_errors_and_helpers():
    with pytest.raises(ValueError):
        decode_window([("a", 1.0, 0)])
    assert percentiles([]) is None
    assert percentiles([1, 2, 3, 4], 1000.0)["p50"] == 2500.0
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0) is None
    p = random_prompts(3, 10, seed=1)
    assert len(p) == 3 and all(len(x) == 10 and all(1000 <= t < 100000 for t in x) for x in p)
    assert p == random_prompts(3, 10, seed=1)


def test_decode_window_at_peak_times_the_largest_batch_admitted():
    """Six requests submitted, four admitted: the first four decode together (10 ms steps after
    their staggered prefills at 0.5 s), the last two only after them. The window is the four's
    pure-decode run; the plain window (last first token to first finish) would be empty."""
    first = _staggered(batch=4, tokens=50, prefill_dt=0.5, decode_dt=0.01)
    t_end = max(ts for _, ts, _ in first)
    later = [(f"q{r}", t_end + 0.5 + 0.01 * k, 1) for r in range(2) for k in range(50)]
    w = decode_window_at_peak(first + later)
    assert w["batch_in_window"] == [4, 4] and w["requests"] == 6
    assert w["decode_tokens_per_s"] == pytest.approx(4 / 0.01) and w["window_steps"] == 50 - 4
    with pytest.raises(ValueError, match="no tokens"):
        decode_window_at_peak([("a", 1.0, 0)])
    with pytest.raises(ValueError, match="one step only"):
        decode_window_at_peak([("a", 1.0, 1), ("b", 1.0, 1), ("a", 2.0, 1)])


def test_admitted_reaches_part_a_and_refuses_a_fixed_batch(capsys, monkeypatch):
    from vllm_duo.eval.methods import Method

    (_, spec), = bench_run.job_specs(_args("--only", "a", "--a-admitted"), "a", "/m", "/m_long",
                                     Method("full", "FLASH_ATTN"))
    assert spec["a"]["admitted"] is True and spec["a"]["batch"] is None
    monkeypatch.setattr(needs, "cuda_devices", lambda: 1)
    assert main(["bench", "--a-admitted", "--a-batch", "4"]) == 2
    assert "drop --a-batch" in capsys.readouterr().err


def test_parse_parts():
    assert bench_cmd.parse_parts(["abc"]) == "abc"
    assert bench_cmd.parse_parts(["c", "a"]) == "ac"
    assert bench_cmd.parse_parts(["a,b"]) == "ab"
    with pytest.raises(DuoConfigError, match="--only"):
        bench_cmd.parse_parts(["d"])


def _args(*extra: str):
    import argparse

    parser = argparse.ArgumentParser()
    bench_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *extra])


def test_job_specs_share_ab_engine_and_size_it():
    from vllm_duo.eval.methods import Method

    args = _args()
    specs = bench_run.job_specs(args, "abc", "/m", "/m_long", Method("full", "FLASH_ATTN"))
    (ab, s_ab), (c, s_c) = specs
    assert (ab, c) == ("ab", "c")
    assert s_ab["engine"]["max_model_len"] == 65536 + 256 and s_ab["engine"]["max_num_seqs"] == 64
    assert s_ab["engine"]["disable_log_stats"] is False and s_ab["engine"]["enable_prefix_caching"] is False
    assert s_ab["engine"]["attention_backend"] == "FLASH_ATTN" and s_ab["engine"]["load_format"] == "dummy"
    assert s_c["engine"]["max_model_len"] == -1 and s_c["engine"]["max_num_seqs"] == 1
    assert s_c["engine"]["enforce_eager"] is True and s_c["model"] == "/m_long"
    only_b = bench_run.job_specs(_args("--only", "b"), "b", "/m", "/m_long", Method("full", "FLASH_ATTN"))
    assert [x[0] for x in only_b] == ["b"] and only_b[0][1]["engine"]["max_model_len"] == 1024 + 128


def test_streaming_prefill_reaches_the_engine():
    from vllm_duo.eval.methods import expand_methods

    args = _args("--streaming-prefill", "window")
    (duo,) = expand_methods(["duo"], pattern="/p", sparsities=[0.5], sink=64, recent=256,
                            streaming_prefill=args.streaming_prefill)
    ((_, spec),) = bench_run.job_specs(args, "a", "/m", "/m_long", duo)
    assert spec["engine"]["additional_config"]["duo_attention"]["streaming_prefill"] == "window"
    (default,) = expand_methods(["duo"], pattern="/p", sparsities=[0.5], sink=64, recent=256)
    assert "streaming_prefill" not in default.duo


def _fake_rows(tps_full: float, tps_duo: float):
    def row(tps, out_tps, ctx):
        return {"a": {"batch": 6, "decode": {"decode_tokens_per_s": tps}}, "b": {"output_tokens_per_s": out_tps},
                "c": {"max_context_tokens": ctx}}
    return {"full": row(tps_full, 1000.0, 400000), "duo_s050": row(tps_duo, 900.0, 800000)}


def test_figure_names():
    figures, extra = bench_run.figures_for(_fake_rows(100.0, 150.0), _args(), "duo_s050")
    assert figures == {"e2e_decode_ratio_64k_s050": 1.5, "short_prompt_ratio_1k_b64": 0.9,
                       "max_context_tokens_duo_s050": 800000}
    assert extra["max_context_tokens_full"] == 400000 and extra["max_context_ratio"] == 2.0


def test_fp8_reaches_every_engine_and_names_the_figures():
    from vllm_duo.eval.methods import expand_methods

    args = _args("--kv-cache-dtype", "fp8")
    for method in expand_methods(["full", "duo"], pattern="/p", sparsities=[0.5], sink=64, recent=256):
        for _, spec in bench_run.job_specs(args, "abc", "/m", "/m_long", method):
            assert spec["engine"]["kv_cache_dtype"] == "fp8"
    figures, _ = bench_run.figures_for(_fake_rows(100.0, 150.0), args, "duo_s050")
    assert figures == {"e2e_decode_ratio_64k_s050_fp8": 1.5, "short_prompt_ratio_1k_b64_fp8": 0.9,
                       "max_context_tokens_duo_s050_fp8": 800000}
    (_, spec), = bench_run.job_specs(_args(), "a", "/m", "/m_long", method)
    assert spec["engine"]["kv_cache_dtype"] == "auto"


def test_cli_with_fake_runner(tmp_path, monkeypatch, pattern_llama3):
    from vllm_duo.eval import results as summary
    from vllm_duo.eval import engine_proc

    calls = []

    def fake_run_job(job, spec, **kw):
        calls.append((job, spec))
        duo = spec["engine"]["attention_backend"] == "duo"
        out = {"engine_start_s": 1.0, "max_model_len": spec["engine"]["max_model_len"], "kv_cache_tokens": 1}
        if "a" in spec["parts"]:
            out["a"] = {"batch": 8 if duo else 6, "prompt_tokens": 65536, "decode_tokens_per_s_per_seq": 1,
                        "decode": {"decode_tokens_per_s": 240.0 if duo else 200.0, "step_ms": {}}, "ttft_s": {}}
        if "b" in spec["parts"]:
            out["b"] = {"batch": 64, "prompt_tokens": 1024, "output_tokens": 128, "output_tokens_per_s": 1000.0,
                        "total_tokens_per_s": 9000.0, "walls_s": [1.0]}
        if "c" in spec["parts"]:
            out["c"] = {"max_context_tokens": 700000 if duo else 400000, "bounded_by_positions": False}
        return out

    monkeypatch.setattr(engine_proc, "run_job", fake_run_job)
    monkeypatch.setattr(summary, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(needs, "cuda_devices", lambda: 1)
    out = tmp_path / "out"
    rc = main(["bench", "--pattern", pattern_llama3, "--out", str(out), "--quiet"])
    assert rc == 0 and len(calls) == 4  # (a+b, c) x (full, duo)
    duo_spec = next(s for _, s in calls if s["engine"]["attention_backend"] == "duo")
    assert duo_spec["engine"]["additional_config"]["duo_attention"]["sparsity"] == 0.5
    payload = json.loads((out / "e2e_bench_abc.json").read_text())
    assert payload["figures"] == {"e2e_decode_ratio_64k_s050": 1.2, "short_prompt_ratio_1k_b64": 1.0,
                                  "max_context_tokens_duo_s050": 700000}
    assert "decode window" in payload["timing_method"]
    summ = json.loads((out / "summary.json").read_text())
    assert summ["e2e_decode_ratio_64k_s050"]["value"] == 1.2


def test_cli_refuses_bad_input(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(needs, "cuda_devices", lambda: 1)
    assert main(["bench", "--only", "x"]) == 2
    assert "--only" in capsys.readouterr().err
    assert main(["bench", "--pattern", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--kv-cache-dtype", "fp8", "--streaming-prefill", "rswa", "--out", str(tmp_path)]) == 2
    assert "does not read an fp8 KV cache" in capsys.readouterr().err


class _FakeEngine:
    """LLMEngine's add_request/step/has_unfinished_requests: request i is prefilled at step i+1,
    then decodes one token per 10 ms step; DELTA outputs carry live stats like vLLM's."""

    def __init__(self):
        self.reqs, self.step_no = [], 0

    def add_request(self, rid, prompt, params):
        from types import SimpleNamespace

        assert prompt["type"] == "token" and params.output_kind.name == "DELTA"
        stats = SimpleNamespace(arrival_time=time.time(), scheduled_ts=0.001, first_token_ts=0.0,
                                last_token_ts=0.0, first_token_latency=0.0)
        self.reqs.append(dict(rid=rid, index=len(self.reqs), left=params.max_tokens, stats=stats))

    def has_unfinished_requests(self):
        return any(r["left"] > 0 for r in self.reqs)

    def step(self):
        from types import SimpleNamespace

        self.step_no += 1
        ts, outs = self.step_no * 0.01, []
        for r in self.reqs:
            if r["left"] > 0 and self.step_no >= r["index"] + 1:
                m = r["stats"]
                if not m.first_token_ts:
                    m.first_token_ts, m.first_token_latency = ts, ts
                m.last_token_ts = ts
                r["left"] -= 1
                outs.append(SimpleNamespace(request_id=r["rid"], metrics=m, finished=r["left"] == 0,
                                            outputs=[SimpleNamespace(token_ids=[7])]))
        return outs


def test_child_parts_with_fake_engine():
    from types import SimpleNamespace

    from vllm_duo.eval import bench

    llm = SimpleNamespace(llm_engine=_FakeEngine())
    a = bench._decode_at_capacity(llm, dict(prompt_tokens=32, decode_tokens=40, batch=None, max_num_seqs=64),
                                  {"max_concurrency": 3.7})
    assert a["batch"] == 3 and a["decode"]["decode_tokens_per_s"] == pytest.approx(300.0)
    assert a["decode"]["window_steps"] == 40 - 3 and a["prefill_tokens_per_s"] > 0
    assert a["ttft_s"]["p50"] == pytest.approx(0.02)

    llm = SimpleNamespace(llm_engine=_FakeEngine())
    b = bench._short_prompts(llm, dict(prompt_tokens=16, batch=4, output_tokens=8, repeats=2))
    assert len(b["walls_s"]) == 2 and b["median"]["decode"]["requests"] == 4 and b["output_tokens_per_s"] > 0

    with pytest.raises(RuntimeError, match="--a-batch"):
        bench._decode_at_capacity(llm, dict(prompt_tokens=8, decode_tokens=4, batch=None, max_num_seqs=8), {})

    llm = SimpleNamespace(llm_engine=_FakeEngine())
    llm.llm_engine.vllm_config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=4000))
    c = bench._max_context(llm, dict(max_positions=8000, verify=0.5), {"kv_cache_tokens": 4100})
    assert c["max_context_tokens"] == 4000 and c["bounded_by_positions"] is False
    assert (c["verify"]["prompt_tokens"], c["verify"]["generated"]) == (2000, 4)
    assert set(c["verify"]) == {"prompt_tokens", "wall_s", "ttft_s", "generated", "decode_tokens_per_s"}
    c = bench._max_context(llm, dict(max_positions=8000, verify=1.0, verify_tokens=10), {})
    assert (c["verify"]["prompt_tokens"], c["verify"]["generated"]) == (3990, 10)  # fills the context
    assert c["verify"]["decode_tokens_per_s"] == pytest.approx(100.0)  # 9 tokens after the first, 10 ms steps
