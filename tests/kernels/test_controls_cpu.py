"""The kernel tests' controls separate by design (CPU): on the planted-needle cases, the float32
reference of each mutated input differs from the reference of the true input by more than the
tolerance, so the GPU check of a kernel with that bug must fail."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.needles import NEEDLE_LENS, mutations, needle_case
from tests.kernels.reference import reference_decode, scaled_error


@pytest.mark.parametrize("name", list(NEEDLE_LENS))
def test_decode_mutations_separate(name: str) -> None:
    case = needle_case(NEEDLE_LENS[name], "cpu")
    ref = reference_decode(case)
    gaps = {what: scaled_error(reference_decode(wrong), ref) for what, wrong in mutations(case).items()}
    gaps["all-zeros output"] = scaled_error(torch.zeros_like(ref), ref)
    assert gaps and all(g > 1 for g in gaps.values()), gaps
    print(name, {k: round(v, 1) for k, v in gaps.items()})
