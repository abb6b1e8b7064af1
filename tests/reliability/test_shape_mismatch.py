"""A pattern made for another model (other layer or KV-head count) is refused at startup,
in ``EngineArgs(...).create_engine_config()`` (what ``LLM``/``vllm serve`` run first), with
both shapes named. Runs on CPU with config.json-only Llama models."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from tests.reliability.front import create_engine_config, load_plugins
from tests.reliability.sim import write_model_dir
from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import PATTERN_FILE

PATTERN_SHAPE = (32, 8)  # Llama-3-8B


@pytest.fixture(scope="module")
def pattern(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Llama-3-8B-shaped pattern folder (synthetic gates; the shipped ones are not needed)."""
    load_plugins()
    folder = tmp_path_factory.mktemp("pattern")
    gates = np.random.default_rng(0).uniform(0, 1, PATTERN_SHAPE)
    (folder / PATTERN_FILE).write_text("".join("\t".join(f"{g:.4f}" for g in row) + "\n" for row in gates))
    return str(folder)


def _model(tmp_path, layers: int, kv_heads: int) -> str:
    q_heads = kv_heads * (4 if kv_heads <= 8 else 1)  # GQA as in Llama-3 (MHA for 32 KV heads)
    return write_model_dir(str(tmp_path / f"llama-{layers}x{kv_heads}"), num_hidden_layers=layers,
                           num_key_value_heads=kv_heads, num_attention_heads=q_heads, hidden_size=q_heads * 128)


@pytest.mark.parametrize("layers,kv_heads", [(30, 8), (32, 4), (40, 8), (32, 32), (30, 3)],
                         ids=["fewer-layers", "fewer-kv-heads", "more-layers", "more-kv-heads", "smollm2-shape"])
@pytest.mark.parametrize("given", ["folder", "tsv", "mask"])
def test_pattern_for_another_model_refused_at_startup(tmp_path, pattern: str, layers: int, kv_heads: int,
                                                      given: str) -> None:
    model = _model(tmp_path, layers, kv_heads)
    duo = {"folder": {"pattern": pattern, "sparsity": 0.5},
           "tsv": {"pattern": os.path.join(pattern, PATTERN_FILE), "threshold": 0.5},
           "mask": {"retrieval_mask": [[1, 0] * (PATTERN_SHAPE[1] // 2)] * PATTERN_SHAPE[0]}}[given]
    with pytest.raises(DuoConfigError) as err:
        create_engine_config(model, duo)
    msg = str(err.value)
    assert re.search(rf"head pattern has shape \(32, 8\).*{re.escape(model)} has \({layers}, {kv_heads}\)", msg), msg
    assert "use a pattern made for this model" in msg


def test_pattern_for_this_model_accepted(tmp_path, pattern: str) -> None:
    cfg = create_engine_config(_model(tmp_path, *PATTERN_SHAPE), {"pattern": pattern, "sparsity": 0.75})
    mask = np.asarray(cfg.additional_config["duo_attention"]["retrieval_mask"])
    assert mask.shape == PATTERN_SHAPE and mask.sum() == mask.size // 4
