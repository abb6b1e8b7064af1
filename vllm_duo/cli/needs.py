"""What a GPU-only tool needs, checked before any GPU work: one line and exit code 2 when missing."""

from __future__ import annotations

import os
import sys

from vllm_duo.errors import DuoConfigError


def cuda_devices() -> int:
    """Visible CUDA devices (0 on a machine without a GPU or driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_cuda(gpus: int = 1) -> None:
    """Callers prefix the tool's name ("vllm-duo bench: error: needs ...")."""
    if (seen := cuda_devices()) < gpus:
        need = "an NVIDIA GPU with CUDA" if gpus == 1 else f"{gpus} NVIDIA GPUs with CUDA"
        raise DuoConfigError(f"needs {need}, and {seen or 'none'} {'is' if seen < 2 else 'are'} "
                             f"visible; run it on a machine that has {'one' if gpus == 1 else 'them'}")


def require_model_dir(path: str, flag: str = "--model") -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        why = "does not exist" if not os.path.exists(path) else "has no config.json"
        raise DuoConfigError(f"{flag} {path!r} {why}; pass a local Hugging Face model folder "
                             f"(config.json, weights, tokenizer)")


def preflight(prog: str, *, model_dir: str | None = None, flag: str = "--model", gpus: int = 1) -> None:
    """For scripts: the CUDA (and model folder) checks, printed as one line with exit code 2."""
    try:
        require_cuda(gpus)
        if model_dir is not None:
            require_model_dir(model_dir, flag)
    except DuoConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
