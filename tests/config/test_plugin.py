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
    """A second and third register() (vLLM calls it in every process) wraps nothing twice and
    leaves the backend and spec registrations as they were."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_duo.plugin import register

    def state():
        create = EngineArgs.create_engine_config
        return (create, getattr(create, "__wrapped__", None), AttentionBackendEnum["DUO"],
                AttentionBackendEnum.CUSTOM.get_path())

    before = state()
    register()
    register()
    assert state() == before
    assert not getattr(before[1], "_duo_wrapped", False), "create_engine_config wrapped twice"


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


def test_front_process_embeds_mask_and_keeps_prefix_caching_on(plugins_loaded, tmp_path):
    cfg = _create(_model_dir(tmp_path), {"pattern": pattern_dir("Llama-3-8B-Instruct-Gradient-1048k"),
                                         "sparsity": 0.5})
    duo = cfg.additional_config["duo_attention"]
    assert len(duo["retrieval_mask"]) == 32 and sum(map(sum, duo["retrieval_mask"])) == 128
    # vLLM's default, with the window kernel: no fallback to "rswa".
    assert cfg.cache_config.enable_prefix_caching is True
    assert duo.get("streaming_prefill", "window") == "window"


@pytest.mark.parametrize("kernel", [None, "window", "rswa"])
@pytest.mark.parametrize("caching", [True, False])
def test_explicit_prefix_caching_is_kept_with_either_kernel(plugins_loaded, tmp_path, caching, kernel):
    duo = {"pattern": "full"} if kernel is None else {"pattern": "full", "streaming_prefill": kernel}
    cfg = _create(_model_dir(tmp_path), duo, enable_prefix_caching=caching)
    assert cfg.cache_config.enable_prefix_caching is caching
    assert cfg.additional_config["duo_attention"]["streaming_prefill"] == (kernel or "window")


@pytest.mark.parametrize("duo,overrides,msg", [
    ({}, {}, "needs a head pattern and no built-in pattern is made for"),
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


def _named_model(tmp_path, name: str, config: dict) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_no_additional_config_picks_the_builtin_pattern(plugins_loaded, tmp_path, caplog):
    """`vllm serve Mistral-7B-Instruct-v0.2 --attention-backend duo` with no additional_config."""
    import logging

    from vllm.engine.arg_utils import EngineArgs

    model = _named_model(tmp_path, "Mistral-7B-Instruct-v0.2", MISTRAL_7B_V02)
    with caplog.at_level(logging.INFO, logger="vllm_duo"):
        cfg = EngineArgs(model=model, attention_backend="duo", load_format="dummy",
                         skip_tokenizer_init=True).create_engine_config()
    duo = cfg.additional_config["duo_attention"]
    assert duo["pattern"] == "Mistral-7B-Instruct-v0.2" and duo["sparsity"] == 0.5
    mask = duo["retrieval_mask"]
    assert (len(mask), len(mask[0]), sum(map(sum, mask))) == (32, 8, 128)
    assert "using the built-in pattern Mistral-7B-Instruct-v0.2" in caplog.text
    # Options without a pattern still pick it, at their sparsity.
    cfg = _create(model, {"sparsity": 0.75})
    assert sum(map(sum, cfg.additional_config["duo_attention"]["retrieval_mask"])) == 64


def test_same_layout_other_name_gets_no_pattern(plugins_loaded, tmp_path):
    """Llama-3-8B's shape under another name: the clear error, not Llama-3-8B's heads."""
    from vllm.engine.arg_utils import EngineArgs

    model = _named_model(tmp_path, "my-llama3-finetune", LLAMA3_8B)
    with pytest.raises(DuoConfigError, match="no built-in pattern is made for my-llama3-finetune.*vllm-duo identify"):
        EngineArgs(model=model, attention_backend="duo", load_format="dummy",
                   skip_tokenizer_init=True).create_engine_config()
    cfg = _create(model, {"pattern": "Llama-3-8B-Instruct-Gradient-1048k"})  # by name, explicitly
    assert sum(map(sum, cfg.additional_config["duo_attention"]["retrieval_mask"])) == 128


def test_a_prefix_cache_retention_interval_is_refused(plugins_loaded, tmp_path, monkeypatch):
    """Duo caches streaming heads' blocks densely (as full attention does), so a positive
    retention interval would be ignored: it is refused in one line, not silently dropped."""
    from vllm_duo import compat

    if compat.V033:
        with pytest.raises(DuoConfigError, match="retention interval"):
            _create(_model_dir(tmp_path), {"pattern": "full"}, prefix_cache_retention_interval=64)
    else:
        monkeypatch.setenv("VLLM_PREFIX_CACHE_RETENTION_INTERVAL", "64")
        with pytest.raises(DuoConfigError, match="retention interval"):
            _create(_model_dir(tmp_path), {"pattern": "full"})
        monkeypatch.setenv("VLLM_PREFIX_CACHE_RETENTION_INTERVAL", "0")
        assert _create(_model_dir(tmp_path), {"pattern": "full"}).cache_config.enable_prefix_caching


@pytest.mark.parametrize("dtype,kernel,msg", [
    ("fp8", None, None), ("fp8_e4m3", "window", None),
    ("fp8_e5m2", None, "KV cache dtype fp8_e5m2 .*use fp8"),
    ("fp8", "rswa", "'rswa' does not read an fp8 KV cache"),
])
def test_fp8_kv_cache(plugins_loaded, tmp_path, dtype, kernel, msg):
    """fp8 (e4m3, per-tensor scales) is served with the window kernel; other quantized caches and
    the R-SWA kernel with fp8 are refused in one line."""
    duo = {"pattern": "full"} if kernel is None else {"pattern": "full", "streaming_prefill": kernel}
    if msg is None:
        assert _create(_model_dir(tmp_path), duo, kv_cache_dtype=dtype).cache_config.cache_dtype == dtype
    else:
        with pytest.raises(DuoConfigError, match=msg):
            _create(_model_dir(tmp_path), duo, kv_cache_dtype=dtype)
