"""End to end through ``LLM`` on a GPU: duo against vLLM's own FLASH_ATTN (marked gpu)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.e2e.engine_run import LLAMA3_8B, run_engine, write_model
from vllm_duo.eval.engine_proc import MISTRAL_7B_V02, QWEN2_7B

pytestmark = pytest.mark.gpu
DUO_FULL = {"attention_backend": "duo", "additional_config": {"duo_attention": {"pattern": "full"}}}


def _prompts(lengths: list[int], seed: int = 0, vocab: int = 100000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab) for _ in range(n)] for n in lengths]


def _engine(**kw):
    base = dict(max_model_len=20000, gpu_memory_utilization=0.85, max_num_seqs=32)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return write_model(str(tmp_path_factory.mktemp("llama3_8b")), LLAMA3_8B)


def _match(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def test_all_retrieval_equals_flash_attn(llama3):
    """pattern='full': greedy tokens identical to FLASH_ATTN, 16 prompts of 100..16K tokens."""
    prompts = _prompts([100, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000, 9000,
                        10000, 12000, 14000, 16000])
    spec = dict(model=llama3, prompts=prompts, max_tokens=64)
    fa = run_engine(dict(spec, engine=_engine(attention_backend="FLASH_ATTN")))
    duo = run_engine(dict(spec, engine=_engine(**DUO_FULL)))
    assert _match(fa["tokens"], duo["tokens"]) == 1.0


def test_chunk_invariance_mixed_pattern(llama3):
    """The same prompts under chunk budgets 256 and 8192 give identical greedy tokens."""
    mask = np.random.RandomState(0).randint(0, 2, (32, 8)).tolist()
    mixed = {"attention_backend": "duo", "additional_config": {"duo_attention": {"retrieval_mask": mask}}}
    prompts = _prompts([300, 700, 1500, 3000], seed=1)
    spec = dict(model=llama3, prompts=prompts, max_tokens=32)
    a = run_engine(dict(spec, engine=_engine(max_num_batched_tokens=256, **mixed)))
    b = run_engine(dict(spec, engine=_engine(max_num_batched_tokens=8192, **mixed)))
    assert a["tokens"] == b["tokens"]


def test_window_kernel_equals_rswa(llama3):
    """streaming_prefill='window' (O(sink + window)) gives the greedy tokens of 'rswa', chunked
    at 256 and 8192 (long prompts: the windows lie far behind the sink)."""
    mask = np.random.RandomState(1).randint(0, 2, (32, 8)).tolist()
    prompts = _prompts([300, 2000, 9000, 16000], seed=5)
    spec = dict(model=llama3, prompts=prompts, max_tokens=32)
    runs = [run_engine(dict(spec, engine=_engine(
        max_num_batched_tokens=budget, attention_backend="duo", additional_config={"duo_attention": {
            "retrieval_mask": mask, "streaming_prefill": kernel}})))["tokens"]
        for kernel, budget in (("rswa", 8192), ("window", 8192), ("window", 256))]
    assert runs[0] == runs[1] == runs[2]


def test_all_streaming_short_prompts_equal_full(llama3):
    """Prompts shorter than sink + recent: all-streaming equals full attention."""
    prompts = _prompts([50, 120, 200, 250], seed=2)
    spec = dict(model=llama3, prompts=prompts, max_tokens=16)  # 250 + 16 < 64 + 256
    full = run_engine(dict(spec, engine=_engine(**DUO_FULL)))
    stream = run_engine(dict(spec, engine=_engine(
        attention_backend="duo", additional_config={"duo_attention": {"pattern": "streaming"}})))
    assert full["tokens"] == stream["tokens"]


def test_model_runner_v1(llama3, monkeypatch):
    """vLLM's V1 model runner (V2 is the default for Llama): pattern='full' equals FLASH_ATTN,
    and a mixed pattern runs through chunked prefill and decode."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    prompts = _prompts([100, 900, 3000, 6000], seed=3)
    spec = dict(model=llama3, prompts=prompts, max_tokens=32)
    fa = run_engine(dict(spec, engine=_engine(attention_backend="FLASH_ATTN")))
    duo = run_engine(dict(spec, engine=_engine(**DUO_FULL)))
    assert _match(fa["tokens"], duo["tokens"]) == 1.0
    mask = [[(layer + head) % 2 for head in range(8)] for layer in range(32)]
    mixed = run_engine(dict(spec, engine=_engine(
        max_num_batched_tokens=1024, attention_backend="duo",
        additional_config={"duo_attention": {"retrieval_mask": mask}})))
    assert [len(t) for t in mixed["tokens"]] == [32] * len(prompts)


OTHER_MODELS = {
    "mistral": (MISTRAL_7B_V02, [[(layer + head) % 2 for head in range(8)] for layer in range(32)]),
    "qwen2": (QWEN2_7B, [[(layer + head) % 2 for head in range(4)] for layer in range(28)]),
}


def _other_model_spec(tmp_path, name: str) -> dict:
    config = OTHER_MODELS[name][0]
    model = write_model(str(tmp_path / name), config)
    prompts = _prompts([100, 700, 2500, 6000], seed=4, vocab=config["vocab_size"])
    return dict(model=model, prompts=prompts, max_tokens=32)


@pytest.mark.parametrize("name", list(OTHER_MODELS))
def test_other_model_full_equals_flash_attn(tmp_path, name):
    """Mistral and Qwen2 at their 7B shapes: pattern='full' equals FLASH_ATTN."""
    spec = _other_model_spec(tmp_path, name)
    fa = run_engine(dict(spec, engine=_engine(attention_backend="FLASH_ATTN")))
    duo = run_engine(dict(spec, engine=_engine(**DUO_FULL)))
    assert _match(fa["tokens"], duo["tokens"]) == 1.0


@pytest.mark.parametrize("name", list(OTHER_MODELS))
def test_other_model_chunk_invariance(tmp_path, name):
    """Mistral and Qwen2: a mixed mask gives identical tokens under chunk budgets 256 and 8192."""
    spec = _other_model_spec(tmp_path, name)
    mixed = {"attention_backend": "duo", "additional_config": {"duo_attention": {
        "retrieval_mask": OTHER_MODELS[name][1]}}}
    a = run_engine(dict(spec, engine=_engine(max_num_batched_tokens=256, **mixed)))
    b = run_engine(dict(spec, engine=_engine(max_num_batched_tokens=8192, **mixed)))
    assert a["tokens"] == b["tokens"]
