"""``vllm-duo patterns`` / ``inspect`` / ``niah --help``: what a user types on a CPU machine (CPU)."""

from __future__ import annotations

import json

import pytest

from vllm_duo.builtin_patterns import BUILTINS
from vllm_duo.cli.main import main


def test_patterns_lists_model_shape_and_source(capsys):
    assert main(["patterns"]) == 0
    out = capsys.readouterr().out
    for p in BUILTINS:
        line = next(ln for ln in out.splitlines() if ln.startswith(p.name))
        layers, kv = p.shape()
        assert p.models[0] in line and f"{layers} x {kv}" in line and p.source in line
    assert "LICENSE.duo-attention" in out


def test_inspect_a_builtin_by_name(tmp_path, capsys):
    png = tmp_path / "heat.png"
    assert main(["inspect", "Llama-3-8B-Instruct-Gradient-1048k", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "32 layers x 8 KV heads" in out and "128 of 256 KV heads" in out and png.stat().st_size > 0


def _llama3_config(tmp_path) -> str:
    from vllm_duo.eval.engine_proc import LLAMA3_8B

    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    return str(tmp_path)


@pytest.mark.parametrize("argv,msg", [
    (["full"], "'full' has no gates to inspect.*built-in name"),
    (["streaming"], "'streaming' has no gates to inspect"),
    (["smollm2-135m-instruct", "--out", "/no/such/dir/x.png"], "folder '/no/such/dir' does not exist"),
    (["smollm2-135m-instruct", "--context", "-5"], "--context is a number of tokens >= 1, got -5"),
    (["smollm2-135m-instruct", "--sink", "-1"], "--sink is a number of tokens >= 0, got -1"),
    (["smollm2-135m-instruct", "--recent", "-3"], "--recent is a number of tokens >= 1, got -3"),
    (["smollm2-135m-instruct", "--threshold", "2"], "--threshold must be in"),
    (["smollm2-135m-instruct", "--model", "LLAMA3"], r"\(30, 3\).*\(32, 8\)"),
])
def test_inspect_refuses_before_printing(tmp_path, capsys, argv, msg):
    import re

    argv = [_llama3_config(tmp_path) if a == "LLAMA3" else a for a in argv]
    assert main(["inspect", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing printed before the error
    assert re.search(msg, err) and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.png"))


def test_niah_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["niah", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "'window') (default" not in out
    assert "(default: 12)" in out  # --max-tokens still shows its default
