"""``streaming_prefill`` compiles for Hopper (sm_90) without register spills, on any machine.

Triton compiles ahead of time for an explicit target, and its bundled ptxas reports registers and
spills, so CI catches a kernel change that no longer compiles or starts spilling (a large, silent
slowdown) without a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

triton = pytest.importorskip("triton")

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


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("group", [1, 4, 7])  # MHA, Llama-3's 32/8, Qwen2's 28/4
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_compiles_for_sm90_without_spills(head_dim: int, group: int, fp8: bool, tmp_path) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_m, block_n, num_warps, num_stages, pack = launch_config(head_dim, group, fp8)
    src = ASTSource(fn=_streaming_prefill_kernel, signature=SIGNATURE,
                    constexprs={"G": group, "BLOCK_SIZE": 16, "D": head_dim, "BLOCK_M": block_m,
                                "BLOCK_N": block_n, "FP8": fp8, "HEADS": group if pack else 1})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=True)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report.stdout + report.stderr)]
    assert spills and not any(spills), report.stdout + report.stderr


def test_per_step_arguments_do_not_specialize() -> None:
    """The decode count (block-table row) and the slices past the decodes change every step: a
    specialization on them recompiles mid-serving (seconds per new value class)."""
    params = {p.name: p for p in _streaming_prefill_kernel.params}
    assert params["bt_row0"].do_not_specialize
    assert all(params[n].do_not_specialize_on_alignment for n in ("QSL", "SEQ_LENS", "K_SCALE", "V_SCALE"))
