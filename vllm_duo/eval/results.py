"""Where evaluation results go: an output folder, and (when recorded) benchmarks/results/.

On the GPU machine only the files under ``$OUT`` come back, so a recorded result is also
copied there next to the merged ``summary.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from vllm_duo.errors import DuoConfigError
from vllm_duo.eval.engine_proc import ROOT


def default_out(name: str) -> str:
    """``$OUT/<name>`` on the GPU machine (its files come back), else ``./<name>_out``."""
    return os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else f"{name}_out"


def write_json(path: str, payload: dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def record(name: str, payload: dict[str, Any], figures: dict[str, Any], out_dir: str) -> str:
    """``benchmarks.summary.save_result`` (repo checkout needed), copied into ``out_dir``."""
    if not os.path.isfile(os.path.join(ROOT, "benchmarks", "summary.py")):
        raise DuoConfigError(f"recording needs the repository checkout (benchmarks/summary.py under {ROOT}); "
                             f"run from the repo root with PYTHONPATH=$PWD, or leave out the record option")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks.summary import RESULTS, save_result

    fname = save_result(name, payload, figures)
    os.makedirs(out_dir, exist_ok=True)
    for f in (fname, "summary.json"):
        shutil.copy(os.path.join(RESULTS, f), os.path.join(out_dir, f))
    return os.path.join(RESULTS, fname)
