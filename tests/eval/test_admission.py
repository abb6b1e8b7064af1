"""The admission job's decode length: every request still decodes when the last prompt is in."""

from vllm_duo.eval.admission import decode_tokens


def test_decode_outlasts_the_prefill_of_every_other_request() -> None:
    # 25 requests of 64K at 16K tokens per step: the last prompt is in after ~100 steps
    assert decode_tokens(25, 65536, 16384) == 100 + 8
    assert decode_tokens(1, 1000, 16384) == 1 + 8
    # more requests, or a smaller step budget, need longer decodes
    assert decode_tokens(12, 65536, 8192) > decode_tokens(12, 65536, 16384)


def test_capacity_requests_reach_both_admission_jobs_and_count_what_was_admitted(monkeypatch, tmp_path, capsys):
    """``--requests N``: N submitted to each engine; more than fit may wait (the ratio counts what
    decoded at once), but a preemption still voids the figure. Without --admit: one-line refusal."""
    import json
    import sys

    import pytest

    from benchmarks import capacity
    from vllm_duo.eval import engine_proc, results

    at_once = {"FLASH_ATTN": 12, "duo": 24}
    specs = []

    def run_job(target, spec, timeout):
        specs.append(spec)
        return {"requests": spec["requests"], "max_decoding_at_once": at_once[spec["engine"]["attention_backend"]],
                "preemptions": 0}

    monkeypatch.setattr(engine_proc, "run_job", run_job)
    monkeypatch.setattr(results, "RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["capacity.py", "--admit", "--modes", "window", "--requests", "25"])
    capacity.main()
    assert [s["requests"] for s in specs] == [25, 25]
    out = json.load(open(next(tmp_path.glob("capacity_admitted_*.json"))))
    assert out["clean"] and out["ratio"] == 2.0 and out["requests"] == 25
    monkeypatch.setattr(sys, "argv", ["capacity.py", "--requests", "25"])
    with pytest.raises(SystemExit):
        capacity.main()
    assert "--requests 25: give a positive count, with --admit" in capsys.readouterr().err
