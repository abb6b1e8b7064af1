"""The README's tables are the ones generated from benchmarks/results, and the README stays small (CPU)."""

from __future__ import annotations

import json
import os

import pytest

from vllm_duo.eval.readme_tables import evidence_rows_table, evidence_table, render, results_table, tables

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_readme_tables_are_generated():
    """README.md's and docs/results.md's tables equal what the recorded results generate."""
    for name, generated in tables(os.path.join(ROOT, "benchmarks", "results")).items():
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        assert render(text, generated) == text, f"{name}: tables are stale: run python benchmarks/readme_tables.py"


def test_readme_is_for_users():
    readme = _readme()
    assert len(readme.encode()) <= 12 * 1024  # two vLLM series, the results of both
    for lab_note in ("session", "shared/devkit", "this project's GPU machine", "docs/wip"):
        assert lab_note not in readme


def test_h200_rows_then_cpu_and_other_gpus_as_history():
    entry = dict(date="2026-11-30", source="x.json")
    summary = {"fuzz_cases": dict(entry, value=300, device="cpu", command="benchmarks/fuzz_count.py"),
               "capacity_ratio_llama3_s050": dict(entry, value=1.975, device="NVIDIA H100 80GB HBM3",
                                                  command="benchmarks/capacity.py"),
               "prefill_ratio_128k_s050": dict(entry, value=1.61, device="NVIDIA H200", command="benchmarks/capacity.py"),
               "niah_smollm2": dict(entry, value={"full": 0.8125, "duo_s050": 0.7875}, device="NVIDIA H200",
                                    command="python vllm_duo/cli/main.py niah --samples 2")}
    summary["evidence_rows"] = dict(entry, value=23, device="NVIDIA H200", command="x")  # the evidence table's
    rows = [ln for ln in results_table(summary).splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert ["H200" in r for r in rows] == [True, True, False] and "cpu" in rows[-1]
    assert not any("H100" in r or "23" in r for r in rows)
    assert "**1.61**" in rows[0] and "full 81.2%, duo_s050 78.8%" in rows[1]
    text = results_table(summary)
    assert text.count("`benchmarks/capacity.py`") == 1 and "`vllm-duo niah --samples 2`" in text
    suite = dict(entry, value={"full": {"a": 1.0, "b": 0.5}, "duo_s050": {"a": 0.5, "b": 0.5}},
                 device="NVIDIA H200", command="benchmarks/niah_suite.py")
    assert "full 75%, duo_s050 50%" in results_table({"niah_suite_smollm2": suite})  # per method, format mean
    history = [ln for ln in results_table(summary, "history").splitlines() if ln.startswith("| ")][1:]
    assert len(history) == 1 and "| H100 |" in history[0] and "**1.98**" in history[0]
    control = dict(entry, value=6, device="NVIDIA H200", command="benchmarks/soak_gpu.py --backend FLASH_ATTN")
    summary["soak_gpu_flash_attn_prefix_preemptions"] = control  # FLASH_ATTN's own: docs/results.md only
    assert "FLASH_ATTN" not in results_table(summary)
    assert "**6**" in results_table(summary, "soak") and "H100" not in results_table(summary, "soak")


def _row(test, compares, tol, gap, control_gap, passed=True, separated=True):
    return {"test": test, "compares": compares, "metric": "max |dlogprob|", "tolerance": tol, "gap": gap,
            "control": "wrong mask", "control_gap": control_gap, "device": "NVIDIA H200", "passed": passed,
            "separated": separated}


def test_evidence_tables_from_rows():
    ev = {"rows": [_row("t::a[x]", "duo full vs FA (x)", 0.05, 0.01, 0.9),
                   _row("t::a[y]", "duo full vs FA (y)", 0.02, 0.015, 2.0, separated=False),
                   _row("k::w", "write vs given", 0.0, 0.0, 1.0)],
          "command": "pytest -m gpu", "device": "NVIDIA H200", "date": "2026-11-30"}
    text = evidence_table(ev)  # README: one row per kind of check, worst gap and weakest control
    assert text.startswith("H200, 2026-11-30 (commands and every row: `docs/results.md`)")
    assert "| duo full vs FA | 2 | 0.015 (0.02) | 0.9 (0.05) | yes, no |" in text
    assert "| write vs given | 1 | 0 (0) | 1 (0) | yes, yes |" in text
    rows = evidence_rows_table(ev)  # docs/results.md: every row, under the command
    assert rows.startswith("H200, 2026-11-30: `pytest -m gpu`")
    assert "| t::a[x] | duo full vs FA (x) | max \\|dlogprob\\| | 0.01 (0.05) | wrong mask: 0.9 | yes, yes |" in rows
    assert "No evidence file yet" in evidence_table(None)


def test_kernel_tests_are_one_row_per_kernel():
    ev = {"rows": [_row("tests/kernels/test_pd.py::test_a", "paged_decode vs reference (worst: D64)", 1, 0.3, 90),
                   _row("tests/kernels/test_pd.py::test_fp8", "paged_decode on an fp8 e4m3 cache vs reference", 1, 0.5, 40),
                   _row("tests/kernels/test_wk.py::test_cells", "write_kv cells vs given", 0, 0, 1),
                   _row("t::a[x]", "duo full vs FA (x)", 0.05, 0.01, 0.9)],
          "command": "pytest -m gpu", "device": "NVIDIA H200", "date": "2026-11-30"}
    lines = [line for line in evidence_table(ev).splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert lines == ["| paged_decode kernel tests, bf16 and fp8 caches | 2 | 0.5 (1) | 40 (1) | yes, yes |",
                     "| write_kv kernel tests | 1 | 0 (0) | 1 (0) | yes, yes |",
                     "| duo full vs FA | 1 | 0.01 (0.05) | 0.9 (0.05) | yes, yes |"]


def test_render_needs_markers():
    assert render("a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb", {"x": "new"}) == \
        "a\n<!-- x:begin -->\nnew\n<!-- x:end -->\nb"
    with pytest.raises(ValueError, match="markers"):
        render("no markers", {"x": "new"})


def test_newest_evidence_file_is_used(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({}))
    for date in ("2026-11-01", "2026-11-30"):
        (tmp_path / f"evidence_{date}.json").write_text(json.dumps({"rows": [], "date": date, "device": "d",
                                                                     "command": "c"}))
    assert "2026-11-30" in tables(str(tmp_path))["README.md"]["evidence"]


def test_save_result_records_device_and_command(tmp_path, monkeypatch):
    from vllm_duo.eval import results

    monkeypatch.setattr(results, "RESULTS", str(tmp_path))
    fname = results.save_result("x", {"a": 1}, {"fig": 2.5}, device="NVIDIA H200", command="bash run.sh")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fig"] == {"value": 2.5, "device": "NVIDIA H200", "date": summary["fig"]["date"],
                              "command": "bash run.sh", "source": fname}
    assert json.loads((tmp_path / fname).read_text())["a"] == 1
