"""DuoAttention semantics in a transformers model (vllm_duo/eval/hf_duo.py) against the float32
plain-PyTorch reference (tests/e2e/reference_model.py), prompt and cached decode, on CPU."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.e2e.reference_model import TINY_LLAMA, forward_logprobs, load, make_model
from vllm_duo.errors import DuoConfigError
from vllm_duo.eval.hf_duo import DuoSemantics

MASK = np.array([[1, 0], [0, 1], [0, 0], [1, 1]])
SINK, RECENT, STEPS = 16, 64, 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_model(str(tmp_path_factory.mktemp("tiny_llama")), seed=0, dtype=torch.float32)
    return path, load(path)


def _model(path: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("mask", [MASK, np.zeros_like(MASK), np.ones_like(MASK)], ids=["mixed", "streaming", "full"])
def test_generation_matches_reference(tiny, mask) -> None:
    """Greedy generation with the KV cache: every step's logprobs equal the reference run on the
    prompt plus the generated tokens (teacher forced), which has no cache at all."""
    path, (config, weights) = tiny
    model = _model(path)
    DuoSemantics(mask, SINK, RECENT).install(model)
    rng = random.Random(1)
    prompt = [rng.randrange(3, TINY_LLAMA["vocab_size"]) for _ in range(300)]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, min_new_tokens=STEPS,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    got = torch.stack([torch.log_softmax(s[0].float(), -1) for s in out.logits])
    ref = forward_logprobs(config, weights, prompt + tokens[:-1], mask.tolist(), SINK, RECENT)[len(prompt) - 1:]
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)


def test_mixed_differs_from_full(tiny) -> None:
    """The mask is really applied: a prompt far longer than sink + recent changes the logits."""
    path, (config, weights) = tiny
    rng = random.Random(2)
    tokens = [rng.randrange(3, TINY_LLAMA["vocab_size"]) for _ in range(300)]
    full, mixed = _model(path), _model(path)
    DuoSemantics(MASK, SINK, RECENT).install(mixed)
    with torch.no_grad():
        a, b = (m(torch.tensor([tokens])).logits[0, -1] for m in (full, mixed))
    assert (a - b).abs().max() > 0.1


def test_refuses_a_mask_for_another_model(tiny) -> None:
    path, _ = tiny
    with pytest.raises(DuoConfigError, match=r"shape \(3, 2\).*LlamaForCausalLM has \(4, 2\)"):
        DuoSemantics(np.ones((3, 2)), SINK, RECENT).install(_model(path))
