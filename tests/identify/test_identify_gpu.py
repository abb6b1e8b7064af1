"""GPU checks of identification: bf16 kernels, linear memory, an 8B-shaped model at 32K, SmolLM2.

Run on the GPU machine: ``pytest -m gpu tests/identify -s`` (``-s`` shows the measured peaks).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.identify.conftest import word_tokenizer
from tests.identify.test_gating import reference
from vllm_duo.identify.gating import full_attention, streaming_attention
from vllm_duo.identify.train import IdentifySettings, identify
from vllm_duo.patterns import load_gates

pytestmark = pytest.mark.gpu
SMOLLM = "/tmp/models/smollm2-135m-instruct"


def test_bf16_cuda_attention_matches_float32_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 1000, 64, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    for out, ref in ((streaming_attention(q, k, v, 64, 256), reference(q, k, v, 64, 256)),
                     (full_attention(q, k, v), reference(q, k, v))):
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_streaming_attention_memory_is_linear_in_length():
    """32K tokens, 32 heads: an S x S score matrix alone would be 64 GiB in bf16."""
    s, h, d = 32768, 32, 128
    q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 8, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    streaming_attention(q, k, v, 128, 256).float().square().mean().backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(f"\nstreaming attention fwd+bwd, 32K x 32 heads: peak {peak:.2f} GiB above inputs")
    assert peak < 8


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 70 * 2**30,
                    reason="needs an 80 GB GPU")
def test_llama3_8b_shape_at_32k_fits_80gb(tmp_path):
    """One step on a random Llama-3-8B-shaped model (small vocab) at 32K tokens."""
    from transformers import AutoModel, LlamaConfig

    tok = word_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                      rope_theta=500000.0)
    with torch.device("cuda"):
        model = AutoModel.from_config(cfg, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    settings = IdentifySettings(steps=1, min_length=32000, max_length=32000, num_lengths=1)
    res = identify(model, tok, settings, str(tmp_path), model_name="llama3-8b-shape", progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"\n8B-shaped model, 32K tokens, one step: peak {peak:.1f} GiB, {res.elapsed_s:.1f} s")
    assert res.steps_done == 1 and peak < 75


@pytest.mark.skipif(not os.path.isdir(SMOLLM), reason=f"{SMOLLM} not present")
def test_smollm2_few_steps(tmp_path):
    from vllm_duo.identify.train import load_model

    model, tok, _ = load_model(SMOLLM)
    res = identify(model, tok, IdentifySettings(steps=5), str(tmp_path), model_name=SMOLLM)
    assert load_gates(str(tmp_path)).shape == (30, 3)
    print(f"\nSmolLM2-135M, 5 steps: {res.elapsed_s / 5:.2f} s/step (first steps include warm-up)")
