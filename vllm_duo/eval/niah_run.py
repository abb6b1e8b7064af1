"""``vllm-duo niah``'s runs: one engine per method over the same prompts, scored and plotted.

Each engine runs in its own process (:mod:`vllm_duo.eval.engine_proc`); prompts, pass keys and
scoring are :mod:`vllm_duo.eval.niah`. The CLI parses options, prints and records.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from vllm_duo.eval.methods import Method
from vllm_duo.eval.niah import NiahPrompt, cell_record, grid_summary, plot_grid


def run_methods(model: str, methods: list[Method], prompts: list[tuple[int, NiahPrompt]], codec: Any,
                lengths: list[int], depths: list[float], engine_base: dict[str, Any], *, max_tokens: int,
                out_dir: str, log_path: str, echo: bool, timeout: float, caption: str) -> dict[str, Any]:
    """Method name -> its grid summary, cells and heatmap PNG (in ``out_dir``), or its error."""
    from tqdm import tqdm

    from vllm_duo.eval import engine_proc

    results: dict[str, Any] = {}
    for m in tqdm(methods, desc="niah methods", unit="engine"):
        engine = dict(engine_base, **m.engine_kwargs())
        spec = dict(model=model, engine=engine, prompts=[p.ids for _, p in prompts],
                    max_tokens=max_tokens, use_tqdm=True)
        t0 = time.perf_counter()
        try:
            res = engine_proc.run_job("vllm_duo.eval.engine_proc:generate", spec, log_path=log_path, echo=echo,
                                      timeout=timeout, header=f"niah {m.name}")
        except engine_proc.EngineJobError as e:
            tqdm.write(f"niah: {m.name} failed: {str(e)[-1500:]}", file=sys.stderr)
            results[m.name] = {"engine": engine, "error": str(e)[-4000:]}
            continue
        cells = [cell_record(p, s, codec.decode(toks)) for (s, p), toks in zip(prompts, res["tokens"])]
        summary = grid_summary(cells, lengths, depths)
        png = os.path.join(out_dir, f"niah_{m.name}.png")
        plot_grid(summary["grid"], lengths, depths, png,
                  f"{m.name}: {summary['accuracy']:.1%} ({summary['correct']}/{summary['total']})\n{caption}")
        results[m.name] = dict(summary, engine=engine, seconds=round(time.perf_counter() - t0, 1),
                               generate_seconds=res.get("generate_seconds"), png=os.path.basename(png),
                               cells=cells)
        tqdm.write(f"niah: {m.name}: accuracy {summary['accuracy']:.1%}")
    return results
