"""Shared test fixtures. The reference patterns are the package's built-in ones, so no test
depends on files beside the checkout."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_duo.builtin_patterns import DATA_DIR, builtin

PATTERNS = DATA_DIR
PATTERN_NAMES = ("Llama-2-7B-32K-Instruct", "Llama-3-8B-Instruct-Gradient-1048k",
                 "Meta-Llama-3.1-8B-Instruct", "Mistral-7B-Instruct-v0.2")


def use_cpu_platform() -> None:
    """vLLM cannot infer a device on a machine with no GPU; its CPU platform drives the
    config, scheduler and KV-cache manager code, which is pure Python."""
    if torch.cuda.is_available():
        return
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    platforms._current_platform = CpuPlatform()


CPU_PLATFORM_SNIPPET = ("import torch, vllm.platforms as P\n"
                        "from vllm.platforms.cpu import CpuPlatform\n"
                        "if not torch.cuda.is_available(): P._current_platform = CpuPlatform()\n")
use_cpu_platform()


def pattern_dir(name: str) -> str:
    """The packaged folder of built-in pattern ``name`` (a missing one is a packaging bug)."""
    found = builtin(name)
    assert found is not None and os.path.isdir(found.path), f"built-in pattern {name} is not packaged"
    return found.path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
