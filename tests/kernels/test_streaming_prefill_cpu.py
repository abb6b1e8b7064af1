"""CPU checks of the streaming prefill decomposition (``vllm_duo.backend.streaming_prefill``).

FA3 is replaced by a float32 emulation that reads whole key tiles as FA3 does, so a plan that
let any tile reach into the NaN null block fails here; the merge kernel runs in Triton's
interpreter. The GPU test (test_streaming_prefill.py) runs the real kernels.
"""

from __future__ import annotations

import random

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import vllm_duo.backend.streaming_prefill as sp
from tests.kernels.streaming_reference import (emulated_flash_attn_varlen_func, make_case,
                                               reference, run_streaming)

CPU = dict(group=2, head_dim=32, dtype=torch.float32, device="cpu")


def torch_merge(out, sink_out, win_lse, sink_lse, early_out, is_early) -> None:
    """``merge_pieces`` in torch (the Triton interpreter is too slow for the big CPU cases)."""
    lw, ls = win_lse.T[..., None], sink_lse.T[..., None]
    mx = torch.maximum(lw, ls)
    ww, ws = torch.exp(lw - mx), torch.exp(ls - mx)
    late = (out.float() * ww + sink_out.float() * ws) / (ww + ws)
    out.copy_(torch.where(is_early[:, None, None], early_out, late.to(out.dtype)))


@pytest.fixture
def emulated(monkeypatch):
    from vllm.v1.attention.backends import fa_utils

    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", emulated_flash_attn_varlen_func,
                        raising=False)
    monkeypatch.setattr(sp, "merge_pieces", torch_merge)


def random_batch(rng: random.Random, n_decodes: int, n_chunks: int, max_len: int, window: int,
                 decode_window: int) -> tuple[list[int], list[int], list[int]]:
    q_lens, lens, windows = [], [], []
    for i in range(n_decodes + n_chunks):
        L = rng.randint(1, max_len)
        q = 1 if i < n_decodes else rng.randint(1, L)
        q_lens.append(q)
        lens.append(L)
        windows.append(decode_window if i < n_decodes else window)
    return q_lens, lens, windows


def check(case) -> None:
    out = run_streaming(case, fa_version=3)
    assert torch.isfinite(out).all(), "a NaN cell (null block, unwritten or unused) was read"
    torch.testing.assert_close(out, reference(case), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sink,window,decode_window,block_size", [
    (64, 256, 256, 16), (16, 100, 100, 16), (20, 7, 7, 16), (0, 64, 64, 16), (5, 1, 1, 32),
    (64, 500, 256, 16), (3, 40, 90, 32),
])
def test_matches_reference(emulated, sink, window, decode_window, block_size) -> None:
    rng = random.Random(sink * 1000 + window)
    q_lens, lens, windows = random_batch(rng, 3, 5, 1100, window, decode_window)
    check(make_case(q_lens, lens, windows, sink=sink, block_size=block_size, seed=window, **CPU))


@pytest.mark.parametrize("first", [0, 1, 60, 62, 63, 64, 65, 200, 318, 319, 320, 321, 700])
def test_chunk_around_the_early_boundary(emulated, first) -> None:
    """Chunks starting on every side of t = sink + W - 1 (where sink and window stop overlapping)."""
    check(make_case([130, 1], [first + 130, first + 1], [256, 256], sink=64, seed=first, **CPU))


def test_plan_indices() -> None:
    """The window table starts at the builder's first kept block; early rows are each request's
    queries below sink + W - 1."""
    case = make_case([1, 300, 40], [1000, 400, 40], [256] * 3, sink=64, **CPU)
    plan = sp.plan_streaming(case.cu_seqlens_q, case.seq_lens, case.block_table, 341, 300, 1000,
                             64, 256, 16)
    shift = [(999 - 256 + 1) // 16, 0, 0]
    cols = case.block_table.shape[1]
    for r, s in enumerate(shift):
        idx = [min(s + j, cols - 1) for j in range(plan.win_table.shape[1])]
        assert plan.win_table[r].tolist() == case.block_table[r, idx].tolist()
    assert plan.win_seqused.tolist() == [1000 - shift[0] * 16, 400, 40]
    e = [0, 319 - 100, 40]  # request 1 starts at t = 100
    assert plan.early_cu.tolist() == [0, 0, 1, 1 + e[1], 301, 341, 341]
    assert plan.early_seqused.tolist() == [0, 0, 100 + e[1], 0, 40, 0]
    assert plan.is_early.tolist() == [False] + [True] * e[1] + [False] * (300 - e[1]) + [True] * 40
    assert plan.sink_seqused.tolist() == [64, 64, 40]


def test_gap_reads_are_detected(emulated) -> None:
    """Sanity of the harness: FA3 with the builder's table as is (no shift) reads gap tiles."""
    case = make_case([300], [3000], [256], sink=64, **CPU)
    out = emulated_flash_attn_varlen_func(
        case.q, case.k_cache, case.v_cache, 300, case.cu_seqlens_q, 3000, case.seq_lens,
        case.scale, causal=True, window_size=(255, 0), block_table=case.block_table)
    assert torch.isnan(out).any()


def test_plan_reused_and_sink_zero(emulated) -> None:
    case = make_case([50, 1], [900, 500], [128, 128], sink=0, **CPU)
    plan = sp.plan_streaming(case.cu_seqlens_q, case.seq_lens, case.block_table, 51, 50, 900, 0,
                             128, 16)
    out = run_streaming(case, plan=plan, fa_version=3)
    torch.testing.assert_close(out, reference(case), atol=2e-5, rtol=2e-5)


def test_merge_kernel_interpreted(monkeypatch) -> None:
    """The Triton merge in the interpreter: early rows copied, late rows LSE-merged, and NaNs in
    the pieces a row does not use never reach it."""
    monkeypatch.setattr(sp, "_merge_kernel", InterpretedFunction(sp._merge_kernel.fn))
    gen = torch.Generator().manual_seed(0)
    n, g, d = 24, 3, 64
    out = torch.randn(n, g + 2, d, generator=gen)[:, :g]
    sink_out, early_out = torch.randn(2, n, g, d, generator=gen)
    win_lse, sink_lse = torch.randn(2, g, n + 5, generator=gen)[..., :n] * 5
    early = torch.rand(n, generator=gen) < 0.4
    expected = out.clone()
    torch_merge(expected, sink_out, win_lse, sink_lse, early_out, early)
    out[early] = float("nan")
    sink_out[early] = float("nan")
    early_out[~early] = float("nan")
    sp.merge_pieces(out, sink_out, win_lse, sink_lse, early_out, early)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_bad_window() -> None:
    case = make_case([4], [4], [4], sink=0, **CPU)
    with pytest.raises(ValueError, match="window >= 1"):
        sp.plan_streaming(case.cu_seqlens_q, case.seq_lens, case.block_table, 4, 4, 4, 0, 0, 16)
