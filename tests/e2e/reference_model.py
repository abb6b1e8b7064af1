"""A tiny Llama with seeded weights on disk, and a float32 plain-PyTorch forward of DuoAttention.

The forward reads the safetensors itself (no transformers code): RMSNorm, rotary embeddings
(Llama's default, non-interleaved), GQA attention where each KV head is a retrieval head (every
key p <= t) or a streaming head (keys p < sink or t - W < p <= t), and a SwiGLU MLP. It is the
semantics vLLM's duo backend must reproduce (tests/e2e/test_reference_gpu.py); with an
all-retrieval mask it must equal transformers' LlamaForCausalLM (test_reference_model_cpu.py).
"""

from __future__ import annotations

import json
import os

import torch

TINY_LLAMA = dict(
    vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2,
)
# Weight scales (std) that make attention matter: peaked scores, head outputs comparable to the
# residual stream, logits spread over a few units. Substring of the parameter name -> std.
# Measured on CPU (600 tokens, mask [[1,0],[0,1],[0,0],[1,1]], sink 16, window 64): bf16 vs
# float32 top-5 logprob error mean 0.015 / max 0.07; window or sink off by one moves them by 0.1
# on average; all-retrieval instead of the mask by 1.6.
WEIGHT_STD = {"embed_tokens": 0.5, "q_proj": 0.07, "k_proj": 0.07, "v_proj": 0.1, "o_proj": 0.1,
              "mlp": 0.06, "lm_head": 0.1}


def make_model(path: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides) -> str:
    """Save a seeded tiny Llama (config.json + model.safetensors) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**dict(TINY_LLAMA, **overrides))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                continue
            std = next(s for key, s in WEIGHT_STD.items() if key in name)
            p.copy_(std * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    return path


def load(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    weights = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(path, name)))
    return config, {k: v.float() for k, v in weights.items()}


def rope_theta(config: dict) -> float:
    """transformers 5 writes ``rope_parameters``; older configs a top-level ``rope_theta``."""
    params = config.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"reference supports only default rope, got {params}")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotate-half rotary embedding; x [T, H, d], cos/sin [T, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def allowed_keys(T: int, windows: torch.Tensor, sink: int, device) -> torch.Tensor:
    """bool [T, T]: streaming mask, query t sees p < sink or t - windows[t] < p <= t."""
    t = torch.arange(T, device=device)[:, None]
    p = torch.arange(T, device=device)[None, :]
    return (p <= t) & ((p < sink) | (p > t - windows[:, None]))


def forward_logprobs(config: dict, weights: dict[str, torch.Tensor], tokens: list[int],
                     retrieval_mask: list[list[int]], sink: int, windows: torch.Tensor | int,
                     device: str = "cpu") -> torch.Tensor:
    """float32 log-softmax [T, vocab] of the model over ``tokens`` (positions 0..T-1).

    ``retrieval_mask[layer][kv_head]`` 1 = retrieval; ``windows``: the streaming window of each
    query position (an int for all).
    """
    w = {k: v.to(device) for k, v in weights.items()}
    H, Hkv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or config["hidden_size"] // H
    eps = config["rms_norm_eps"]
    T = len(tokens)
    if isinstance(windows, int):
        windows = torch.full((T,), windows)
    inv_freq = 1.0 / rope_theta(config) ** (torch.arange(0, d, 2, device=device).float() / d)
    angles = torch.arange(T, device=device).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    causal = allowed_keys(T, torch.full((T,), T + 1, device=device), 0, device)
    streaming = allowed_keys(T, windows.to(device), sink, device)

    x = w["model.embed_tokens.weight"][torch.tensor(tokens, device=device)]
    for layer in range(config["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        h = _rms_norm(x, w[pre + "input_layernorm.weight"], eps)
        q = (h @ w[pre + "self_attn.q_proj.weight"].T).view(T, H, d)
        k = (h @ w[pre + "self_attn.k_proj.weight"].T).view(T, Hkv, d)
        v = (h @ w[pre + "self_attn.v_proj.weight"].T).view(T, Hkv, d)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        kv_head = torch.arange(H, device=device) // (H // Hkv)
        masks = torch.stack([causal if retrieval_mask[layer][g] else streaming
                             for g in kv_head.tolist()])  # [H, T, T]
        scores = torch.einsum("thd,shd->hts", q, k[:, kv_head]) * d ** -0.5
        probs = torch.softmax(scores.masked_fill(~masks, float("-inf")), dim=-1)
        attn = torch.einsum("hts,shd->thd", probs, v[:, kv_head]).reshape(T, H * d)
        x = x + attn @ w[pre + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[pre + "post_attention_layernorm.weight"], eps)
        gate = h @ w[pre + "mlp.gate_proj.weight"].T
        up = h @ w[pre + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[pre + "mlp.down_proj.weight"].T
    x = _rms_norm(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return torch.log_softmax(x @ head.T, dim=-1)
