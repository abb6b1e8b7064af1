"""Evidence rows: what a GPU test compares, its tolerance and gap, and its control's gap.

A test that claims agreement (a gap within a tolerance) also runs a control that must break it
(a gap beyond the tolerance): without that, "passed" could mean the test cannot fail. Each check
writes one row; with ``$VLLM_DUO_EVIDENCE`` set (a JSONL path), rows are appended there, and
``benchmarks/evidence.py`` collects them into ``benchmarks/results/evidence_<date>.json`` and the
summary keys ``evidence_rows`` and ``evidence_all_separated``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

ENV = "VLLM_DUO_EVIDENCE"


@dataclass(frozen=True)
class EvidenceRow:
    test: str  # test id (file::name[param])
    compares: str  # what should agree, e.g. "duo pattern=full vs FLASH_ATTN"
    metric: str  # how the gap is measured, e.g. "max |logprob diff|, teacher-forced"
    tolerance: float
    gap: float
    control: str  # what must break the agreement
    control_gap: float
    device: str

    @property
    def passed(self) -> bool:
        return self.gap <= self.tolerance

    @property
    def separated(self) -> bool:
        return self.control_gap > self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), passed=self.passed, separated=self.separated)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def check(test: str, compares: str, metric: str, tolerance: float, gap: float, control: str,
          control_gap: float) -> EvidenceRow:
    """Record one row, then fail unless the gap is within tolerance and the control beyond it."""
    row = EvidenceRow(test=test, compares=compares, metric=metric, tolerance=float(tolerance),
                      gap=float(gap), control=control, control_gap=float(control_gap),
                      device=device_name())
    path = os.environ.get(ENV)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row.to_dict()) + "\n")
    print(f"evidence {test}: {compares}: gap {gap:.4g} <= {tolerance:.4g}? {row.passed}; "
          f"control ({control}) {control_gap:.4g} > tolerance? {row.separated}")
    assert row.passed, f"{compares}: {metric} {gap:.4g} exceeds the tolerance {tolerance:.4g}"
    assert row.separated, (f"control '{control}' does not separate: {metric} {control_gap:.4g} is "
                           f"within the tolerance {tolerance:.4g}, so this test could not fail")
    return row


def read_rows(path: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a test re-run replaces its earlier row."""
    rows: dict[str, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["test"]] = row
    return list(rows.values())


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"evidence_rows": len(rows),
            "evidence_all_separated": bool(rows) and all(r["separated"] for r in rows),
            "evidence_all_passed": bool(rows) and all(r["passed"] for r in rows)}
