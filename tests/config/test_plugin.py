"""Registration through the real entry point, and front-process option resolution (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CPU_PLATFORM_SNIPPET, pattern_dir
from vllm_duo.errors import DuoConfigError
from vllm_duo.eval.engine_proc import LLAMA3_8B as ENGINE_LLAMA3_8B
from vllm_duo.eval.engine_proc import MISTRAL_7B_V02, QWEN2_7B

LLAMA3_8B = dict(ENGINE_LLAMA3_8B, max_position_embeddings=8192)


@pytest.fixture(scope="module")
def plugins_loaded():
    from vllm.plugins import load_general_plugins

    load_general_plugins()


def test_entry_point_registers_duo(plugins_loaded):
    from vllm.config.attention import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_duo.backend.backend import DuoAttentionBackend

    for name in ("duo", "DUO", "Duo"):
        backend = AttentionConfig(backend=name).backend
        assert backend is AttentionBackendEnum.CUSTOM
        assert backend.get_class() is DuoAttentionBackend
    assert AttentionBackendEnum["DUO"] is AttentionBackendEnum.CUSTOM


def test_register_is_idempotent(plugins_loaded):
    from vllm_duo.plugin import register

    register()
    register()


def test_engine_args_accept_duo(plugins_loaded):
    from vllm.engine.arg_utils import EngineArgs

    assert EngineArgs(model="x", attention_backend="duo").attention_backend == "duo"


def test_serve_cli_parses_duo():
    code = CPU_PLATFORM_SNIPPET + ("from vllm_duo.compat import make_arg_parser;"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser;"
            "p = make_arg_parser(FlexibleArgumentParser());"
            "a = p.parse_args(['--attention-backend', 'duo', '--additional-config',"
            " '{\"duo_attention\": {\"pattern\": \"full\"}}']);"
            "print(a.attention_backend, a.additional_config)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "duo {'duo_attention': {'pattern': 'full'}}" in out.stdout


def test_refuses_other_vllm_versions():
    from vllm_duo.plugin import check_vllm_version

    check_vllm_version("0.26.0")
    check_vllm_version("0.33.0")
    for other in ("0.27.0", "0.34.0", "0.3.3", "0.260.0"):
        with pytest.raises(DuoConfigError, match=f"supports vLLM 0.26.x and 0.33.x but vLLM {other} is"):
            check_vllm_version(other)


def _model_dir(tmp_path, **overrides):
    cfg = dict(LLAMA3_8B, **overrides)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def _create(model, duo, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=model, attention_backend="duo", load_format="dummy",
                      skip_tokenizer_init=True, additional_config={"duo_attention": duo}, **kw)
    return args.create_engine_config()


def test_front_process_embeds_mask_and_disables_prefix_caching(plugins_loaded, tmp_path):
    cfg = _create(_model_dir(tmp_path), {"pattern": pattern_dir("Llama-3-8B-Instruct-Gradient-1048k"),
                                         "sparsity": 0.5})
    duo = cfg.additional_config["duo_attention"]
    assert len(duo["retrieval_mask"]) == 32 and sum(map(sum, duo["retrieval_mask"])) == 128
    assert cfg.cache_config.enable_prefix_caching is False


def test_explicit_prefix_caching_is_kept_but_not_with_the_window_kernel(plugins_loaded, tmp_path):
    model = _model_dir(tmp_path)
    cfg = _create(model, {"pattern": "full"}, enable_prefix_caching=True)
    assert cfg.cache_config.enable_prefix_caching is True
    assert cfg.additional_config["duo_attention"]["streaming_prefill"] == "rswa"  # the default falls back
    cfg = _create(model, {"pattern": "full"}, enable_prefix_caching=False)
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.additional_config["duo_attention"]["streaming_prefill"] == "window"
    with pytest.raises(DuoConfigError, match="prefix caching cannot be combined.*streaming_prefill='rswa'"):
        _create(model, {"pattern": "full", "streaming_prefill": "window"}, enable_prefix_caching=True)


@pytest.mark.parametrize("duo,overrides,msg", [
    ({}, {}, "needs a head pattern"),
    ({"pattern": "PATTERN:Llama-2-7B-32K-Instruct"}, {}, r"\(32, 32\).*\(32, 8\)"),
    ({"pattern": "full"}, {"sliding_window": 4096, "model_type": "mistral",
                           "architectures": ["MistralForCausalLM"]}, "sliding-window"),
])
def test_front_process_refuses(plugins_loaded, tmp_path, duo, overrides, msg):
    if str(duo.get("pattern", "")).startswith("PATTERN:"):
        duo = {"pattern": pattern_dir(duo["pattern"].split(":", 1)[1])}
    with pytest.raises(DuoConfigError, match=msg):
        _create(_model_dir(tmp_path, **overrides), duo)


@pytest.mark.parametrize("config,duo,retrieval", [
    (MISTRAL_7B_V02, {"pattern": "PATTERN:Mistral-7B-Instruct-v0.2", "sparsity": 0.5}, 128),
    (QWEN2_7B, {"retrieval_mask": [[h % 2 for h in range(4)] for _ in range(28)]}, 56),
])
def test_front_process_accepts_mistral_and_qwen2(plugins_loaded, tmp_path, config, duo, retrieval):
    """The other two architectures duo serves pass the startup checks with their own shapes."""
    if str(duo.get("pattern", "")).startswith("PATTERN:"):
        duo = dict(duo, pattern=pattern_dir(duo["pattern"].split(":", 1)[1]))
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = _create(str(tmp_path), duo)
    mask = cfg.additional_config["duo_attention"]["retrieval_mask"]
    assert len(mask) == config["num_hidden_layers"] and sum(map(sum, mask)) == retrieval
