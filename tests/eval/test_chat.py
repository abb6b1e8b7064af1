"""The chat job's bookkeeping (CPU): where generated tokens sit, the teacher-forced gap, hits."""

from __future__ import annotations

import pytest

from benchmarks.chat import engine, parse_args
from vllm_duo.eval.chat import conversations, logprob_gap, output_positions, summary


def _result() -> dict:
    # Two turns: prompt 3 -> 2 tokens; prompt 3 + 2 + 2 = 7 -> 2 tokens.
    return {"prompt_lens": [[3, 7]], "tokens": [[[10, 11], [12, 13]]], "cached": [[0, 4]],
            "logprobs": [[[-0.5, -1.0], [-0.25, -2.0]]], "ttft_s": [0.1, 0.3], "turn_s": [1.0, 1.0]}


def test_positions_gap_and_summary() -> None:
    result = _result()
    assert output_positions(result) == [[3, 4, 7, 8]]
    scores = [[None, -9, -9, -0.5, -1.5, -9, -9, -0.25, -2.0]]
    assert logprob_gap(result, {"scores": scores}) == pytest.approx(0.5 / 4)
    s = summary(result)
    assert (s["cached_tokens"], s["prompt_tokens"], s["generated_tokens"]) == (4, 10, 4)
    assert s["output_tokens_per_s"] == 2.0 and s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["ttft_p50_by_turn_s"] == [0.1, 0.3]  # one conversation: its TTFT per turn
    assert summary(dict(result, ttft_s=[0.1]))["ttft_p50_by_turn_s"] is None  # a request without stats


def test_conversations_are_seeded_and_sized() -> None:
    convs = conversations(3, 8, seed=1)
    assert convs == conversations(3, 8, seed=1) and len(convs) == 3 and all(len(c) == 8 for c in convs)
    assert all(200 <= len(turn) <= 2000 for c in convs for turn in c)


def test_chat_benchmark_compares_with_prefix_caching_on() -> None:
    args = parse_args([])
    assert (args.conversations, args.turns) == (64, 8)
    for backend in ("FLASH_ATTN", "duo"):
        e = engine(args, backend)
        assert e["enable_prefix_caching"] is True and e["attention_backend"] == backend
    assert "duo_attention" in engine(args, "duo")["additional_config"]


def test_profile_flag_adds_a_profiled_last_turn_per_backend(monkeypatch, tmp_path) -> None:
    """``--profile``: after both timed runs, one profile_turn job per backend on the same
    conversations and engine; its figures land in the result beside the timed run's."""
    import json

    import benchmarks.chat as chat_bench
    from vllm_duo.eval import results

    jobs = []

    def fake_run_job(job, spec, **kw):
        jobs.append((job, spec))
        if job.endswith("profile_turn"):
            return {"turn": 2, "wall_ms": 10.0, "top_kernels_ms": {"k": 1.0}}
        n = len(spec["conversations"])
        return {"prompt_lens": [[5, 9]] * n, "tokens": [[[1], [2]]] * n, "cached": [[0, 4]] * n,
                "logprobs": [[]] * n, "ttft_s": [0.1] * n, "turn_s": [1.0, 1.0]}

    monkeypatch.setattr(chat_bench, "run_job", fake_run_job)
    monkeypatch.setattr(results, "RESULTS", str(tmp_path))
    chat_bench.main(["--conversations", "2", "--turns", "2", "--profile"])
    assert [j for j, _ in jobs] == ["vllm_duo.eval.chat:chat"] * 2 + ["vllm_duo.eval.chat:profile_turn"] * 2
    assert jobs[2][1]["conversations"] == jobs[0][1]["conversations"]
    # every job first serves the same unmeasured chats, long enough for the streaming prefill kernel
    warmup = jobs[0][1]["warmup"]
    assert all(job[1]["warmup"] == warmup for job in jobs) and warmup != jobs[0][1]["conversations"]
    assert len(warmup[0]) == 2 and all(len(turn) >= 600 for conv in warmup for turn in conv)
    assert jobs[3][1]["engine"]["attention_backend"] == "duo"
    payload = json.loads(next(tmp_path.glob("chat_*.json")).read_text())
    assert all(payload["runs"][b]["profile"]["turn"] == 2 for b in ("FLASH_ATTN", "duo"))
    jobs.clear()
    chat_bench.main(["--conversations", "2", "--turns", "2"])
    assert not any(j.endswith("profile_turn") for j, _ in jobs)


def test_serve_takes_turns_together_and_keeps_each_history() -> None:
    from types import SimpleNamespace

    from vllm_duo.eval.chat import _serve

    calls = []

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            calls.append([p["prompt_token_ids"] for p in prompts])
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7])]) for _ in prompts]

    turns = []
    history = _serve(FakeLLM(), [[[1, 2], [3]], [[4], [5, 6]]], None,
                     on_turn=lambda prompts, outputs, seconds: turns.append((prompts, len(outputs), seconds >= 0)))
    assert calls == [[[1, 2], [4]], [[1, 2, 7, 3], [4, 7, 5, 6]]]
    assert turns == [(calls[0], 2, True), (calls[1], 2, True)]  # every turn seen with its prompts
    assert history == [[1, 2, 7, 3, 7], [4, 7, 5, 6, 7]]
    assert _serve(FakeLLM(), [], None) == []
