"""``streaming_prefill`` compiles for Hopper (sm_90) with at most small register spills, on any
machine (tests/kernels/sm90.py). The bound is a guard against tiles that spill kilobytes (128 x 128
tiles at head_dim 128: 1.6 KB per thread); the 128 x 64 tiles spill 112-188 bytes (unpacked, bf16:
188 with the unmasked interior tiles) and are the fastest timed on the H200
(``ops.prefill.launch_config``)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from tests.kernels.sm90 import spills  # noqa: E402
from vllm_duo.ops.prefill import HEAD_DIMS, _streaming_prefill_kernel, launch_config  # noqa: E402

SIGNATURE = {
    **{name: "*bf16" for name in ("Q", "K", "V", "O")},
    **{name: "*i64" for name in ("KV_PTRS", "BT_PTRS", "BT_STRIDES")},
    **{name: "*i32" for name in ("SLOT_HEAD", "QSL", "SEQ_LENS")},
    **{name: "*fp32" for name in ("K_SCALE", "V_SCALE")},
    **{name: "i32" for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                "stride_vh", "stride_ot", "stride_oh", "bt_row0", "sink", "window")},
    "scale_log2": "fp32",
    **{name: "constexpr" for name in ("G", "BLOCK_SIZE", "D", "BLOCK_M", "BLOCK_N", "FP8", "HEADS")},
}


SPILL_LIMIT_BYTES = 192


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("group", [1, 4, 7])  # MHA, Llama-3's 32/8, Qwen2's 28/4
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_compiles_for_sm90_with_small_spills(head_dim: int, group: int, fp8: bool, tmp_path) -> None:
    block_m, block_n, num_warps, num_stages, pack = launch_config(head_dim, group, fp8)
    found, report = spills(_streaming_prefill_kernel, SIGNATURE,
                           {"G": group, "BLOCK_SIZE": 16, "D": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                            "FP8": fp8, "HEADS": group if pack else 1},
                           tmp_path, num_warps=num_warps, num_stages=num_stages)
    assert found and max(found) <= SPILL_LIMIT_BYTES, report


def test_per_step_arguments_do_not_specialize() -> None:
    """The decode count (block-table row) and the slices past the decodes change every step: a
    specialization on them recompiles mid-serving (seconds per new value class)."""
    params = {p.name: p for p in _streaming_prefill_kernel.params}
    assert params["bt_row0"].do_not_specialize
    assert all(params[n].do_not_specialize_on_alignment for n in ("QSL", "SEQ_LENS", "K_SCALE", "V_SCALE"))
