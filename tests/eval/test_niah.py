"""NIAH prompts, scoring, grid and heatmap with a stand-in tokenizer (CPU, no vLLM)."""

from __future__ import annotations

import pytest

from tests.eval.codec import WordCodec
from vllm_duo.errors import DuoConfigError
from vllm_duo.eval.niah import (ANSWER, CHAT_QUESTION, INTRO, NEEDLE, QUESTION, PromptBuilder, cell_record,
                                first_number, grid_summary, is_correct, passkey_for, plot_grid)


@pytest.fixture
def codec():
    return WordCodec()


@pytest.mark.parametrize("length", [200, 1000, 4321])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_exact_length_and_needle_depth(codec, length, depth):
    b = PromptBuilder(codec, prefix=codec.encode("<s>"))
    p = b.build(length, depth, 71432)
    assert len(p.ids) == p.length == length
    needle = codec.decode(p.ids[p.needle_start:p.needle_end])
    assert needle.strip("\n") == "The pass key is 71432. Remember it. 71432 is the pass key."
    haystack = length - len(b.head) - len(b.tail) - (p.needle_end - p.needle_start)
    filler_before = p.needle_start - len(b.head)
    assert abs(filler_before - depth * haystack) <= max(len(u) for u in b.units)  # nearest sentence
    assert p.actual_depth == pytest.approx(filler_before / haystack)
    text = codec.decode(p.ids)
    assert text.startswith("<s>" + INTRO + "\n") and text.endswith(f".\n{QUESTION}\nAnswer: {ANSWER}")
    assert "\n\n" not in text[len("<s>" + INTRO) + 1:]  # a blank line before the question derails small models
    before = codec.decode(p.ids[:p.needle_start])
    assert before.endswith(".") or before.endswith(INTRO + "\n")  # needle at a sentence boundary


def test_chat_template_layout(codec):
    chat = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    p = PromptBuilder(codec, chat=chat).build(500, 0.5, 12345)
    text = codec.decode(p.ids)
    assert len(p.ids) == 500
    assert text.startswith(chat[0] + INTRO + "\n")
    assert text.endswith(f".\n{CHAT_QUESTION}{chat[1]}{ANSWER}")


def test_too_short_and_bad_depth(codec):
    b = PromptBuilder(codec)
    shortest = len(b.head) + len(b.tail) + len(codec.encode(NEEDLE.format(key=99999))) + 2 * len(codec.encode("\n"))
    with pytest.raises(DuoConfigError, match="too short"):
        b.build(shortest - 1, 0.5, 99999)
    assert len(b.build(shortest, 0.5, 99999).ids) == shortest
    with pytest.raises(DuoConfigError, match="fraction"):
        b.build(1000, 50, 12345)


def test_passkeys_are_stable_and_distinct():
    keys = {passkey_for(0, n, d, s) for n in (1000, 2000) for d in (0.0, 0.5) for s in range(3)}
    assert len(keys) == 12 and all(10000 <= k <= 99999 for k in keys)
    assert passkey_for(0, 1000, 0.5, 1) == passkey_for(0, 1000, 0.5, 1)
    assert passkey_for(1, 1000, 0.5, 1) != passkey_for(0, 1000, 0.5, 1)


@pytest.mark.parametrize("text,ok", [(" 71432.", True), ("71432 is it", True), (" 71432", True),
                                     (" 7143", False), (" 714321", False), (" unknown", False),
                                     (" 12345, no 71432", False)])
def test_scoring(text, ok):
    assert is_correct(text, 71432) is ok
    assert first_number("none") is None


def test_grid_summary_and_plot(codec, tmp_path):
    b = PromptBuilder(codec)
    lengths, depths = [300, 600], [0.0, 1.0]
    cells = []
    for n in lengths:
        for d in depths:
            for s in range(2):
                p = b.build(n, d, passkey_for(0, n, d, s))
                answer = f" {p.passkey}." if (d == 0.0 or s == 0) else " 11111."
                cells.append(cell_record(p, s, answer))
    summary = grid_summary(cells, lengths, depths)
    assert summary["grid"] == [[1.0, 1.0], [0.5, 0.5]]  # rows = depths, columns = lengths
    assert summary["accuracy"] == 0.75 and (summary["correct"], summary["total"]) == (6, 8)
    assert "ids" not in cells[0] and cells[0]["answer"] == str(cells[0]["passkey"])
    png = tmp_path / "grid.png"
    plot_grid(summary["grid"], lengths, depths, str(png), "full: 75%")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_grid([[None, 1.0], [0.0, None]], lengths, depths, str(tmp_path / "gaps.png"), "gaps")
