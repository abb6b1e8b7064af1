"""Loads the compiled library ``vllm_duo/_C*.so``, which registers ``torch.ops.vllm_duo.*``.

The library is optional at import time, so the package (config, CLI, CPU tests) works without a
CUDA build. Every kernel wrapper calls :func:`require` first, so a missing build surfaces as one
clear error that says how to build, not as an AttributeError from ``torch.ops``.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, TypeVar

import torch

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_HINT = ("build it with `pip install -e .` (or `python setup.py build_ext --inplace`) on a "
              "machine with a CUDA toolkit (nvcc, CUDA_HOME); TORCH_CUDA_ARCH_LIST picks the GPU "
              "architectures, e.g. TORCH_CUDA_ARCH_LIST=9.0 for H100/H200")

F = TypeVar("F", bound=Callable)


def _load() -> str | None:
    """Load the library; return None on success, else the reason it is unavailable."""
    paths = sorted(glob.glob(os.path.join(_PKG_DIR, "_C*.so")))
    if not paths:
        return f"no _C*.so in {_PKG_DIR}"
    try:
        torch.ops.load_library(paths[0])
    except (OSError, RuntimeError) as e:
        return f"loading {paths[0]} failed: {e}"
    return None


_ERROR: str | None = _load()


def available() -> bool:
    """Whether the CUDA ops are registered in ``torch.ops.vllm_duo``."""
    return _ERROR is None


def require() -> None:
    """Raise a RuntimeError that says how to build, unless the library is loaded."""
    if _ERROR is not None:
        raise RuntimeError(f"vllm-duo's CUDA extension (vllm_duo._C) was not built or could not be "
                           f"loaded ({_ERROR}); {BUILD_HINT}.")


def register_fake(qualname: str) -> Callable[[F], F]:
    """``torch.library.register_fake`` when the op exists (library loaded), else a no-op."""
    def wrap(fn: F) -> F:
        if available():
            torch.library.register_fake(qualname)(fn)
        return fn
    return wrap
