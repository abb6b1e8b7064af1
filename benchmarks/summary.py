"""Shared bookkeeping for benchmarks: result JSON files and ``results/summary.json``."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from typing import Any

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def save_result(name: str, payload: dict[str, Any], figures: dict[str, Any], device: str | None = None,
                command: str | None = None) -> str:
    """Write results/<name>_<date>.json and merge ``figures`` into results/summary.json.

    ``device`` / ``command``: where and by what the figures were measured, when that is not this
    machine and this process (results collected here from the GPU machine's files)."""
    os.makedirs(RESULTS, exist_ok=True)
    date = datetime.date.today().isoformat()
    device = device or device_name()
    fname = f"{name}_{date}.json"
    payload = dict(payload, command=command or command_line(), device=device, date=date)
    with open(os.path.join(RESULTS, fname), "w") as f:
        json.dump(payload, f, indent=2)
    summary_path = os.path.join(RESULTS, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    for key, value in figures.items():
        summary[key] = {"value": value, "device": device, "date": date,
                        "command": payload["command"], "source": fname}
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return fname
