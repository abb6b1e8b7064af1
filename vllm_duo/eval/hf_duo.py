"""DuoAttention's semantics inside a Hugging Face model (no vLLM): a retrieval mask as a
transformers attention function, for the prompt and for cached decode steps.

Why: to score a pattern on a task (``benchmarks/niah_hf.py``) where no engine runs, and to tell a
weak task from a weak pattern. Exact, not fast: every head computes both full and streaming
attention, and each KV head's role picks one. Streaming heads see keys p <= t with p < sink or
p > t - recent (the prompt uses the same window, as duo's default ``prefill_recent_size``).
Unpadded inputs only (one sequence, or equal-length ones).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vllm_duo.errors import DuoConfigError
from vllm_duo.identify.gating import (expand_kv, full_attention, install_attention, refuse_unsupported,
                                      streaming_attention)
from vllm_duo.patterns import check_shape


def _cached_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, recent: int,
                 scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries at the last q.shape[2] of k.shape[2] positions: (full, streaming) outputs."""
    n_q, n_k = q.shape[2], k.shape[2]
    t = torch.arange(n_k - n_q, n_k, device=q.device)[:, None]
    p = torch.arange(n_k, device=q.device)[None, :]
    causal = p <= t
    streaming = causal & ((p < sink) | (p > t - recent))
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    return (F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale),
            F.scaled_dot_product_attention(q, k, v, attn_mask=streaming, scale=scale))


class DuoSemantics:
    """A retrieval mask ``[layers, kv_heads]`` (1 = retrieval) applied to an HF model."""

    def __init__(self, retrieval_mask: np.ndarray, sink: int, recent: int) -> None:
        if sink < 0 or recent < 1:
            raise DuoConfigError(f"sink must be >= 0 and recent >= 1, got sink={sink}, recent={recent}")
        self.retrieval = torch.as_tensor(np.asarray(retrieval_mask) != 0)
        self.sink, self.recent = sink, recent
        self.name = f"vllm_duo_semantics_{id(self):x}"

    def install(self, model: nn.Module) -> None:
        """Register the attention function and switch ``model`` to it (shapes checked first)."""
        cfg = model.config
        check_shape(self.retrieval.numpy(), cfg.num_hidden_layers,
                    getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, type(model).__name__)
        install_attention(model, self.name, self.attention)

    def attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
        """transformers attention-function signature; returns ([B, S, Hq, D], None)."""
        refuse_unsupported(key.shape[2], kwargs)
        if query.shape[2] == key.shape[2]:  # the prompt
            full = full_attention(query, key, value, scaling)
            stream = streaming_attention(query, key, value, self.sink, self.recent, scaling)
        else:
            full, stream = _cached_step(query, key, value, self.sink, self.recent, scaling)
        groups = query.shape[1] // key.shape[1]
        role = self.retrieval[module.layer_idx].to(query.device).repeat_interleave(groups)
        return torch.where(role[None, :, None, None], full, stream).transpose(1, 2).contiguous(), None
