"""The decode and write tests' controls separate by design (CPU): on the planted-needle cases, the float32
reference of each mutated input differs from the reference of the true input by more than the
tolerance, so the GPU check of a kernel with that bug must fail."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.kernels.needles import NEEDLE_LENS, half_keys_skipped, mutations, needle_case
from tests.kernels.reference import (FP8_NAN, FP8_SCALES, fp8_case, make_case, quantize_fp8,
                                     reference_decode, scaled_error, wrong_scales)


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


@pytest.mark.parametrize("name", ["1", "small", "4k"])
def test_fp8_decode_mutations_separate(name: str) -> None:
    """test_fp8_wrong_kernel_inputs_are_rejected's controls: on fp8 caches every mutation and a
    wrong scale (2 x k_scale, v_scale ignored) still moves the reference beyond the tolerance."""
    case = needle_case(NEEDLE_LENS[name], "cpu", fp8_scales=FP8_SCALES)
    ref = reference_decode(case)
    wrong = {**mutations(case), **wrong_scales(case)}
    gaps = {what: scaled_error(reference_decode(c), ref) for what, c in wrong.items()}
    assert len(gaps) >= 3 and all(g > 1 for g in gaps.values()), gaps


@pytest.mark.parametrize("kv_std", [3.0, 10.0])
def test_fp8_random_case_scale_controls_separate(kv_std: float) -> None:
    """test_fp8_cache's wrong-scale controls on a random fp8 case (scores O(1), no needle)."""
    case = fp8_case([2048, 37, 0], kv_std=kv_std, num_kv_heads=2, group=4, head_dim=64,
                    dtype=torch.bfloat16, block_size=16, streaming_heads=[True, False], pad_slots=1,
                    seed=1, device="cpu")
    ref = reference_decode(case)
    assert all(scaled_error(reference_decode(c), ref) > 1 for c in wrong_scales(case).values())


def test_fp8_cases_are_poisoned_and_quantized() -> None:
    """The fp8 cases the GPU tests use: cells no query attends hold e4m3 NaN (a stray read
    shows), the reference never sees one, and the caches are torch's saturating cast."""
    case = make_case([700, 5], num_kv_heads=2, group=4, head_dim=64, dtype=torch.bfloat16,
                     block_size=16, streaming_heads=[True, False], fp8_scales=FP8_SCALES,
                     kv_std=20.0, seed=4, device="cpu")
    assert all((c.view(torch.uint8) == FP8_NAN).any() for c in case.caches)
    assert not reference_decode(case).isnan().any()
    assert quantize_fp8(torch.tensor([1e3, -1e3, 22.4, 1e-6, -1e-6]), case.k_scale).view(
        torch.uint8).tolist() == [0x7E, 0xFE, 0x7E, 0x00, 0x80]  # +-448, 448 = 22.4 / 0.05


def test_fp8_write_round_trip_k_scale_control_separates() -> None:
    """test_fp8_round_trip_through_decode's "K written with 2 x k_scale": the cache then holds
    about K / 2, read as if k_scale were halved."""
    case = needle_case(4096, "cpu", fp8_scales=FP8_SCALES)
    ref = reference_decode(case)
    assert scaled_error(reference_decode(replace(case, k_scale=case.k_scale / 2)), ref) > 1


def test_unsaturated_fp8_control_overflows_to_nan_whatever_torch_casts() -> None:
    """write_kv's "cast without saturation" control gives NaN past e4m3's range on every torch
    (torch 2.14's plain cast saturates, which made that control equal the kernel's output)."""
    from tests.kernels.test_write_kv import unsaturated_fp8

    x = torch.tensor([100.0, 448.0, 460.0, 470.0, -1000.0])
    out = unsaturated_fp8(x, torch.tensor([1.0])).float()
    assert out[:3].tolist() == [96.0, 448.0, 448.0] and out[3:].isnan().all()
    assert not torch.equal(unsaturated_fp8(x, torch.tensor([1.0])).view(torch.uint8),
                           quantize_fp8(x, torch.tensor([1.0])).view(torch.uint8))
