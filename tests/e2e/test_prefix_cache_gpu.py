"""Prefix caching on (duo's default) with the window kernel: an 8-turn conversation served warm
(each turn resumes from the cache) and cold (``enable_prefix_caching=False``) (GPU).

Each turn appends 200-2,000 new tokens to the last prompt and its output. Greedy tokens of warm
and cold are reported; the claim asserted is teacher-forced: the cold engine scores warm's final
sequences with ``prompt_logprobs``, and warm's logprob of each generated token must match the
cold score within a tolerance calibrated by FLASH_ATTN warm against FLASH_ATTN cold on the same
conversations (3x its gap, at least 0.01). Control: the same warm tokens scored by an
all-streaming duo engine must be farther than the tolerance (the check sees the head pattern).
Every later turn must hit the cache (``num_cached_tokens`` >= the last turn's prompt, up to a block). Rows are
recorded with :func:`vllm_duo.eval.evidence.check`.

Models: the seeded attention-matters model (tests/e2e/reference_model.py, real safetensors
weights) and SmolLM2-135M-Instruct (real weights, context stretched to fit the conversation).
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.models import SMOLLM2, model_shape, random_mask
from tests.e2e.reference_model import make_model
from vllm_duo.eval.chat import conversations, logprob_gap
from vllm_duo.eval.engine_proc import run_job
from vllm_duo.eval.evidence import check

pytestmark = pytest.mark.gpu
TURNS, MAX_TOKENS, MAX_LEN = 8, 64, 20480
SINK, RECENT = 16, 64


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("reference")), seed=0, max_position_embeddings=MAX_LEN)


def _engine(backend: str, caching: bool, mask: list[list[int]] | None, extra: dict) -> dict:
    engine = dict(load_format="auto", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=MAX_LEN,
                  max_num_seqs=8, max_num_batched_tokens=2048, gpu_memory_utilization=0.08,
                  kv_cache_memory_bytes=4 << 30, enforce_eager=True,
                  enable_prefix_caching=caching, attention_backend=backend, seed=0, **extra)
    if backend == "duo":
        engine["additional_config"] = {"duo_attention": {"retrieval_mask": mask, "sink_size": SINK,
                                                         "recent_size": RECENT}}
    return engine


def _run(model: str, convs, engine: dict, *, logprobs: bool = False, score=None) -> dict:
    return run_job("vllm_duo.eval.chat:chat", dict(model=model, engine=engine, conversations=convs,
                                                   max_tokens=MAX_TOKENS, logprobs=logprobs, score=score),
                   timeout=1500)


def _same_tokens(a: dict, b: dict) -> float:
    pairs = [(x, y) for ca, cb in zip(a["tokens"], b["tokens"], strict=True) for x, y in zip(ca, cb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.mark.parametrize("which", ["reference", "smollm2"])
def test_warm_conversation_matches_cold(reference, which: str) -> None:
    if which == "smollm2":
        if not os.path.isdir(SMOLLM2):
            pytest.skip(f"SmolLM2 not found at {SMOLLM2} (set VLLM_DUO_SMOLLM2)")
        model, vocab, extra = SMOLLM2, (1000, 40000), {"hf_overrides": {"max_position_embeddings": MAX_LEN}}
    else:
        model, vocab, extra = reference, (3, 1000), {}
    layers, heads = model_shape(model)
    mixed, streaming = random_mask(layers, heads, 0.5), [[0] * heads for _ in range(layers)]
    convs = conversations(2, TURNS, vocab=vocab, seed=1)

    runs = {}
    for backend, mask in (("FLASH_ATTN", None), ("duo", mixed)):
        warm = _run(model, convs, _engine(backend, True, mask, extra), logprobs=True)
        cold = _run(model, convs, _engine(backend, False, mask, extra), score=warm["final"])
        runs[backend] = (warm, cold)
        hits = [c for conv in warm["cached"] for c in conv]
        print(f"{which} {backend}: warm/cold same greedy tokens {_same_tokens(warm, cold):.1%}; "
              f"cached tokens per turn {warm['cached']}")
        for conv_cached, conv_lens in zip(warm["cached"], warm["prompt_lens"], strict=True):
            # Each later turn resumes at least where the last prompt ended (up to one block).
            assert all(c >= n - 256 for c, n in zip(conv_cached[1:], conv_lens[:-1], strict=True)), hits
    tolerance = max(0.01, 3 * logprob_gap(*runs["FLASH_ATTN"]))
    warm, cold = runs["duo"]
    control = _run(model, convs, _engine("duo", False, streaming, extra), score=warm["final"])
    check(f"prefix_cache_chat_{which}", "duo warm (prefix hits) vs duo cold, teacher-forced",
          "mean |logprob gap| of generated tokens", tolerance, logprob_gap(warm, cold),
          "scored by duo all-streaming (cold)", logprob_gap(warm, control))
