"""The decode and write tests' controls separate by design (CPU): on the planted-needle cases, the float32
reference of each mutated input differs from the reference of the true input by more than the
tolerance, so the GPU check of a kernel with that bug must fail."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.kernels.needles import NEEDLE_LENS, half_keys_skipped, mutations, needle_case
from tests.kernels.reference import make_case, reference_decode, scaled_error


@pytest.mark.parametrize("name", [n for n in NEEDLE_LENS if n != "128k"])  # 128K: GPU only (time)
def test_decode_mutations_separate(name: str) -> None:
    case = needle_case(NEEDLE_LENS[name], "cpu")
    ref = reference_decode(case)
    gaps = {what: scaled_error(reference_decode(wrong), ref) for what, wrong in mutations(case).items()}
    gaps["all-zeros output"] = scaled_error(torch.zeros_like(ref), ref)
    assert gaps and all(g > 1 for g in gaps.values()), gaps


def test_long_random_context_half_keys_separate() -> None:
    """test_long_contexts' control without needles: half of a 64K row's keys skipped."""
    case = make_case([65536, 7, 0], num_kv_heads=4, group=4, head_dim=128, dtype=torch.bfloat16,
                     block_size=16, streaming_heads=[True, False, True, False], pad_slots=1, seed=3,
                     device="cpu")
    ref = reference_decode(case)
    assert scaled_error(reference_decode(half_keys_skipped(case, 0)), ref) > 1
    assert scaled_error(torch.zeros_like(ref[0]), ref[0]) > 1


def test_write_mutations_separate() -> None:
    """test_write_kv's round trip: the newest key's row swapped with the other sequence's newest,
    or left stale (the previous key's contents), moves the decode output beyond the tolerance."""
    case = needle_case(4096, "cpu")
    ref = reference_decode(case)
    D = case.q.shape[2]
    newest, other, previous = int(case.rows(1, 0)[-1]), int(case.rows(1, 1)[-1]), int(case.rows(1, 0)[-2])
    for rows_from, rows_to in (([newest, other], [other, newest]), ([previous], [newest])):
        cache = case.caches[1].clone()
        cache.view(-1, 2 * D)[rows_to] = case.caches[1].view(-1, 2 * D)[rows_from]
        wrong = replace(case, caches=[case.caches[0], cache])
        assert scaled_error(reference_decode(wrong), ref) > 1
