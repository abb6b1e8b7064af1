"""``vllm-duo niah`` end to end on CPU: stand-in tokenizer and engine runner, real files out."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.eval.codec import WordCodec
from vllm_duo.cli.main import main

SMOL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "max_position_embeddings": 8192}


class FakeHFCodec(WordCodec):
    shared = WordCodec()  # one vocabulary for the CLI and the fake engine

    def __init__(self, path: str):
        self.vocab, self.words = self.shared.vocab, self.shared.words

    def special_prefix(self) -> list[int]:
        return self.encode("<s>")

    def chat_wrap(self) -> tuple[str, str]:
        return "<|user|>\n", "<|end|>\n<|assistant|>\n"


@pytest.fixture
def smol(tmp_path):
    model = tmp_path / "smol"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMOL))
    pattern = tmp_path / "pattern"
    pattern.mkdir()
    np.savetxt(pattern / "full_attention_heads.tsv", np.random.RandomState(0).rand(30, 3), delimiter="\t")
    return str(model), str(pattern)


@pytest.fixture
def fake_engine(monkeypatch):
    from vllm_duo.cli import needs
    from vllm_duo.eval import engine_proc, niah

    calls = []

    def run_job(job, spec, **kw):
        calls.append(spec)
        codec = FakeHFCodec("")
        out = []
        for ids in spec["prompts"]:
            key = re.search(r"pass key is (\d+)", codec.decode(ids)).group(1)
            duo = spec["engine"].get("additional_config", {}).get("duo_attention", {})
            streaming = duo.get("pattern") == "streaming"
            out.append(codec.encode(" 11111." if streaming and len(ids) > 400 else f" {key}. Done"))
        return {"tokens": out, "generate_seconds": 0.1}

    monkeypatch.setattr(engine_proc, "run_job", run_job)
    monkeypatch.setattr(needs, "cuda_devices", lambda: 1)
    monkeypatch.setattr(niah, "HFCodec", FakeHFCodec)
    return calls


def test_niah_grid_json_pngs_and_record(smol, fake_engine, tmp_path, monkeypatch):
    from vllm_duo.eval import results as summary

    monkeypatch.setattr(summary, "RESULTS", str(tmp_path / "results"))
    model, pattern = smol
    out = tmp_path / "out"
    rc = main(["niah", "--model", model, "--pattern", pattern, "--lengths", "300", "600", "--depths", "0", "1",
               "--samples", "2", "--out", str(out), "--record", "niah_test", "--quiet", "--chat-template", "on"])
    assert rc == 0
    names = [s["engine"].get("attention_backend") for s in fake_engine]
    assert names == ["FLASH_ATTN", "duo", "duo", "duo"]
    assert [s["engine"].get("additional_config", {}).get("duo_attention", {}).get("sparsity")
            for s in fake_engine] == [None, 0.5, 0.75, None]
    assert all(len(s["prompts"]) == 8 and s["engine"]["max_model_len"] == 612 for s in fake_engine)
    data = json.loads((out / "niah.json").read_text())
    assert data["accuracy"] == {"full": 1.0, "duo_s050": 1.0, "duo_s075": 1.0, "streaming": 0.5}
    assert data["methods"]["streaming"]["grid"] == [[1.0, 0.0], [1.0, 0.0]]
    assert sorted(p.name for p in out.glob("*.png")) == [
        "niah_duo_s050.png", "niah_duo_s075.png", "niah_full.png", "niah_streaming.png"]
    rec = json.loads((out / "summary.json").read_text())["niah_test"]
    assert rec["value"] == data["accuracy"]
    assert len(list(out.iterdir())) <= 8  # what comes back from $OUT on the GPU machine


def test_niah_refuses_bad_input_before_any_engine(smol, fake_engine, tmp_path, capsys):
    model, pattern = smol
    base = ["niah", "--model", model, "--out", str(tmp_path / "o"), "--quiet"]
    assert main(base + ["--methods", "duo"]) == 2
    assert "--pattern" in capsys.readouterr().err
    assert main(base + ["--methods", "full", "--depths", "50"]) == 2
    assert "0.5, not 50" in capsys.readouterr().err
    assert main(base + ["--methods", "full", "--lengths", "8190"]) == 2
    assert "positions" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    np.savetxt(bad, np.ones((32, 8)), delimiter="\t")
    assert main(base + ["--pattern", str(bad)]) == 2
    assert "shape" in capsys.readouterr().err
    assert fake_engine == []


def test_niah_kv_cache_gib_gives_every_engine_a_fixed_cache(smol, fake_engine, tmp_path):
    """--kv-cache-gib: each engine gets that many bytes of KV cache and a small utilization (to share a GPU)."""
    model, pattern = smol
    assert main(["niah", "--model", model, "--pattern", pattern, "--lengths", "300", "--depths", "0", "--quiet",
                 "--out", str(tmp_path / "out"), "--kv-cache-gib", "4"]) == 0
    assert {(s["engine"]["kv_cache_memory_bytes"], s["engine"]["gpu_memory_utilization"]) for s in fake_engine} \
        == {(4 << 30, 0.08)}
