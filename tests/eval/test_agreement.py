"""The teacher-forced gap and the evidence check (CPU): indices, aggregation, refusals."""

from __future__ import annotations

import json

import pytest

from vllm_duo.eval import agreement, evidence


def _scores(prompt: list[int], tokens: list[int], values: list[float]) -> list[float]:
    """A scorer's list for prompt + tokens: entry j is token j + 1's logprob."""
    seq = prompt + tokens
    out = [-9.0] * (len(seq) - 1)
    out[len(prompt) - 1:] = values
    return out


def test_gap_reads_the_generated_positions_and_takes_the_worst_request() -> None:
    prompts = [[5, 6, 7], [1, 2]]
    run = {"tokens": [[8, 9], [3, 4]], "logprobs": [[-1.0, -2.0], [-0.5, -0.5]]}
    scores = [_scores(prompts[0], run["tokens"][0], [-1.1, -2.1]),
              _scores(prompts[1], run["tokens"][1], [-0.5, -1.5])]
    assert agreement.gap(prompts, run, scores) == pytest.approx(0.5)  # request 2: (0 + 1) / 2
    with pytest.raises(ValueError, match="cover"):
        agreement.gap(prompts, run, [s[:-1] for s in scores])


def test_tolerance_has_a_floor() -> None:
    assert agreement.tolerance(0.0) == pytest.approx(0.01)
    assert agreement.tolerance(0.02) == pytest.approx(0.05)


def test_check_records_and_fails_on_an_unseparated_control(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ev.jsonl"
    monkeypatch.setenv(evidence.ENV, str(path))
    evidence.check("t::ok", "a vs b", "m", 0.05, 0.01, "broken", 1.0)
    with pytest.raises(AssertionError, match="could not fail"):
        evidence.check("t::weak", "a vs b", "m", 0.05, 0.01, "broken", 0.02)
    with pytest.raises(AssertionError, match="exceeds"):
        evidence.check("t::bad", "a vs b", "m", 0.05, 0.2, "broken", 1.0)
    rows = evidence.read_rows(str(path))
    assert [r["test"] for r in rows] == ["t::ok", "t::weak", "t::bad"]
    assert evidence.summarize(rows) == {"evidence_rows": 3, "evidence_all_separated": False,
                                        "evidence_all_passed": False}
    assert json.loads(path.read_text().splitlines()[0])["separated"] is True
