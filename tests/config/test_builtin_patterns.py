"""Built-in patterns: packaged, named, and picked for a model by name AND shape (CPU)."""

from __future__ import annotations

import fnmatch
import os
import re

import numpy as np
import pytest

from vllm_duo.builtin_patterns import BUILTINS, DATA_DIR, LICENSE_FILE, builtin, model_key, pick_builtin
from vllm_duo.errors import DuoConfigError
from vllm_duo.options import parse_options, resolve_options
from vllm_duo.patterns import load_gates

SHAPES = {"Llama-2-7B-32K-Instruct": (32, 32), "Llama-3-8B-Instruct-Gradient-1048k": (32, 8),
          "Meta-Llama-3.1-8B-Instruct": (32, 8), "Mistral-7B-Instruct-v0.2": (32, 8),
          "smollm2-135m-instruct": (30, 3)}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_builtin_is_packaged_with_its_shape():
    assert {p.name: p.shape() for p in BUILTINS} == SHAPES
    for p in BUILTINS:
        assert os.path.dirname(p.path) == DATA_DIR and load_gates(p.name).source.startswith(p.path)
    assert "MIT License" in open(LICENSE_FILE).read()


def test_package_data_globs_cover_exactly_the_loader_files():
    """setup.py's package_data ships every file the loader reads, and nothing else (no PNGs/logs)."""
    setup = open(os.path.join(ROOT, "setup.py")).read()
    globs = re.search(r"package_data=\{\"vllm_duo\": \[([^\]]*)\]", setup).group(1)
    globs = re.findall(r'"([^"]+)"', globs)
    pkg = os.path.join(ROOT, "vllm_duo")
    files = [os.path.relpath(os.path.join(d, f), pkg) for d, _, fs in os.walk(DATA_DIR) for f in fs
             if "__pycache__" not in d]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files), files
    assert {os.path.basename(f) for f in files} == {"LICENSE.duo-attention", "config.json", "full_attention_heads.tsv"}


def test_builtin_name_resolves_like_its_folder():
    by_name = resolve_options(parse_options({"pattern": "Mistral-7B-Instruct-v0.2"}), 32, 8).mask()
    by_path = resolve_options(parse_options({"pattern": builtin("Mistral-7B-Instruct-v0.2").path}), 32, 8).mask()
    assert np.array_equal(by_name, by_path) and by_name.sum() == 128


@pytest.mark.parametrize("name,expected", [
    ("gradientai/Llama-3-8B-Instruct-Gradient-1048k", "Llama-3-8B-Instruct-Gradient-1048k"),
    ("/models/Mistral-7B-Instruct-v0.2/", "Mistral-7B-Instruct-v0.2"),
    ("meta-llama/Llama-3.1-8B-Instruct", "Meta-Llama-3.1-8B-Instruct"),
    ("/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/abc123",
     "smollm2-135m-instruct"),
    ("/tmp/models/smollm2-135m-instruct", "smollm2-135m-instruct"),
])
def test_pick_by_name_and_shape(name, expected):
    assert pick_builtin([name], *SHAPES[expected]).name == expected


def test_pick_refuses_a_name_with_the_wrong_shape_or_an_unknown_model():
    with pytest.raises(DuoConfigError, match=r"built-in smollm2-135m-instruct has shape \(30, 3\).*\(32, 8\)"):
        pick_builtin(["HuggingFaceTB/SmolLM2-135M-Instruct"], 32, 8)
    # Llama-3-8B's layout under another name: no pattern by shape alone.
    with pytest.raises(DuoConfigError) as e:
        pick_builtin(["/tmp/llama3-layout-test"], 32, 8)
    msg = str(e.value)
    assert "no built-in pattern is made for llama3-layout-test" in msg and "vllm-duo identify" in msg
    assert all(p.name in msg for p in BUILTINS) and "\n" not in msg


def test_model_key():
    assert model_key("org/Name-7B/") == "name-7b" and model_key("Name") == "name"


def test_unknown_pattern_lists_builtins(tmp_path):
    with pytest.raises(DuoConfigError, match="not a built-in name and does not exist.*Mistral-7B-Instruct-v0.2"):
        load_gates(str(tmp_path / "nope"))
