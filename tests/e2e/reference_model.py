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
# The attention layouts of the 7B/8B models duo serves (heads, KV heads, head_dim, rope kept),
# with 2 layers, a narrow MLP and a 32K vocabulary so an engine starts in seconds.
_SMALL = dict(num_hidden_layers=2, intermediate_size=1024, vocab_size=32000, rms_norm_eps=1e-5,
              max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LAYOUTS = {
    "llama3": dict(_SMALL, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, rope_theta=500000.0),
    "llama2_mha": dict(_SMALL, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=128, rope_theta=10000.0),
    "mistral": dict(_SMALL, model_type="mistral", hidden_size=4096, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, rope_theta=1e6, sliding_window=None),
    "qwen2": dict(_SMALL, model_type="qwen2", hidden_size=3584, num_attention_heads=28,
                  num_key_value_heads=4, head_dim=128, rope_theta=1e6, sliding_window=None,
                  use_sliding_window=False),
}
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Weight scales (std at hidden size 256; projections scale by sqrt(256 / hidden)) that make
# attention matter: peaked scores, head outputs comparable to the residual stream, logits spread
# over a few units. Measured on the tiny model on CPU (600 tokens, mask [[1,0],[0,1],[0,0],[1,1]],
# sink 16, window 64): bf16 vs float32 top-5 logprob error mean 0.015 / max 0.07; window or sink
# off by one moves them by 0.1 on average; all-retrieval instead of the mask by 1.6.
# (load_format="dummy" instead draws every weight, norms too, from U(+-1e-3): attention then
# changes no greedy token.)
WEIGHT_STD = {"embed_tokens": 0.5, "q_proj": 0.07, "k_proj": 0.07, "v_proj": 0.1, "o_proj": 0.1,
              "mlp": 0.06, "lm_head": 0.1}


def model_config(**overrides) -> dict:
    """A HF config.json dict: the tiny Llama, or a layout from :data:`LAYOUTS` via overrides."""
    config = dict(TINY_LLAMA, **overrides)
    config.setdefault("model_type", "llama")
    config.update(architectures=[_ARCH[config["model_type"]]], torch_dtype="bfloat16",
                  hidden_act="silu")
    return config


def _shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of a Llama/Mistral/Qwen2 decoder (Qwen2 has q/k/v biases)."""
    hid, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (vocab, hid), "model.norm.weight": (hid,),
              "lm_head.weight": (vocab, hid)}
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes.update({pre + "input_layernorm.weight": (hid,),
                       pre + "post_attention_layernorm.weight": (hid,),
                       pre + "self_attn.q_proj.weight": (q, hid), pre + "self_attn.k_proj.weight": (kv, hid),
                       pre + "self_attn.v_proj.weight": (kv, hid), pre + "self_attn.o_proj.weight": (hid, q),
                       pre + "mlp.gate_proj.weight": (inter, hid), pre + "mlp.up_proj.weight": (inter, hid),
                       pre + "mlp.down_proj.weight": (hid, inter)})
        if config["model_type"] == "qwen2":
            shapes.update({pre + f"self_attn.{p}_proj.bias": (n,) for p, n in (("q", q), ("k", kv), ("v", kv))})
    return shapes


def make_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded float32 weights at the scales of :data:`WEIGHT_STD`."""
    gen = torch.Generator().manual_seed(seed)
    width = (256 / config["hidden_size"]) ** 0.5
    weights = {}
    for name, shape in _shapes(config).items():
        if "norm" in name:
            weights[name] = 1 + 0.1 * torch.randn(shape, generator=gen)
            continue
        std = next(s for key, s in WEIGHT_STD.items() if key in name)
        weights[name] = std * (1 if "embed_tokens" in name else width) * torch.randn(shape, generator=gen)
    return weights


def make_model(path: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides) -> str:
    """Save a seeded model (config.json + model.safetensors) to ``path``: the tiny Llama, or a
    layout (``make_model(path, **LAYOUTS["qwen2"])``)."""
    from safetensors.torch import save_file

    config = model_config(**overrides)
    os.makedirs(path, exist_ok=True)
    weights = {k: v.to(dtype).contiguous() for k, v in make_weights(config, seed).items()}
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
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


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    out = x @ w[name + ".weight"].T
    return out + w[name + ".bias"] if name + ".bias" in w else out


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
        q, k, v = (_linear(h, w, pre + f"self_attn.{p}_proj").view(T, n, d)
                   for p, n in (("q", H), ("k", Hkv), ("v", Hkv)))
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
