"""Gated attention for identification: per KV head, ``a * full + (1 - a) * streaming``.

Plugged into a Hugging Face model through transformers' ``AttentionInterface`` registry, so no
model code is patched and every model whose attention calls ``ALL_ATTENTION_FUNCTIONS`` works.
Like the reference (``llama_duo_attention_forward_two_way``), the full-attention term is the
*teacher's*: a no-grad pass with full attention stores each layer's attention output, then the
gated ("student") pass mixes it with streaming attention over the student's own states.

Memory: full attention is SDPA with ``is_causal`` (flash / memory-efficient on GPU); streaming
attention is exact (sink + recent, token-level mask) and computed in query chunks against
gathered key windows, so neither materialises an S x S matrix.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vllm_duo.errors import DuoConfigError

DEFAULT_QUERY_CHUNK = 512
_KEY_ALIGN = 16  # memory-efficient SDPA wants mask rows padded to 16 keys


def expand_kv(t: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hq, S, D]; query head h reads KV head h // groups (HF's repeat_kv)."""
    groups = num_q_heads // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:
    """Causal attention. q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D]."""
    return F.scaled_dot_product_attention(q, expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1]),
                                          is_causal=True, scale=scale)


def streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, recent: int,
                        scale: float | None = None,
                        query_chunk: int = DEFAULT_QUERY_CHUNK) -> torch.Tensor:
    """Exact streaming attention: the query at t sees keys p <= t with p < sink or p > t - recent.

    Queries are cut into chunks of C; chunk c attends to the sink keys plus the window of W >=
    C + recent - 1 keys ending at its last query, all chunks in one batched SDPA call. Memory is
    O(S * (sink + W)) instead of O(S^2). Shapes as ``full_attention``.
    """
    b, h, s, d = q.shape
    k, v = expand_kv(k, h), expand_kv(v, h)
    sink = min(sink, s)
    chunk = min(query_chunk, -(-s // _KEY_ALIGN) * _KEY_ALIGN)
    n = -(-s // chunk)
    width = -(-(sink + chunk + recent - 1) // _KEY_ALIGN) * _KEY_ALIGN - sink
    pad_right = n * chunk - s

    def windows(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B*n, H, sink + W, D]
        padded = F.pad(t, (0, 0, width - chunk, pad_right))
        win = padded.unfold(2, width, chunk).permute(0, 2, 1, 4, 3)  # [B, n, H, W, D]
        sinks = t[:, :, :sink].unsqueeze(1).expand(b, n, h, sink, d)
        return torch.cat([sinks, win], dim=3).reshape(b * n, h, sink + width, d)

    qc = F.pad(q, (0, 0, 0, pad_right)).view(b, h, n, chunk, d).transpose(1, 2).reshape(b * n, h, chunk, d)
    mask = _streaming_mask(n, chunk, sink, width, recent, q.device)
    if b > 1:
        mask = mask.repeat(b, 1, 1, 1)  # batch index = item * n + chunk, as qc
    out = F.scaled_dot_product_attention(qc, windows(k), windows(v), attn_mask=mask, scale=scale)
    return out.view(b, n, h, chunk, d).transpose(1, 2).reshape(b, h, n * chunk, d)[:, :, :s]


@functools.lru_cache(maxsize=8)
def _streaming_mask(n: int, chunk: int, sink: int, width: int, recent: int,
                    device: torch.device) -> torch.Tensor:
    """[n, 1, C, sink + W] bool: chunk c's query i (position t = c*C + i) may read sink key s
    if s <= t - recent (else the window holds it), and window key j (position (c+1)*C - W + j)
    if t - recent < p <= t and p >= 0. Cached: every layer of a step uses the same one."""
    t = (torch.arange(n, device=device)[:, None] * chunk + torch.arange(chunk, device=device))[:, :, None]
    p_win = ((torch.arange(n, device=device) + 1)[:, None] * chunk - width
             + torch.arange(width, device=device))[:, None, :]
    in_window = (p_win <= t) & (p_win > t - recent) & (p_win >= 0)
    in_sink = torch.arange(sink, device=device)[None, None, :] <= t - recent
    return torch.cat([in_sink, in_window], dim=2).unsqueeze(1)


class HeadGates(nn.Module):
    """The trainable gates (one per layer and KV head, in [0, 1]) and the attention function
    that uses them. ``install`` plugs it into a model; see ``teacher_pass`` for the two passes."""

    def __init__(self, num_layers: int, num_kv_heads: int, sink: int, recent: int,
                 query_chunk: int = DEFAULT_QUERY_CHUNK, initial_value: float = 1.0,
                 dense_prompt: bool = False) -> None:
        super().__init__()
        if sink < 0 or recent < 1:
            raise DuoConfigError(f"sink must be >= 0 and recent >= 1, got sink={sink}, recent={recent}")
        self.gates = nn.Parameter(torch.full((num_layers, num_kv_heads), float(initial_value)))
        self.sink, self.recent, self.query_chunk = sink, recent, query_chunk
        # dense_prompt: only the answer's queries are gated; the prompt's read the teacher's full
        # attention, as in an engine whose prefill window covers the prompt (decode-only windows).
        self.dense_prompt = dense_prompt
        self._gated_queries: torch.Tensor | None = None
        self._mode = "student"
        self._teacher: dict[int, torch.Tensor] = {}
        self.name = f"vllm_duo_gated_{id(self):x}"

    def install(self, model: nn.Module) -> None:
        """Register this object's attention function and switch ``model`` to it."""
        install_attention(model, self.name, self.attention)

    @contextlib.contextmanager
    def teacher_pass(self) -> Iterator[None]:
        """Inside: full attention, each layer's output stored. After: student mode (gated mix),
        which stays on so that activation checkpointing recomputes the student in backward."""
        self._teacher.clear()
        self._mode = "teacher"
        try:
            yield
        finally:
            self._mode = "student"
        if len(self._teacher) != self.gates.shape[0]:
            raise DuoConfigError(
                f"only {len(self._teacher)} of {self.gates.shape[0]} attention layers called the gated "
                f"attention function; this model's attention does not go through transformers' "
                f"AttentionInterface, so identification cannot gate it")

    def gate_queries(self, answer: torch.Tensor) -> None:
        """The [B, S] bool mask of the next passes' answer tokens; with ``dense_prompt`` only these
        queries mix in streaming attention. Kept until the next call (backward recomputes)."""
        self._gated_queries = answer if self.dense_prompt else None

    @torch.no_grad()
    def clamp_(self) -> None:
        self.gates.clamp_(0.0, 1.0)

    def attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
        """transformers attention-function signature; returns ([B, S, Hq, D], None)."""
        refuse_unsupported(query.shape[2], kwargs)
        layer = module.layer_idx
        if self._mode == "teacher":
            out = full_attention(query, key, value, scaling).transpose(1, 2).contiguous()
            self._teacher[layer] = out.detach()
            return out, None
        full = self._teacher.get(layer)
        stream = streaming_attention(query, key, value, self.sink, self.recent, scaling,
                                     self.query_chunk).transpose(1, 2)
        if full is None or full.shape != stream.shape:
            raise RuntimeError(f"layer {layer}: no teacher output for this batch; run the teacher pass first")
        groups = query.shape[1] // key.shape[1]
        a = unit_interval(self.gates[layer]).repeat_interleave(groups)[:, None]  # [Hq, 1]
        if self._gated_queries is not None:
            a = torch.where(self._gated_queries[:, :, None, None], a, torch.ones_like(a))  # [B, S, Hq, 1]
        # Mixed in float32, so that a gate of exactly 1 reproduces the teacher bit for bit.
        s32 = stream.float()
        return (s32 + a * (full.float() - s32)).to(stream.dtype), None


def unit_interval(g: torch.Tensor) -> torch.Tensor:
    """``g`` clipped to [0, 1], with gradient 1 on the closed interval and 0 outside.

    Not ``torch.clamp``: its gradient at a bound is 1 in torch 2.11 but 0 in torch 2.14, and
    gates start at exactly 1.0, so with 2.14 they would never move.
    """
    return torch.where((g >= 0) & (g <= 1), g, g.detach().clamp(0.0, 1.0))


def install_attention(model: nn.Module, name: str, fn) -> None:
    """Register ``fn`` in transformers' ``AttentionInterface`` as ``name`` and switch ``model`` to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    # A name with no mask function makes transformers skip building the (S x S) mask.
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise DuoConfigError(
            f"{type(model).__name__} does not accept a custom attention function "
            f"(transformers' AttentionInterface); duo's HF paths support models that do")


def refuse_unsupported(seq_len: int, kwargs: dict) -> None:
    """Attention variants the exact full/streaming pair above would get wrong."""
    window = kwargs.get("sliding_window")
    if window is not None and seq_len > window:
        raise DuoConfigError(
            f"the model uses sliding-window attention ({window} tokens) and a sequence of {seq_len} "
            f"tokens; DuoAttention identification needs full attention: lower --max-length to "
            f"<= {window} or use a model without a sliding window")
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise DuoConfigError(f"attention with {name!r} is not supported by identification")


def gate_stats(gates: torch.Tensor) -> dict[str, float]:
    """Summary numbers for progress bars and logs."""
    g = gates.detach().float().clamp(0, 1)
    return {"mean": float(g.mean()), "min": float(g.min()), "max": float(g.max()),
            "frac_above_half": float((g > 0.5).float().mean()),
            "frac_at_one": float((g >= 1.0).float().mean())}

