"""The float32 reference model (tests/e2e/reference_model.py) against transformers on CPU.

All-retrieval must equal LlamaForCausalLM; all-streaming must equal LlamaForCausalLM given the
sink + window mask as a 4D attention mask (the same for every head, which the reference applies
per KV head). The GPU test then holds vLLM's duo backend to this reference.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.e2e.reference_model import TINY_LLAMA, allowed_keys, forward_logprobs, load, make_model

L, H = TINY_LLAMA["num_hidden_layers"], TINY_LLAMA["num_key_value_heads"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_model(str(tmp_path_factory.mktemp("tiny_llama")), seed=0)
    from transformers import LlamaForCausalLM

    return load(path), LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _tokens(n: int) -> list[int]:
    rng = random.Random(n)
    return [rng.randrange(3, TINY_LLAMA["vocab_size"]) for _ in range(n)]


def _hf(model, tokens: list[int], mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), attention_mask=mask).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_all_retrieval_equals_transformers(tiny) -> None:
    (config, weights), model = tiny
    tokens = _tokens(200)
    ref = forward_logprobs(config, weights, tokens, [[1] * H] * L, sink=16, windows=64)
    torch.testing.assert_close(ref, _hf(model, tokens), atol=1e-4, rtol=0)


def test_all_streaming_equals_transformers_with_mask(tiny) -> None:
    (config, weights), model = tiny
    tokens = _tokens(150)
    windows = torch.full((150,), 40)
    mask = allowed_keys(150, windows, 8, "cpu")[None, None]
    ref = forward_logprobs(config, weights, tokens, [[0] * H] * L, sink=8, windows=windows)
    torch.testing.assert_close(ref, _hf(model, tokens, mask), atol=1e-4, rtol=0)


def test_streaming_sees_everything_when_short(tiny) -> None:
    """Prompts no longer than sink + window: streaming heads equal retrieval heads."""
    (config, weights), _ = tiny
    tokens = _tokens(80)
    mixed = forward_logprobs(config, weights, tokens, [[1, 0], [0, 1], [0, 0], [1, 1]], 16, 64)
    full = forward_logprobs(config, weights, tokens, [[1] * H] * L, 16, 64)
    torch.testing.assert_close(mixed, full, atol=1e-5, rtol=0)
    assert not torch.allclose(
        forward_logprobs(config, weights, _tokens(200), [[0] * H] * L, 16, 64),
        forward_logprobs(config, weights, _tokens(200), [[1] * H] * L, 16, 64), atol=1e-2)
