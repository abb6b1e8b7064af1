"""Streaming-head attention on the GPU (FA3 pieces + Triton merge) against a float32 reference.

Every case has the builder's block table: scattered ids, freed gap and row tails pointing at the
null block, which is NaN; an output cell computed from it would be NaN, so finite output proves
the gap is never read. Outputs start NaN-poisoned and are head slices of wider tensors.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.kernels.streaming_reference import make_case, reference, run_rswa, run_streaming
from vllm_duo.backend.streaming_prefill import plan_streaming

pytestmark = pytest.mark.gpu
ATOL, RTOL = 2e-2, 2e-2  # bf16 output rounding on values of magnitude ~1


def check(case, out: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "read a NaN cell (gap, row tail or unused block)"
    torch.testing.assert_close(out.float(), reference(case), atol=ATOL, rtol=RTOL)


def random_case(seed: int, **kw):
    """Decodes and chunks of 256..16K at the end of prompts up to 64K, random sizes."""
    rng = random.Random(seed)
    sink = rng.choice([0, 1, 16, 20, 64, 100])
    window = rng.choice([1, 64, 256, 1000, 4096, 32768])
    decode_window = rng.choice([window, 256])
    n_dec, n_chunk = rng.randint(0, 6), rng.randint(1, 3)
    q_lens = [1] * n_dec + [rng.choice([256, 1000, 2048, 4096, 8192, 16384]) for _ in range(n_chunk)]
    lens = [rng.randint(1, 65536) for _ in range(n_dec)] + \
        [q + rng.choice([0, rng.randint(0, 65536 - q)]) for q in q_lens[n_dec:]]
    windows = [decode_window] * n_dec + [window] * n_chunk
    shape = rng.choice([(4, 128), (1, 128), (8, 128), (3, 64), (4, 64)])
    return make_case(q_lens, lens, windows, sink=sink, group=shape[0], head_dim=shape[1],
                     block_size=rng.choice([16, 32]), seed=seed, **kw)


CASES = {
    "16k_chunk_at_end_of_64k": ([16384], [65536], [256], 64),
    "first_16k_chunk": ([16384], [16384], [256], 64),
    "prefill_window_32k": ([8192, 4096], [65536, 40000], [32768] * 2, 64),
    "chunk_straddles_sink_plus_window": ([512, 300], [700, 319 + 150], [256] * 2, 64),
    "decodes_and_chunks": ([1] * 6 + [256, 1000, 2048, 4096],
                           [1, 64, 320, 321, 5000, 65536, 256, 3000, 30000, 65536], [256] * 10, 64),
    "decode_and_prefill_windows": ([1] * 4 + [2048, 16384], [100, 330, 9000, 60000, 2048, 50000],
                                   [256] * 4 + [4096] * 2, 64),
    "sink_not_block_multiple": ([1, 3000], [5000, 9000], [100, 100], 20),
    "no_sink": ([1, 3000], [5000, 9000], [256, 256], 0),
    "window_one": ([1, 2000], [5000, 9000], [1, 1], 64),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cases(name) -> None:
    q_lens, lens, windows, sink = CASES[name]
    case = make_case(q_lens, lens, windows, sink=sink)
    check(case, run_streaming(case))


@pytest.mark.parametrize("seed", range(8))
def test_random(seed) -> None:
    case = random_case(seed)
    check(case, run_streaming(case))


def test_float16_and_block_64() -> None:
    case = make_case([1, 4096], [7000, 20000], [256, 256], sink=64, block_size=64,
                     dtype=torch.float16)
    check(case, run_streaming(case))


def test_plan_built_once() -> None:
    """One plan per step, reused across slots (as the impl may) gives the same output."""
    case = make_case([1, 2048], [9000, 12000], [256, 256], sink=64)
    plan = plan_streaming(case.cu_seqlens_q, case.seq_lens, case.block_table, case.q.shape[0],
                          2048, 12000, 64, 256, case.block_size)
    torch.testing.assert_close(run_streaming(case, plan=plan), run_streaming(case), atol=0, rtol=0)


def test_chunk_invariance() -> None:
    """One 24K prompt as one chunk, as 4K chunks and as ragged chunks: same rows (to bf16)."""
    L = 24576
    outs = []
    for chunks in ([L], [4096] * 6, [256, 7000, 1000, 16320]):
        ends = [sum(chunks[:i + 1]) for i in range(len(chunks))]
        case = make_case(chunks, ends, [256] * len(chunks), sink=64, shared_prompt=True, seed=5)
        out = run_streaming(case)
        check(case, out)
        outs.append(out.float())
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["16k_chunk_at_end_of_64k", "decodes_and_chunks",
                                  "decode_and_prefill_windows", "sink_not_block_multiple"])
def test_matches_triton_rswa(name) -> None:
    """Against vLLM's Triton R-SWA path (the current impl). It reads and masks the gap, so here
    the null block holds finite garbage instead of NaN."""
    q_lens, lens, windows, sink = CASES[name]
    case = make_case(q_lens, lens, windows, sink=sink, null_fill="garbage")
    ours, triton_out = run_streaming(case), run_rswa(case)
    check(case, triton_out)
    check(case, ours)
    torch.testing.assert_close(ours.float(), triton_out.float(), atol=ATOL, rtol=RTOL)
