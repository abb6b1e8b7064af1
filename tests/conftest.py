"""Shared test fixtures: the reference patterns live in ../shared/patterns (never copied here)."""

from __future__ import annotations

import os

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _patterns_root() -> str:
    """$VLLM_DUO_PATTERNS, else ../shared/patterns, else ./.patterns (a copy carried to the GPU
    machine, which has no ../shared; git-ignored)."""
    for path in (os.environ.get("VLLM_DUO_PATTERNS"),
                 os.path.join(os.path.dirname(_ROOT), "shared", "patterns"),
                 os.path.join(_ROOT, ".patterns")):
        if path and os.path.isdir(path):
            return path
    return os.path.join(os.path.dirname(_ROOT), "shared", "patterns")


PATTERNS = _patterns_root()
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
    path = os.path.join(PATTERNS, name)
    if not os.path.isdir(path):
        pytest.skip(f"reference pattern {name} not found under {PATTERNS}")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
