"""Calibrated sparsity: the choice rule, the record it writes into a pattern folder, and its CLI (CPU)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import pattern_dir
from vllm_duo.errors import DuoConfigError
from vllm_duo.eval import calibrate
from vllm_duo.patterns import load_gates

SMOLLM2 = "/tmp/models/smollm2-135m-instruct"


@pytest.mark.parametrize("measured,expected", [
    ({0.25: 1.0, 0.5: 0.975, 0.75: 0.95}, 0.5),  # 39/40 is within one case in 40; 38/40 is not
    ({0.25: 1.0, 0.5: 1.0, 0.75: 1.0}, 0.75),
    ({0.25: 0.95, 0.5: 1.0, 0.75: 1.0}, None),  # the smallest fails: higher passes are luck, not a choice
    ({0.25: 1.0, 0.5: 0.9, 0.75: 1.0}, 0.25),  # stop at the first failure
    ({0.75: 0.975, 0.25: 1.0}, 0.75),  # order of the measurement does not matter
])
def test_choose(measured, expected):
    assert calibrate.choose(1.0, measured) == expected


def test_choose_tolerance():
    measured = {0.25: 39 / 40, 0.5: 38 / 40}
    assert calibrate.choose(1.0, measured, 0.0) is None
    assert calibrate.choose(1.0, measured, 2 / 40) == 0.5
    assert calibrate.choose(0.8, {0.5: 0.8 - 1 / 40}, 1 / 40) == 0.5  # exactly at the limit counts (float rounding)
    with pytest.raises(DuoConfigError, match="0.025 = one case in 40"):
        calibrate.choose(1.0, measured, 2.5)


def _summary(correct: int, total: int = 40) -> dict:
    return {"correct": correct, "total": total, "accuracy": correct / total,
            "formats": {"single_number_repeat": {"accuracy": correct / total}}}


def _payload(full: int, duo: dict[float, int]) -> dict:
    methods = {"full": dict(_summary(full), duo={}), "streaming": dict(_summary(2), duo={"pattern": "streaming"})}
    for s, c in duo.items():
        methods[f"duo_s{round(s * 100):03d}"] = dict(_summary(c), duo={"pattern": "/p", "sparsity": s})
    return {"runner": "hf", "lengths": [1500], "methods": methods}


def test_calibration_record():
    rec = calibrate.calibration(_payload(40, {0.25: 40, 0.5: 39, 0.75: 35}))
    assert rec[calibrate.CONFIG_KEY] == 0.5
    assert rec["full"]["correct"] == 40 and rec["sparsities"]["0.75"]["correct"] == 35
    assert rec["suite"]["lengths"] == [1500]
    with pytest.raises(DuoConfigError, match="--methods full duo"):
        calibrate.calibration({"methods": {"full": _summary(40)}})
    with pytest.raises(DuoConfigError, match="--methods full duo"):  # a failed engine has no accuracy
        calibrate.calibration({"methods": {"full": {"error": "x"}, "duo_s050": {"duo": {"sparsity": 0.5}}}})


@pytest.fixture
def pattern(tmp_path):
    dst = tmp_path / "pattern"
    shutil.copytree(pattern_dir("Llama-3-8B-Instruct-Gradient-1048k"), dst)
    return str(dst)


def test_write_keeps_the_pattern_loadable(pattern):
    before = json.load(open(f"{pattern}/config.json"))
    gates = load_gates(pattern).gates
    assert calibrate.read(pattern) is None
    calibrate.write(pattern, calibrate.calibration(_payload(40, {0.25: 40, 0.5: 40, 0.75: 30})))
    after = json.load(open(f"{pattern}/config.json"))
    assert after[calibrate.CONFIG_KEY] == 0.5 and after["calibration"]["tolerance"] == calibrate.DEFAULT_TOLERANCE
    assert {k: after[k] for k in before} == before  # every other key kept
    assert (load_gates(pattern).gates == gates).all()
    assert calibrate.read(pattern) == 0.5
    assert calibrate.read(f"{pattern}/full_attention_heads.tsv") == 0.5


def test_read_refuses_a_bad_value(pattern):
    cfg = json.load(open(f"{pattern}/config.json"))
    json.dump(dict(cfg, calibrated_sparsity=50), open(f"{pattern}/config.json", "w"))
    with pytest.raises(DuoConfigError, match="fraction in"):
        calibrate.read(pattern)


def test_cli_from_results(pattern, tmp_path, capsys):
    results = tmp_path / "suite.json"
    results.write_text(json.dumps(_payload(40, {0.25: 40, 0.5: 39, 0.75: 30})))
    argv = ["/models/m", "--pattern", pattern, "--from-results", str(results)]
    assert calibrate.main(argv + ["--dry-run"]) == 0
    assert calibrate.read(pattern) is None and "calibrated sparsity 0.5" in capsys.readouterr().out
    assert calibrate.main(argv + ["--tolerance", "0"]) == 0
    assert calibrate.read(pattern) == 0.25
    results.write_text(json.dumps(_payload(40, {0.5: 30})))
    assert calibrate.main(argv + ["--dry-run"]) == 1  # nothing within tolerance: reported only
    assert calibrate.read(pattern) == 0.25 and "measure lower sparsities" in capsys.readouterr().out
    assert calibrate.main(argv) == 1  # recorded: the older 0.25 no longer stands
    assert calibrate.read(pattern) is None and "cleared calibrated_sparsity" in capsys.readouterr().out
    assert calibrate.main(["/models/m", "--pattern", f"{pattern}/full_attention_heads.tsv",
                           "--from-results", str(results), "--tolerance", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a pattern folder" in err  # one clear line


@pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason=f"no SmolLM2 tokenizer at {SMOLLM2}")
def test_measure_then_calibrate_end_to_end(tmp_path, capsys):
    """The HF runner, the suite payload and calibrate on it, with a tiny random Llama (its answers
    are noise; this checks the plumbing: same prompts for every method, per-format counts)."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_duo.eval import suite
    from vllm_duo.eval.methods import expand_methods

    model = tmp_path / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
                     ).save_pretrained(model)
    for f in os.listdir(SMOLLM2):
        if f.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(os.path.join(SMOLLM2, f), model / f)
    pattern = tmp_path / "pattern"
    pattern.mkdir()
    np.savetxt(pattern / "full_attention_heads.tsv", [[0.9, 0.1], [0.2, 0.8]], delimiter="\t")
    (pattern / "config.json").write_text("{}")
    methods = expand_methods(["full", "duo", "streaming"], pattern=str(pattern), sparsities=[0.5], sink=4,
                             recent=16)
    tasks = suite.parse_formats(["single_number_repeat", "multiquery_word_code", "single_sentence_repeat_chat"])
    payload = suite.measure(str(model), methods, tasks, lengths=[300], depths=[0.0, 1.0], samples=1, seed=0,
                            sink=4, recent=16, log=lambda s: None)
    assert set(payload["per_format"]) == {"full", "duo_s050", "streaming"}
    assert payload["prompts_per_format"] == {t.name: 2 for t in tasks}
    prompts = [[(c["format"], c["values"]) for c in r["cells"]] for r in payload["methods"].values()]
    assert prompts[0] == prompts[1] == prompts[2]
    results = tmp_path / "suite.json"
    results.write_text(json.dumps(payload))
    rc = calibrate.main([str(model), "--pattern", str(pattern), "--from-results", str(results), "--tolerance", "0.99"])
    assert rc == 0 and calibrate.read(str(pattern)) == 0.5
    with pytest.raises(DuoConfigError, match="lower the lengths"):
        suite.measure(str(model), methods, tasks, lengths=[4000], depths=[0.5], samples=1, seed=0, sink=4,
                      recent=16)


def test_calibration_records_the_prefill_window_it_was_measured_with(capsys):
    payload = dict(_payload(40, {0.5: 40}), prefill_recent=8192, sink=64, recent=256)
    assert calibrate.calibration(payload)["suite"]["prefill_recent"] == 8192
    assert calibrate.main(["/m", "--pattern", "/p", "--from-results", "x.json", "--prefill-recent", "8192"]) == 2
    assert "--prefill-recent needs --runner engine" in capsys.readouterr().err
