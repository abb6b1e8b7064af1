"""CPU checks of the GPU scripts' pure parts, so a GPU run is not spent on a client or parsing bug.

The HTTP client and the load benchmark run against tests/e2e/fake_server.py; the ``vllm serve``
command lines of the GPU test and the example go through vLLM's own serve parser and
``create_engine_config`` on the CPU platform.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from tests.conftest import CPU_PLATFORM_SNIPPET
from tests.e2e import models
from tests.e2e.server import (
    MODEL_NAME,
    VllmServer,
    chat,
    complete,
    free_port,
    get_text,
    parse_metrics,
    passkey_prompt,
    serve_argv,
    stream,
)

SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": True,
}


@pytest.fixture
def smollm2_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    return str(tmp_path)


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    port = free_port()
    log = str(tmp_path_factory.mktemp("fake") / "fake.log")
    argv = [sys.executable, "-m", "tests.e2e.fake_server", "--port", str(port)]
    with VllmServer(argv, port, log, startup_timeout=60) as server:
        yield server
    assert not server.alive()


def test_parse_metrics():
    text = ('# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
            'vllm:kv_cache_usage_perc{engine="0"} 0.25\nprocess_open_fds 12\n')
    m = parse_metrics(text)
    assert m == {"vllm:num_requests_running": 5.0, "vllm:kv_cache_usage_perc": 0.25, "process_open_fds": 12.0}


def test_passkey_prompt():
    p = passkey_prompt(4242, 10, 0.5)
    assert p.count("4242") == 2 and p.endswith("The pass key is")
    assert passkey_prompt(4242, 10, 0.0, question=False).endswith("What is the pass key?")
    assert p.index("4242") > passkey_prompt(4242, 10, 0.1).index("4242")


def test_random_mask_and_model_shape(smollm2_dir):
    assert models.model_shape(smollm2_dir) == (30, 3)
    mask = models.random_mask(30, 3, 0.5, seed=0)
    assert len(mask) == 30 and {len(r) for r in mask} == {3}
    assert sum(map(sum, mask)) == 45 and mask == models.random_mask(30, 3, 0.5, seed=0)


def test_find_pattern():
    from tests.conftest import PATTERNS

    assert models.find_pattern("no-such-pattern") is None
    assert models.find_pattern(models.LLAMA3_PATTERN) == os.path.join(PATTERNS, models.LLAMA3_PATTERN)
    assert os.path.isdir(models.SMOLLM2_PATTERN)  # built in: the GPU scripts never fall back to a random mask


def test_http_client_against_fake_server(fake_server):
    url = fake_server.url
    text = complete(url, "hello", 6)
    assert text.count(" w") == 6
    assert chat(url, "hello", 6) == text
    body = dict(model=MODEL_NAME, prompt="hello", max_tokens=6, temperature=0.0)
    full = stream(url, "/v1/completions", body)
    assert (full.text, full.chunks, full.done, full.disconnected) == (text, 6, True, False)
    assert stream(url, "/v1/chat/completions", dict(body, messages=[{"role": "user", "content": "hello"}])).text == text
    cut = stream(url, "/v1/completions", body, stop_after=2)
    assert cut.disconnected and not cut.done and cut.chunks == 2
    assert parse_metrics(get_text(url + "/metrics"))["vllm:num_requests_running"] >= 0


def test_server_start_failure_reports_log(tmp_path):
    argv = [sys.executable, "-c", "import sys; print('boom: pattern does not exist'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="(?s)exited with 3.*boom"):
        VllmServer(argv, free_port(), str(tmp_path / "log"), startup_timeout=30).start()


def test_server_load_logic_on_fake_server(fake_server):
    from benchmarks import server_load

    args = server_load.parse_args(["--url", fake_server.url, "--duration", "3", "--clients", "8",
                                   "--prompts", "4", "--max-tokens", "8", "--idle-timeout", "20"])
    p = server_load.run_load(fake_server.url, args, alive=fake_server.alive)
    assert p["ok"], p["checks"]
    assert p["errors"] == 0 and p["disconnects"] > 0 and p["completed"] > 0
    assert p["exact_match_rate"] == 1.0 and p["latency_p99_s"] is not None
    server_load.print_table(p)


def test_server_load_duo_config(smollm2_dir):
    from benchmarks import server_load

    args = server_load.parse_args(["--model", smollm2_dir])
    duo = server_load.duo_config(args)
    assert duo == {"pattern": server_load.SMOLLM2_PATTERN, "sparsity": 0.5}
    assert server_load.duo_config(server_load.parse_args(["--backend", "FLASH_ATTN"])) is None
    prompts = server_load.build_prompts(16, 0)
    assert len(prompts) == 16 and all(str(k) in p for p, k in prompts)


def test_serve_command_lines_parse_and_resolve(smollm2_dir):
    """The GPU test's and the example's command lines through vLLM's serve parser and
    create_engine_config (CPU platform; --load-format dummy and no tokenizer for the dry run)."""
    from examples import serve_smollm2
    from tests.e2e.test_server_gpu import COMMON

    dry = ["--load-format", "dummy", "--skip-tokenizer-init"]
    mask = models.random_mask(30, 3, 0.5, seed=0)
    example = serve_smollm2.command(*serve_smollm2.parse_args(["--model", smollm2_dir, "--"] + dry))
    argvs = [serve_argv(smollm2_dir, 8001, "duo", {"retrieval_mask": mask}, COMMON + dry),
             serve_argv(smollm2_dir, 8002, "duo", {"pattern": "full"}, COMMON + dry),
             serve_argv(smollm2_dir, 8003, "FLASH_ATTN", None, COMMON + dry), example]
    code = CPU_PLATFORM_SNIPPET + """
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli import serve
from vllm.plugins import load_general_plugins
from vllm.utils.argparse_utils import FlexibleArgumentParser
load_general_plugins()
for argv in json.loads(sys.argv[1]):
    parser = FlexibleArgumentParser()
    sub = parser.add_subparsers(dest="subparser")
    for cmd in serve.cmd_init():
        cmd.subparser_init(sub)
    args = parser.parse_args(argv[argv.index("serve"):])
    args.model = args.model_tag
    backend = str(args.attention_backend)
    if backend.upper() == "FLASH_ATTN":   # needs CUDA to resolve; parsing is what is checked
        print(json.dumps({"backend": backend, "port": args.port})); continue
    cfg = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    duo = cfg.additional_config["duo_attention"]
    print(json.dumps({"backend": backend, "port": args.port, "name": args.served_model_name,
                      "mask": duo["retrieval_mask"], "max_len": cfg.model_config.max_model_len}))
"""
    out = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True,
                         timeout=600, cwd=models.ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["port"] for r in rows] == [8001, 8002, 8003, 8000]
    assert rows[0]["mask"] == mask and rows[0]["name"] == [MODEL_NAME] and rows[0]["max_len"] == 8192
    assert sum(map(sum, rows[1]["mask"])) == 90
    assert rows[3]["name"] == ["smollm2"] and sum(map(sum, rows[3]["mask"])) == 45  # built-in pattern, 50%


def test_rank_probe_ships_by_value():
    import cloudpickle

    from tests.e2e.ray_run import rank_probe

    probe = cloudpickle.loads(cloudpickle.dumps(rank_probe()))
    ns = types.SimpleNamespace
    ctx = {"l0": ns(kv_cache=torch.zeros(2, 7, 16, 1, 8)), "x": ns(), "empty": ns(kv_cache=torch.tensor([]))}
    worker = ns(rank=1, cache_config=ns(num_gpu_blocks=7),
                vllm_config=ns(compilation_config=ns(static_forward_context=ctx,
                                                     cudagraph_mode=ns(name="FULL_AND_PIECEWISE"))))
    assert probe(worker) == {"rank": 1, "num_gpu_blocks": 7, "layout": [["l0", [2, 7, 16, 1, 8]]],
                             "cudagraph_mode": "FULL_AND_PIECEWISE"}


def test_soak_request_mix_and_budget():
    from benchmarks import soak_gpu

    reqs = soak_gpu.make_requests(400, 10, 16384, 64, 0.1, 49152, seed=0)
    assert reqs == soak_gpu.make_requests(400, 10, 16384, 64, 0.1, 49152, seed=0)
    lengths = [len(r.prompt) for r in reqs]
    assert 10 <= min(lengths) and max(lengths) <= 16384 and max(lengths) > 8000
    assert sum(r.abort_after is not None for r in reqs) == 40
    assert all(1 <= r.max_tokens <= 64 for r in reqs) and len({r.rid for r in reqs}) == 400
    assert all(100 <= t < 49052 for r in reqs for t in r.prompt)
    assert soak_gpu.full_bytes_per_token(SMOLLM2_CONFIG) == 2 * 30 * 3 * 64 * 2
    from tests.e2e.engine_run import LLAMA3_8B

    assert soak_gpu.full_bytes_per_token(LLAMA3_8B) == 128 * 1024
    args = soak_gpu.parse_args(["--requests", "10"])
    assert args.requests == 10 and args.kv_tokens * 1 > 16384 + 64  # one longest request fits FA
    full = soak_gpu.kv_budget_bytes(soak_gpu.parse_args(["--backend", "FLASH_ATTN"]), SMOLLM2_CONFIG)
    duo = soak_gpu.kv_budget_bytes(args, SMOLLM2_CONFIG)  # duo at 50 %: the retrieval heads' share
    assert full == 20000 * 2 * 30 * 3 * 64 * 2 and duo == full // 2


def test_soak_and_examples_parse_args():
    from benchmarks import soak_gpu
    from examples import ray_tp

    out = subprocess.run([sys.executable, "benchmarks/soak_gpu.py", "--dry-run", "--requests", "50"],
                         capture_output=True, text=True, timeout=120, cwd=models.ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["requests"] == 50
    duo = soak_gpu.duo_config(soak_gpu.parse_args([]), SMOLLM2_CONFIG)
    assert duo == {"pattern": models.SMOLLM2_PATTERN, "sparsity": 0.5}
    a = ray_tp.parse_args([])
    assert (a.tp, a.pp, a.sparsity) == (2, 1, 0.5)


class _FakeEngine:
    """LLMEngine's add/step/abort surface: one token per step for every live request."""

    def __init__(self):
        self.left: dict[str, int] = {}

    def add_request(self, rid, prompt, params):
        self.left[rid] = params.max_tokens

    def step(self):
        outs = []
        for rid in list(self.left):
            self.left[rid] -= 1
            outs.append(types.SimpleNamespace(request_id=rid, finished=self.left[rid] == 0,
                                              outputs=[types.SimpleNamespace(token_ids=[7])]))
            if self.left[rid] == 0:
                del self.left[rid]
        return outs

    def abort_request(self, ids):
        for rid in ids:
            self.left.pop(rid, None)


def test_soak_drive_loop_accounts_for_every_request():
    from benchmarks import soak_gpu

    reqs = soak_gpu.make_requests(60, 10, 100, 64, 0.3, 1000, seed=1)
    engine = _FakeEngine()
    run = soak_gpu.drive(types.SimpleNamespace(llm_engine=engine), reqs, inflight=8, time_limit=60)
    assert len(run["status"]) == 60 and not engine.left
    for r in reqs:
        status = run["status"][r.rid]
        if r.abort_after is None:
            assert status == "finished" and run["tokens"][r.rid] == [7] * r.max_tokens
        elif r.abort_after < r.max_tokens:  # one token per step here, so it was still decoding
            assert status.startswith("aborted")
    assert soak_gpu.drive(types.SimpleNamespace(llm_engine=_FakeEngine()), reqs, 8, time_limit=-1)["status"] \
        == {r.rid: "not_run" for r in reqs}


def test_soak_block_pool_probes_on_real_scheduler(tmp_path):
    """kv_state / count_preemptions / settle against vLLM's real Scheduler and KV-cache manager
    with duo specs: the attribute paths the GPU soak reads, and a pool that comes back whole."""
    from vllm.config import ModelConfig
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager

    from benchmarks import soak_gpu
    from tests.block_manager.conftest import (
        BLOCK,
        LLAMA3_8B,
        duo_specs,
        kv_cache_config,
        make_request,
        make_vllm_config,
        random_mask,
    )
    from vllm_duo.block_manager import register_duo_kv_cache_spec

    register_duo_kv_cache_spec()
    init_none_hash(sha256)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    model_config = ModelConfig(model=str(tmp_path), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096)
    config = make_vllm_config(model_config, max_model_len=4096, max_num_batched_tokens=512, max_num_seqs=4)
    cfg = kv_cache_config(config, duo_specs(random_mask(2), 1024), num_blocks=400)
    config.cache_config.num_gpu_blocks = cfg.num_blocks
    sched = Scheduler(vllm_config=config, kv_cache_config=cfg, block_size=BLOCK,
                      structured_output_manager=StructuredOutputManager(config))

    def step():
        out = sched.schedule()
        ids = list(out.num_scheduled_tokens)
        sampled = [[] if sched.requests[i].is_prefill_chunk else [7] for i in ids]
        sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)}, sampled_token_ids=sampled))

    llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(
        engine_core=types.SimpleNamespace(engine_core=types.SimpleNamespace(scheduler=sched)), step=step))
    before = soak_gpu.kv_state(llm)
    assert before["free_blocks"] == before["num_gpu_blocks"] - 1
    preemptions = soak_gpu.count_preemptions(llm)
    for i, (p, d) in enumerate([(2000, 1800), (1700, 2000), (2300, 1200), (1200, 500), (900, 50)]):
        sched.add_request(make_request(f"r{i}", p, d, seed=i))
    for _ in range(40):
        step()
    busy = soak_gpu.kv_state(llm)
    assert busy["free_blocks"] < before["free_blocks"] and busy["requests_holding_blocks"] > 0
    sched.finish_requests(["r1"], RequestStatus.FINISHED_ABORTED)
    soak_gpu.settle(llm, max_steps=20000)
    assert soak_gpu.kv_state(llm) == before
    assert preemptions[0] > 0


def test_llama3_layout_takes_the_llama3_pattern(tmp_path):
    """The Ray test's and soak's seeded model resolves the real Llama-3-8B pattern (32 x 8)."""
    pattern = models.find_pattern(models.LLAMA3_PATTERN)
    from transformers import LlamaConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from tests.e2e.reference_model import TINY_LLAMA

    LlamaConfig(**dict(TINY_LLAMA, **models.LLAMA3_LAYOUT)).save_pretrained(tmp_path)
    load_general_plugins()
    cfg = EngineArgs(model=str(tmp_path), attention_backend="duo", load_format="dummy", skip_tokenizer_init=True,
                     max_model_len=16384, additional_config={"duo_attention": {"pattern": pattern, "sparsity": 0.5}}
                     ).create_engine_config()
    mask = cfg.additional_config["duo_attention"]["retrieval_mask"]
    assert (len(mask), len(mask[0]), sum(map(sum, mask))) == (32, 8, 128)


def test_device_run_stages_match_the_docs():
    """benchmarks/device_run.sh's stages are the ones docs/gpu-runs.md lists, and each names a file that exists."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = open(os.path.join(root, "benchmarks", "device_run.sh")).read()
    stages = re.findall(r"^    ([a-z0-9-]+)\) ", script, flags=re.M)
    readme = " ".join(open(os.path.join(root, "docs", "gpu-runs.md")).read().split())
    listed = re.search(r"device_run\.sh STAGE…` \(([^)]*)\)", readme).group(1)
    assert stages == [s.strip() for s in listed.split(",")]
    for path in re.findall(r"\b((?:tests|benchmarks)/[\w/]+\.py)", script):
        assert os.path.exists(os.path.join(root, path)), path


def test_niah_hf_names_a_missing_model(tmp_path):
    """benchmarks/niah_hf.py: a wrong --model path is one clear line, not a transformers traceback."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "niah_hf.py"), "--model",
                        str(tmp_path / "absent")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no model folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv,needs", [
    (["-m", "vllm_duo.cli.main", "bench"], "vllm-duo bench: error: needs an NVIDIA GPU"),
    (["-m", "vllm_duo.cli.main", "niah", "--model", "/no/such/model"], "vllm-duo niah: error: needs an NVIDIA GPU"),
    (["examples/offline_dummy.py"], "offline_dummy.py: error: needs an NVIDIA GPU"),
    (["examples/serve_smollm2.py", "--model", "/no/such/model"], "serve_smollm2.py: error: needs an NVIDIA GPU"),
    (["examples/ray_tp.py"], "ray_tp.py: error: needs 2 NVIDIA GPUs"),
])
def test_gpu_only_tools_say_so_in_one_line(argv, needs):
    """No GPU visible: one line on stderr, exit code 2, no vLLM traceback."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=models.ROOT)
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=models.ROOT,
                       env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needs in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_gpu_tools_check_the_model_folder(monkeypatch, tmp_path, capsys):
    """With a GPU, a missing model folder is the one line (before any engine starts)."""
    from vllm_duo.cli import needs
    from vllm_duo.cli.main import main

    monkeypatch.setattr(needs, "cuda_devices", lambda: 1)
    assert main(["niah", "--model", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        needs.preflight("serve_smollm2.py", model_dir=str(tmp_path / "empty"))
    assert e.value.code == 2 and "has no config.json" in capsys.readouterr().err


def test_teacher_forced_duo_scorers_prefill_with_the_decode_window() -> None:
    """GPU tests that score duo's generated tokens by teacher forcing (a prefill) must prefill
    streaming heads with the decode window: with the default prefill window (8,192) their prompts
    prefill densely, duo scores like FLASH_ATTN, and the test and its control cannot fail (the
    Ray tests did so until 2026-12-01)."""
    from tests.e2e import test_cudagraph_gpu, test_ray_gpu
    from vllm_duo.options import parse_options

    engines = {"ray": test_ray_gpu.BACKENDS["duo"], "cudagraph": test_cudagraph_gpu._engine("duo")}
    for name, engine in engines.items():
        opts = parse_options(engine["additional_config"]["duo_attention"])
        assert opts.prefill_window == opts.recent_size, (name, opts)
