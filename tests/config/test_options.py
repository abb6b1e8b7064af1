"""duo_attention options: parsing, defaults, validation messages, resolution (CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import pattern_dir
from vllm_duo.errors import DuoConfigError
from vllm_duo.options import parse_options, resolve_options


def test_defaults_follow_the_paper():
    """Sink 64 and recent 256 (the paper's deployment); prompts prefill densely up to 8192 tokens
    past the sink, as the reference does below its 32K chunk."""
    o = parse_options({"pattern": "full"})
    assert (o.sink_size, o.recent_size, o.prefill_window) == (64, 256, 8192)
    assert parse_options({"pattern": "full", "recent_size": 10000}).prefill_window == 10000
    assert parse_options({"pattern": "full", "prefill_recent_size": 4096}).prefill_window == 4096
    assert o.streaming_prefill == "window"
    assert parse_options({"pattern": "full", "streaming_prefill": "rswa"}).streaming_prefill == "rswa"


def test_no_pattern_picks_the_builtin_by_model_name_and_shape():
    for raw in (None, {}, {"sparsity": 0.5}):
        opts = resolve_options(parse_options(raw), 30, 3, model="/tmp/models/smollm2-135m-instruct")
        # the built-in's calibrated 0.75 (measured with the default windows) unless a sparsity is given
        assert opts.pattern == "smollm2-135m-instruct" and opts.mask().sum() == (45 if raw else 23)
        # never silently: a model with no built-in pattern is refused, naming how to give one
        with pytest.raises(DuoConfigError, match="needs a head pattern.*--additional-config.*vllm-duo identify"):
            resolve_options(parse_options(raw), 30, 3, model="/models/other-135m")


@pytest.mark.parametrize("raw,msg", [
    ({"pattern": "full", "sparsity": 1.5}, r"in \[0, 1\]"),
    ({"pattern": "full", "sparsity": -0.1}, r"in \[0, 1\]"),
    ({"pattern": "full", "sparsity": float("nan")}, "must be a number"),
    ({"pattern": "full", "sparsity": "half"}, "must be a number"),
    ({"pattern": "full", "sink_size": -1}, "between 0 and"),
    ({"pattern": "full", "sink_size": 3.5}, "whole number"),
    ({"pattern": "full", "recent_size": 0}, "between 1 and"),
    ({"pattern": "full", "recent_size": True}, "whole number"),
    ({"pattern": "full", "recent_size": 10**12}, "between 1 and"),
    ({"pattern": "full", "prefill_recent_size": 8}, "must be >= recent_size"),
    ({"pattern": "full", "sparsity": 0.5, "threshold": 0.5}, "not both"),
    ({"pattern": "full", "sparsity_typo": 0.5}, "unknown duo_attention option"),
    ({"pattern": 3}, "must be a built-in name.*a path"),
    ({"pattern": "full", "seed": -1}, "seed"),
    ({"pattern": "full", "streaming_prefill": "fast"}, "streaming_prefill must be one of 'window', 'rswa'"),
    ("pattern=full", "must be a JSON object"),
    ({"retrieval_mask": [[1, 0], [1]]}, "ragged"),
    ({"retrieval_mask": [[1, 2]]}, "0 \\(streaming\\) or 1"),
])
def test_bad_options(raw, msg):
    with pytest.raises(DuoConfigError, match=msg):
        parse_options(raw)


def test_resolve_full_streaming_and_file():
    assert resolve_options(parse_options({"pattern": "full"}), 4, 2).mask().all()
    assert not resolve_options(parse_options({"pattern": "streaming"}), 4, 2).mask().any()
    o = resolve_options(parse_options({"pattern": pattern_dir("Llama-3-8B-Instruct-Gradient-1048k"),
                                       "sparsity": 0.75}), 32, 8)
    assert o.mask().sum() == 64
    # the resolved options round-trip through the config dict (what workers receive)
    again = parse_options(o.to_dict())
    assert again.resolved and np.array_equal(again.mask(), o.mask())


def test_resolve_defaults_sparsity_half():
    o = resolve_options(parse_options({"pattern": pattern_dir("Llama-3-8B-Instruct-Gradient-1048k")}), 32, 8)
    assert o.sparsity == 0.5 and o.mask().sum() == 128


def test_pattern_for_another_model():
    with pytest.raises(DuoConfigError, match=r"\(32, 32\).*\(32, 8\)"):
        resolve_options(parse_options({"pattern": pattern_dir("Llama-2-7B-32K-Instruct")}), 32, 8)


def test_calibrated_sparsity_is_used_when_none_is_given(tmp_path, caplog):
    """A pattern whose config.json carries vllm-duo calibrate's choice: that sparsity unless the
    user sets one (or a threshold); one log line says where it came from."""
    import json
    import logging
    import shutil

    from vllm_duo.builtin_patterns import builtin

    folder = tmp_path / "p"
    shutil.copytree(builtin("smollm2-135m-instruct").path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    measured = {"suite": {"sink": 64, "recent": 256}}  # the default windows
    (folder / "config.json").write_text(json.dumps(dict(cfg, calibrated_sparsity=0.75, calibration=measured)))
    with caplog.at_level(logging.INFO, logger="vllm_duo"):
        opts = resolve_options(parse_options({"pattern": str(folder)}), 30, 3)
    explicit = resolve_options(parse_options({"pattern": str(folder), "sparsity": 0.75}), 30, 3)
    assert opts.sparsity == 0.75 and (opts.mask() == explicit.mask()).all() and opts.mask().sum() < 45
    assert "calibration" in caplog.text
    assert resolve_options(parse_options({"pattern": str(folder), "sparsity": 0.25}), 30, 3).sparsity == 0.25
    assert resolve_options(parse_options({"pattern": str(folder), "threshold": 0.5}), 30, 3).sparsity is None
    (folder / "config.json").write_text(json.dumps(dict(cfg, calibrated_sparsity=None)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vllm_duo"):  # calibrated, nothing within tolerance
        assert resolve_options(parse_options({"pattern": str(folder)}), 30, 3).sparsity == 0.5  # the default
    assert "found no sparsity within its tolerance" in caplog.text
    del cfg["calibrated_sparsity"], cfg["calibration"]
    (folder / "config.json").write_text(json.dumps(cfg))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vllm_duo"):  # never calibrated: the default, quietly
        assert resolve_options(parse_options({"pattern": str(folder)}), 30, 3).sparsity == 0.5
    assert "calibrat" not in caplog.text


def test_calibration_applies_only_to_engines_that_see_as_much(tmp_path, caplog):
    """A sparsity calibrated with a wider prefill window (or sink, or recent) than the engine's is
    not used: the default applies, and one warning names the windows."""
    import json
    import logging
    import shutil

    from vllm_duo.builtin_patterns import builtin

    folder = tmp_path / "p"
    shutil.copytree(builtin("smollm2-135m-instruct").path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    suite = {"sink": 64, "recent": 256, "prefill_recent": 8192}
    cfg.update(calibrated_sparsity=0.75, calibration={"suite": suite})
    (folder / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, logger="vllm_duo"):
        assert resolve_options(parse_options({"pattern": str(folder), "prefill_recent_size": 256}), 30, 3).sparsity \
            == 0.5
    assert "prefill_window=8192" in caplog.text and "prefill_window=256" in caplog.text
    wide = {"pattern": str(folder)}  # the default prefill window
    assert resolve_options(parse_options(wide), 30, 3).sparsity == 0.75
    assert resolve_options(parse_options(dict(wide, sink_size=32)), 30, 3).sparsity == 0.5
    suite["prefill_recent"] = None  # measured with prefill window = recent: any engine's windows do
    (folder / "config.json").write_text(json.dumps(cfg))
    assert resolve_options(parse_options({"pattern": str(folder), "prefill_recent_size": 256}), 30, 3).sparsity \
        == 0.75


def test_prefill_window_as_each_runner_applies_it():
    from vllm_duo.options import prefill_window

    assert prefill_window(256, None) == parse_options({"pattern": "full"}).prefill_window
    assert prefill_window(256, 8192) == 8192
    assert prefill_window(256, 8192, runner="hf") == 256


def test_startup_line_says_why_vllms_concurrency_undercounts_a_wide_prefill_window() -> None:
    """The default (prefill window 8192 > recent 256) explains vLLM's lower "Maximum concurrency";
    equal windows (the figure is then right) add nothing."""
    from vllm_duo.engine_config import concurrency_note

    note = concurrency_note(resolve_options(parse_options({"pattern": "full"}), 2, 2))
    assert "Maximum concurrency" in note and "8192" in note and '"prefill_recent_size": 256' in note
    assert concurrency_note(resolve_options(parse_options({"pattern": "full", "prefill_recent_size": 256}), 2, 2)) == ""
