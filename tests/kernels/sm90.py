"""Compile a Triton kernel for Hopper (sm_90) on any machine and read ptxas's register report.

Triton compiles ahead of time for an explicit target, and its bundled ptxas reports registers
and spills, so CI catches a kernel change that no longer compiles or starts spilling (a large,
silent slowdown) without a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any


def spills(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], tmp_path: Path,
           **options: int) -> tuple[list[int], str]:
    """(bytes of every spill store/load ptxas reports, its whole report) for ``fn`` compiled for
    sm_90a with ``options`` (num_warps, num_stages)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    return [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)], text
