"""Evidence for the kernel tests: one row per test function, aggregated over its parametrizations.

Each agreement check calls the ``evidence`` fixture with its gap and its control's gap; the call
asserts at once (gap <= tolerance, control beyond it). At the end of the session every test
function's worst gap and weakest control go through ``vllm_duo.eval.evidence.check`` (which
writes to ``$VLLM_DUO_EVIDENCE``), so a parametrized test gives one row, not dozens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vllm_duo.eval import evidence as ev


@dataclass
class _Row:
    compares: str
    metric: str
    tolerance: float
    gap: float = float("-inf")
    worst: str = ""
    control_gap: float = float("inf")
    weakest: str = ""
    controls: list[str] = field(default_factory=list)


_ROWS: dict[str, _Row] = {}


class Evidence:
    """Bound to one test function (its node id without the parametrization)."""

    def __init__(self, test: str) -> None:
        self.test = test

    def __call__(self, compares: str, metric: str, gap: float, control: str, control_gap: float,
                 tolerance: float = 1.0, label: str = "") -> None:
        row = _ROWS.setdefault(self.test, _Row(compares, metric, tolerance))
        where = f" [{label}]" if label else ""
        if gap > row.gap:
            row.gap, row.worst = gap, label
        if control not in row.controls:
            row.controls.append(control)
        if control_gap < row.control_gap:
            row.control_gap, row.weakest = control_gap, f"{control}{where}"
        assert gap <= tolerance, f"{compares}{where}: {metric}: {gap:.4g} > {tolerance:.4g}"
        assert control_gap > tolerance, (
            f"control '{control}'{where} does not separate: {control_gap:.4g} <= {tolerance:.4g}, "
            "so this check could not fail")


@pytest.fixture
def evidence(request) -> Evidence:
    return Evidence(request.node.nodeid.split("[")[0])


@pytest.fixture(scope="session", autouse=True)
def _write_evidence_rows():
    yield
    for test, row in _ROWS.items():
        control = f"each of: {'; '.join(row.controls)}; weakest: {row.weakest}"
        compares = row.compares + (f" (worst: {row.worst})" if row.worst else "")
        try:
            ev.check(test, compares, row.metric, row.tolerance, row.gap, control, row.control_gap)
        except AssertionError:
            pass  # the test that measured it has already failed with the details
    _ROWS.clear()
