"""A few identification steps on a tiny random Llama: loss falls, gates move, the folder loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.identify.conftest import tiny_llama, word_tokenizer
from vllm_duo.errors import DuoConfigError
from vllm_duo.identify import data as data_mod
from vllm_duo.identify.train import IdentifySettings, identify
from vllm_duo.patterns import load_gates

SETTINGS = dict(max_length=256, min_length=180, num_passkeys=2, passkey_length=4, sink_size=4,
                recent_size=16, query_chunk=32, save_steps=2)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def _run(tok, out, steps=10, resume=False, **kw):
    settings = IdentifySettings(steps=steps, **{**SETTINGS, **kw})
    return identify(tiny_llama(len(tok)), tok, settings, str(out), model_name="tiny-llama",
                    resume=resume, progress=False)


def test_loss_falls_gates_move_and_pattern_loads(tok, tmp_path):
    res = _run(tok, tmp_path, steps=12)
    loss = res.log["loss"]
    assert res.finished and res.steps_done == 12 and len(loss) == 12
    assert loss[0] == pytest.approx(0.05, abs=1e-4)  # all gates 1: student == teacher, loss = reg
    assert np.mean(loss[-3:]) < loss[0]
    assert res.log["distill"][-1] > 0
    assert res.gates.shape == (3, 2) and (res.gates < 1).any() and res.gates.min() >= 0
    gp = load_gates(str(tmp_path))
    np.testing.assert_allclose(gp.gates, res.gates, atol=1e-6)
    assert (gp.sink_size, gp.recent_size) == (4, 16)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["num_steps"] == 12 and cfg["reg_weight"] == 0.05 and cfg["lr"] == 0.02
    log = json.load(open(tmp_path / "identify_log.json"))
    assert log["steps_done"] == 12 and len(log["loss"]) == 12 and "final_gates" in log
    assert (tmp_path / "gates_heatmap.png").stat().st_size > 0


def test_resume_continues_exactly(tok, tmp_path, monkeypatch):
    straight = _run(tok, tmp_path / "a", steps=6)
    real = data_mod.PasskeyData.batch

    def crash_at_4(self, step, batch_size=1):
        if step == 4:
            raise RuntimeError("simulated crash")
        return real(self, step, batch_size)

    monkeypatch.setattr(data_mod.PasskeyData, "batch", crash_at_4)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(tok, tmp_path / "b", steps=6)
    monkeypatch.setattr(data_mod.PasskeyData, "batch", real)
    with pytest.raises(DuoConfigError, match="--resume"):
        _run(tok, tmp_path / "b", steps=6)
    with pytest.raises(DuoConfigError, match="settings differ"):
        _run(tok, tmp_path / "b", steps=6, resume=True, sink_size=8)
    resumed = _run(tok, tmp_path / "b", steps=6, resume=True)
    assert resumed.steps_this_run == 2 and len(resumed.log["loss"]) == 6
    np.testing.assert_allclose(resumed.gates, straight.gates, atol=1e-6)
    np.testing.assert_allclose(resumed.log["loss"], straight.log["loss"], rtol=1e-5, atol=1e-7)


def test_dense_prompt_trains_other_gates_and_is_recorded(tok, tmp_path):
    """The flag reaches the gated attention: on CPU the runs are deterministic, so equal losses
    would mean it did nothing (the semantics are tested in test_gating)."""
    dense = _run(tok, tmp_path / "d", steps=4, dense_prompt=True)
    windowed = _run(tok, tmp_path / "w", steps=4)
    assert dense.log["distill"][1:] != windowed.log["distill"][1:]
    assert json.load(open(tmp_path / "d" / "config.json"))["dense_prompt"] is True
    assert json.load(open(tmp_path / "w" / "config.json"))["dense_prompt"] is False


def test_cli_end_to_end(tiny_model_dir, tmp_path, capsys):
    from vllm_duo.cli.main import main

    out = tmp_path / "pattern"
    argv = ["identify", tiny_model_dir, "--out", str(out), "--steps", "3", "--max-length", "256",
            "--min-length", "180", "--num-passkeys", "2", "--passkey-length", "4", "--sink", "4",
            "--recent", "16", "--no-grad-ckpt"]
    assert main(argv) == 0
    assert "done: 3/3 steps" in capsys.readouterr().out
    assert load_gates(str(out)).shape == (3, 2)
    assert main(argv) == 2  # the folder holds a checkpoint: refused without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0  # already finished: re-exports
    assert main([*argv, "--resume", "--dense-prompt"]) == 2  # a different run: refused
    assert "dense_prompt" in capsys.readouterr().err


def test_identification_never_imports_vllm():
    code = ("import sys, vllm_duo.cli.identify_cmd, vllm_duo.identify.train, vllm_duo.identify.export\n"
            "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
            "assert not bad, bad\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
