"""Where evaluation results go: an output folder, result JSON files and ``summary.json``.

Recorded results land in the results folder (``$VLLM_DUO_RESULTS``, else the checkout's
``benchmarks/results`` when the package runs from one, else ``./benchmarks/results``), each
with its command, device and date; ``summary.json`` collects the named figures. On the GPU
machine only the files under ``$OUT`` come back, so :func:`record` also copies them there.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import sys
from typing import Any

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _results_dir() -> str:
    if os.environ.get("VLLM_DUO_RESULTS"):
        return os.environ["VLLM_DUO_RESULTS"]
    in_checkout = os.path.join(_CHECKOUT, "benchmarks", "results")
    return in_checkout if os.path.isdir(in_checkout) else os.path.abspath(os.path.join("benchmarks", "results"))


RESULTS = _results_dir()


def default_out(name: str) -> str:
    """``$OUT/<name>`` on the GPU machine (its files come back), else ``./<name>_out``."""
    return os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else f"{name}_out"


def write_json(path: str, payload: dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    return path


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def save_result(name: str, payload: dict[str, Any], figures: dict[str, Any], device: str | None = None,
                command: str | None = None) -> str:
    """Write ``RESULTS/<name>_<date>.json`` and merge ``figures`` into ``RESULTS/summary.json``.

    ``device`` / ``command``: where and by what the figures were measured, when that is not this
    machine and this process (results collected here from the GPU machine's files).
    """
    os.makedirs(RESULTS, exist_ok=True)
    date = datetime.date.today().isoformat()
    device = device or device_name()
    fname = f"{name}_{date}.json"
    payload = dict(payload, command=command or command_line(), device=device, date=date)
    write_json(os.path.join(RESULTS, fname), payload)
    summary_path = os.path.join(RESULTS, "summary.json")
    summary = read_summary(summary_path)
    for key, value in figures.items():
        summary[key] = {"value": value, "device": device, "date": date,
                        "command": payload["command"], "source": fname}
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    return fname


def beside(fname: str, suffix: str = ".png") -> str:
    """The path of a file that goes with result ``fname`` (its chart), in the results folder."""
    return os.path.join(RESULTS, fname.removesuffix(".json") + suffix)


def read_summary(path: str | None = None) -> dict[str, Any]:
    path = path or os.path.join(RESULTS, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record(name: str, payload: dict[str, Any], figures: dict[str, Any], out_dir: str) -> str:
    """:func:`save_result`, with the result and ``summary.json`` also copied into ``out_dir``."""
    fname = save_result(name, payload, figures)
    os.makedirs(out_dir, exist_ok=True)
    for f in (fname, "summary.json"):
        shutil.copy(os.path.join(RESULTS, f), os.path.join(out_dir, f))
    return os.path.join(RESULTS, fname)
