"""Gated attention: a=1 is full attention, a=0 the exact sink + recent mask (float32 reference)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_duo.identify.gating import HeadGates, full_attention, streaming_attention, unit_interval


def reference(q, k, v, sink: int | None = None, recent: int | None = None) -> torch.Tensor:
    """Plain float32 softmax attention with an explicit [S, S] mask; sink/recent None = full."""
    s, groups = q.shape[2], q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    t, p = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = p <= t
    if sink is not None:
        allowed &= (p < sink) | (p > t - recent)
    scores = (q.float() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


CASES = [  # (batch, seq, sink, recent, query chunk)
    (1, 1, 4, 8, 16),
    (2, 37, 4, 8, 16),
    (1, 100, 0, 1, 32),
    (1, 200, 16, 32, 64),
    (1, 65, 100, 8, 16),  # sink longer than the sequence
    (1, 130, 4, 300, 32),  # window longer than the sequence: full attention
    (3, 50, 4, 8, 512),  # one chunk
]


@pytest.mark.parametrize("b,s,sink,recent,chunk", CASES)
def test_streaming_and_full_match_reference(b, s, sink, recent, chunk):
    torch.manual_seed(s)
    q, k, v = torch.randn(b, 4, s, 8), torch.randn(b, 2, s, 8), torch.randn(b, 2, s, 8)
    torch.testing.assert_close(streaming_attention(q, k, v, sink, recent, None, chunk),
                               reference(q, k, v, sink, recent), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full_attention(q, k, v), reference(q, k, v), atol=1e-5, rtol=1e-5)


def _gated(gate_values, q, k, v, sink, recent, answer=None):
    hg = HeadGates(1, k.shape[1], sink, recent, query_chunk=16, dense_prompt=answer is not None)
    with torch.no_grad():
        hg.gates.copy_(torch.tensor([gate_values]))
    if answer is not None:
        hg.gate_queries(answer)
    module = SimpleNamespace(layer_idx=0)
    with torch.no_grad(), hg.teacher_pass():
        hg.attention(module, q, k, v, None)
    out, _ = hg.attention(module, q, k, v, None)
    return out.transpose(1, 2), hg  # back to [B, H, S, D]


def test_gate_one_is_full_zero_is_streaming_and_mixes_per_kv_head():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 70, 8), torch.randn(2, 3, 70, 8), torch.randn(2, 3, 70, 8)
    full, stream = reference(q, k, v), reference(q, k, v, 4, 8)
    torch.testing.assert_close(_gated([1.0, 1.0, 1.0], q, k, v, 4, 8)[0], full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_gated([0.0, 0.0, 0.0], q, k, v, 4, 8)[0], stream, atol=1e-5, rtol=1e-5)
    out, _ = _gated([1.0, 0.0, 0.25], q, k, v, 4, 8)  # query heads 2h, 2h+1 share KV head h
    torch.testing.assert_close(out[:, :2], full[:, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 2:4], stream[:, 2:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 4:], 0.25 * full[:, 4:] + 0.75 * stream[:, 4:], atol=1e-5, rtol=1e-5)


def test_dense_prompt_windows_only_the_answer_queries():
    """An engine whose prefill window covers the prompt: prompt queries see every key, answer
    queries (decode) see sink + recent. Control: the same gates without ``dense_prompt`` window the
    prompt too, which the reference separates from full attention at every late prompt query."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 70, 8), torch.randn(2, 2, 70, 8), torch.randn(2, 2, 70, 8)
    answer = torch.zeros(2, 70, dtype=torch.bool)
    answer[0, 50:], answer[1, 60:] = True, True  # per-sample answer starts
    full, stream = reference(q, k, v), reference(q, k, v, 4, 8)
    out, _ = _gated([0.0, 0.5], q, k, v, 4, 8, answer)
    want = full.clone()
    for b, start in ((0, 50), (1, 60)):
        want[b, :2, start:] = stream[b, :2, start:]
        want[b, 2:, start:] = 0.5 * (full[b, 2:, start:] + stream[b, 2:, start:])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    windowed, _ = _gated([0.0, 0.5], q, k, v, 4, 8)
    assert (windowed[:, :2, 20:50] - full[:, :2, 20:50]).abs().amax() > 0.1


def test_dense_prompt_gates_learn_from_the_answer_queries_only():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    answer = torch.zeros(1, 40, dtype=torch.bool)
    answer[0, 30:] = True
    out, hg = _gated([0.5], q, k, v, 2, 4, answer)
    out[:, :, :30].square().sum().backward(retain_graph=True)
    assert hg.gates.grad is None or hg.gates.grad.abs().item() == 0
    out[:, :, 30:].square().sum().backward()
    assert hg.gates.grad.abs().item() > 0


def test_gradient_reaches_gates_initialised_at_one():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    out, hg = _gated([1.0], q, k, v, 2, 4)
    out.square().sum().backward()
    assert hg.gates.grad is not None and hg.gates.grad.abs().item() > 0


def test_unit_interval_gradient_is_one_at_the_bounds_and_zero_outside():
    """torch 2.14's ``clamp`` gives gradient 0 at a bound (2.11: 1); gates start at 1.0, so a
    clamp-based gate would never move on 2.14. The gate's clip must pass gradient at 0 and 1."""
    g = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    out = unit_interval(g)
    out.sum().backward()
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0, 1.0])
    assert g.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
