"""``bench_plot``: a PNG from bench JSONs, one panel per part that has results."""

from __future__ import annotations

import json

import pytest

from vllm_duo.eval.bench_plot import main, plot_bench


def _payload(part_rows: dict) -> dict:
    return {"device": "cpu", "date": "2026-11-23", "rows": part_rows}


def test_plot_from_two_files(tmp_path):
    ab = _payload({"full": {"a": {"batch": 6, "decode": {"decode_tokens_per_s": 220.0}}},
                   "duo_s050": {"a": {"batch": 8, "decode": {"decode_tokens_per_s": 397.0}}}})
    c = _payload({"full": {"c": {"max_context_tokens": 408784}},
                  "duo_s050": {"c": {"max_context_tokens": 784464}}})
    files = []
    for i, p in enumerate((ab, c)):
        files.append(str(tmp_path / f"r{i}.json"))
        json.dump(p, open(files[-1], "w"))
    out = str(tmp_path / "bench.png")
    main(files + ["--out", out])
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no bench part"):
        plot_bench([_payload({"full": {"errors": {"ab": "boom"}}})], str(tmp_path / "x.png"))
