"""The README's results and evidence tables, generated from the recorded results so they cannot drift.

``summary.json`` gives the figures table (H200 first, then CPU; older GPUs' figures and FLASH_ATTN's
control figures go to docs/results.md);
the newest ``evidence_<date>.json`` (:mod:`vllm_duo.eval.evidence`) gives the README's evidence
summary (one row per kind of check) and docs/results.md's table of every row. Each table sits
between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any

# Figure key -> what it measures (the README's wording). Unknown keys are shown by key.
LABELS = {
    "short_prompt_ratio_1k_b64": "output throughput vs FLASH_ATTN, 1K-token prompts, 128 out, batch 64",
    "short_prompt_ratio_1k_b64_vllm033": "same, on vLLM 0.33 / torch 2.14",
    "vllm033_evidence_all_passed": "vLLM 0.33: GPU kernel + model agreement tests pass, controls separate",
    "capacity_ratio_llama3_s050": "64K requests decoding at once vs FLASH_ATTN, Llama-3-8B, 50%",
    "capacity_ratio_llama2_s075": "64K requests held vs FLASH_ATTN, Llama-2-7B, 75% (vLLM's computed max concurrency)",
    "capacity_ratio_llama3_s050_prefix": "same run: prefix caching on in both",
    "capacity_ratio_llama3_s050_fp8": "KV tokens, duo fp8 vs FLASH_ATTN bf16, Llama-3-8B, 50%",
    "capacity_ratio_llama3_s075_fp8": "same, 75%",
    "capacity_ratio_llama3_s050_rswa": "KV capacity, Llama-3-8B, 50%, `streaming_prefill=\"rswa\"`",
    "capacity_ratio_llama2_s075_rswa": "KV capacity, Llama-2-7B, 75%, `streaming_prefill=\"rswa\"`",
    "decode_kernel_ratio_64k_b16_s050": "decode kernel time / FA3, 64K, batch 16, 50% (lower: better)",
    "decode_kernel_ratio_64k_b16_s075": "decode kernel time / FA3, 64K, batch 16, 75%",
    "decode_kernel_ratio_64k_b16_s000": "decode kernel time / FA3, 64K, batch 16, every head retrieval",
    "prefill_attn_ratio_128k_s050": "prefill attention speed-up, a Llama-3-8B layer, 128K, 50%",
    "prefill_ratio_128k_s050": "prefill speed-up, Llama-3-8B shape, 128K, 50%",
    "prefill_ratio_256k_s050": "prefill speed-up, Llama-3-8B shape, 256K, 50%",
    "max_context_tokens_verified": "longest request completed, tokens, Llama-3-8B shape, duo 50%",
    "max_context_tokens_fa_admissible": "FLASH_ATTN's longest admissible request, same GPU and settings",
    "max_context_tokens_verified_fp8": "same, fp8 KV cache",
    "max_context_tokens_fa_admissible_fp8": "FLASH_ATTN's longest admissible, fp8 KV cache",
    "max_context_tokens_duo_s050": "KV tokens for one request, Llama-3-8B, 50% (vLLM's computed max_model_len; not run)",
    "e2e_decode_ratio_64k_s050": "decode throughput vs FLASH_ATTN, 64K requests, largest batch each fits",
    "e2e_decode_ratio_64k_s050_fp8": "same, fp8 KV in both",
    "niah_suite_smollm2": "retrieval suite, SmolLM2-135M, 10 formats x 40 prompts (mean of formats)",
    "niah_smollm2": "NIAH accuracy, SmolLM2-135M, 1K-8K x 5 depths x 4",
    "niah_smollm2_fp8": "same grid, fp8 KV cache in every method",
    "server_load_errors": "`vllm serve` under load (64 clients, 120 s): errors",
    "server_load_exact_match_rate": "`vllm serve` under load: answers = one-at-a-time greedy",
    "server_load_p99_latency_s": "`vllm serve` under load: p99 latency (s)",
    "soak_gpu_leaked_blocks": "GPU soak, 1,000 requests, 10% aborted: leaked KV blocks",
    "soak_gpu_alone_match_rate": "GPU soak: same greedy tokens when re-run alone",
    "soak_gpu_preemptions": "GPU soak: preemptions",
    "soak_gpu_prefix_leaked_blocks": "GPU soak, prefix caching, shared prefixes: leaked KV blocks",
    "soak_gpu_prefix_alone_match_rate": "same soak: same greedy tokens when re-run alone",
    "soak_gpu_prefix_preemptions": "same soak: preemptions",
    "soak_gpu_flash_attn_prefix_leaked_blocks": "same soak on FLASH_ATTN (control): leaked KV blocks",
    "soak_gpu_flash_attn_prefix_alone_match_rate": "same soak on FLASH_ATTN: same greedy tokens re-run alone",
    "soak_gpu_flash_attn_prefix_preemptions": "same soak on FLASH_ATTN: preemptions",
    "soak_leaked_blocks": "soak on vLLM's real scheduler: leaked KV blocks",
    "fuzz_cases": "bad inputs refused with a clear message (cases)",
    "mixed_traffic_ratio": "output throughput vs FLASH_ATTN, mixed traffic (64..32K prompts)",
    "chat_throughput_ratio": "multi-turn chat throughput vs FLASH_ATTN, prefix caching on",
    "chat_ttft_p50_ratio": "multi-turn chat TTFT p50, FLASH_ATTN / duo",
    "prefix_hit_ratio_vs_fa": "prefix-cache hits vs FLASH_ATTN, multi-turn chat",
}
_ORDER = {k: i for i, k in enumerate(LABELS)}
# The GPU soaks, duo's beside FLASH_ATTN's control run: read together, in docs/results.md.
SOAK_FIGURES = {f"soak_gpu_{who}prefix_{what}" for who in ("", "flash_attn_")
                for what in ("leaked_blocks", "alone_match_rate", "preemptions")}
EVIDENCE_PREFIX = "evidence_"  # summarised by the evidence table, not the figures table


def _device_rank(device: str) -> int:
    """H200 first, other GPUs next (history), CPU last."""
    return 0 if "H200" in device else 2 if device.lower() == "cpu" else 1


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):  # method -> per-case
        # math.fsum: the same digits on every Python (3.12's sum() compensates, 3.11's does not)
        return ", ".join(f"{k} {_value(100 * math.fsum(x.values()) / len(x))}%" for k, x in v.items() if x)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x * 100 if isinstance(x, float) and x <= 1 else x)}%" for k, x in v.items())
    return str(v)


def _device(device: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "H100" (the full name is in summary.json)."""
    return re.sub(r" \d+GB.*$", "", device.removeprefix("NVIDIA "))


def _command(cmd: str) -> str:
    """The command as a user would type it (``vllm_duo/cli/main.py X`` is ``vllm-duo X``)."""
    return re.sub(r"^(python )?vllm_duo/cli/main\.py\b", "vllm-duo", cmd.strip()).replace("|", "\\|")


def _part(key: str, device: str) -> str:
    """Where a figure is shown: the README ("readme": the H200's and the CPU's), or in
    docs/results.md the "history" (older GPUs) or the "soak" (the GPU soaks, duo's with FLASH_ATTN's
    control run, whose re-run match rate says how to read duo's)."""
    if key in SOAK_FIGURES:
        return "soak"
    return "history" if _device_rank(device) == 1 else "readme"


def results_table(summary: dict[str, Any], part: str = "readme") -> str:
    """Markdown: one row per figure of ``part`` (see :func:`_part`; its key in summary.json:
    docs/results.md); commands listed once below, numbered."""
    keys = sorted((k for k in summary if not k.startswith(EVIDENCE_PREFIX) and _part(k, summary[k]["device"]) == part),
                  key=lambda k: (_device_rank(summary[k]["device"]), summary[k]["device"],
                                 _ORDER.get(k, len(_ORDER)), k))
    commands: list[str] = []
    lines = ["| figure | value | device | date | command |", "|---|---|---|---|---|"]
    for k in keys:
        e = summary[k]
        cmd = _command(e["command"])
        if cmd not in commands:
            commands.append(cmd)
        lines.append(f"| {LABELS.get(k, k)} | **{_value(e['value'])}** | {_device(e['device'])} | {e['date']} | "
                     f"[{commands.index(cmd) + 1}] |")
    lines.append("")
    lines += [f"{i}. `{c}`" for i, c in enumerate(commands, 1)]
    return "\n".join(lines)


def newest_evidence(results_dir: str) -> str | None:
    found = sorted(glob.glob(os.path.join(results_dir, "evidence_*.json")))
    return found[-1] if found else None


def _family(compares: str) -> str:
    """A check's kind: its ``compares`` without the trailing "(model / worst case)" detail."""
    return re.sub(r"\s*\([^()]*\)$", "", compares)


def _label(compares: list[str]) -> str:
    """One test's kind over its parametrizations: what their ``compares`` share, cut at a clause."""
    if len(set(compares)) == 1:
        return _family(compares[0])
    prefix = os.path.commonprefix(compares)
    cut = max(prefix.rfind(", "), prefix.rfind(" ("))
    return prefix[:cut] if cut > 0 else prefix


def _over_tolerance(gap: float, tolerance: float) -> float:
    return gap / tolerance if tolerance > 0 else (0.0 if gap <= 0 else float("inf"))


def _caption(evidence: dict[str, Any], command: bool = True) -> str:
    where = f"{_device(str(evidence.get('device')))}, {evidence.get('date')}"
    return f"{where}: `{_command(str(evidence.get('command', '')))}`" if command else \
        f"{where} (commands and every row: `docs/results.md`)"


KERNEL_TESTS = "tests/kernels/"


def _kind(rows: list[dict[str, Any]]) -> str:
    """The README's name for a group: a kernel's tests under one name (the op, the first word
    of what they compare; "bf16 and fp8" when some ran on fp8 caches), else the shared check."""
    if str(rows[0]["test"]).startswith(KERNEL_TESTS):
        op = str(rows[0]["compares"]).split()[0]
        fp8 = any("fp8" in str(r["compares"]) for r in rows)
        return f"{op} kernel tests" + (", bf16 and fp8 caches" if fp8 else "")
    return _label([str(r["compares"]) for r in rows])


def evidence_table(evidence: dict[str, Any] | None) -> str:
    """README: one row per kind of check (per kernel for the kernel tests), its worst gap and
    weakest control (every row: docs/results.md)."""
    if not evidence:
        return ("No evidence file yet: the GPU tests write rows with `VLLM_DUO_EVIDENCE=FILE pytest -m gpu`, "
                "then `python benchmarks/evidence.py FILE` (docs/gpu-runs.md).")
    by_test: dict[str, list[dict[str, Any]]] = {}
    for r in evidence.get("rows", []):
        test = str(r["test"])
        by_test.setdefault(test.split("::")[0] if test.startswith(KERNEL_TESTS) else test.split("[")[0],
                           []).append(r)
    families: dict[str, list[dict[str, Any]]] = {}
    for rows in by_test.values():
        families.setdefault(_kind(rows), []).extend(rows)
    lines = [_caption(evidence, command=False), "",
             "| check | rows | worst gap (its tolerance) | weakest control's gap | all passed, separated |",
             "|---|---|---|---|---|"]
    for name, rows in families.items():
        worst = max(rows, key=lambda r: _over_tolerance(r["gap"], r["tolerance"]))
        weakest = min(rows, key=lambda r: _over_tolerance(r["control_gap"], r["tolerance"]))
        ok = f"{_value(all(r['passed'] for r in rows))}, {_value(all(r['separated'] for r in rows))}"
        cells = [name, len(rows), f"{_value(worst['gap'])} ({_value(worst['tolerance'])})",
                 f"{_value(weakest['control_gap'])} ({_value(weakest['tolerance'])})", ok]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def evidence_rows_table(evidence: dict[str, Any] | None) -> str:
    """docs/results.md: every evidence row, with its metric and control."""
    if not evidence:
        return "No evidence file yet."
    lines = [_caption(evidence), "",
             "| test | compares | metric | gap (tolerance) | control: its gap | passed, separated |",
             "|---|---|---|---|---|---|"]
    for r in evidence.get("rows", []):
        cells = [r.get("test"), r.get("compares"), r.get("metric"),
                 f"{_value(r.get('gap'))} ({_value(r.get('tolerance'))})",
                 f"{r.get('control')}: {_value(r.get('control_gap'))}",
                 f"{_value(r.get('passed'))}, {_value(r.get('separated'))}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def tables(results_dir: str) -> dict[str, dict[str, str]]:
    """File (relative to the checkout) -> marker name -> generated markdown, from ``results_dir``."""
    with open(os.path.join(results_dir, "summary.json")) as f:
        summary = json.load(f)
    path = newest_evidence(results_dir)
    evidence = None
    if path:
        with open(path) as f:
            evidence = json.load(f)
    return {"README.md": {"results": results_table(summary), "evidence": evidence_table(evidence)},
            os.path.join("docs", "results.md"): {"evidence-rows": evidence_rows_table(evidence),
                                                 "results-history": results_table(summary, "history"),
                                                 "results-soak": results_table(summary, "soak")}}


def render(readme: str, generated: dict[str, str]) -> str:
    """``readme`` with each marked block replaced by its generated table."""
    for name, body in generated.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in readme or end not in readme:
            raise ValueError(f"README has no {begin} ... {end} markers")
        head, rest = readme.split(begin, 1)
        readme = f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"
    return readme
