"""One engine job in a fresh process (vllm_duo.eval.engine_proc) that also asks every worker rank
for its KV-cache block count and layout (``LLM.collective_rpc``); Ray is stopped afterwards.

Ranks must agree on the number of blocks and, within a TP group, on every slot layer's cache
shape (duo pads slots so all TP ranks report identical specs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from vllm_duo.eval.engine_proc import run_job

JOB = "tests.e2e.ray_run:generate_ranked"


def run_ranked(spec: dict[str, Any], log_path: str | None = None, timeout: float = 1500) -> dict[str, Any]:
    """spec: as :func:`vllm_duo.eval.agreement.generate_and_score` (engine: ``LLM`` kwargs over
    agreement's defaults), optional name (a log header). The result adds ``num_gpu_blocks``, ``ranks``."""
    from vllm_duo.eval.agreement import ENGINE

    engine = dict(ENGINE)
    engine.update(spec.get("engine", {}))
    try:
        return run_job(JOB, dict(spec, engine=engine), log_path=log_path, timeout=timeout,
                       header=spec.get("name"))
    finally:
        if engine.get("distributed_executor_backend") == "ray":
            ray_stop()


def ray_stop() -> None:
    """``ray stop --force`` (devkit: an engine started after a Ray run once hung without it);
    through the module because the ``ray`` console script may not be installed."""
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                   capture_output=True, text=True, timeout=120)


def rank_probe():
    """A function for ``collective_rpc``; built in a closure so cloudpickle ships it by value
    (a Ray worker need not be able to import this module)."""

    def probe(worker) -> dict[str, Any]:
        import torch

        ctx = worker.vllm_config.compilation_config.static_forward_context
        layout = sorted([name, list(layer.kv_cache.shape)] for name, layer in ctx.items()
                        if isinstance(getattr(layer, "kv_cache", None), torch.Tensor) and layer.kv_cache.numel())
        mode = worker.vllm_config.compilation_config.cudagraph_mode
        return {"rank": getattr(worker, "rank", None), "num_gpu_blocks": worker.cache_config.num_gpu_blocks,
                "layout": layout, "cudagraph_mode": getattr(mode, "name", str(mode))}

    return probe


def generate_ranked(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: :func:`vllm_duo.eval.agreement.generate_and_score` (greedy tokens with logprobs, then
    teacher-forced scores), plus every rank's probe. ``env`` is set before vLLM is imported (Ray's
    workers inherit it)."""
    os.environ.update(spec.get("env", {}))
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc sends the probe by cloudpickle
    from vllm import LLM

    from vllm_duo.eval.agreement import run_on

    llm = LLM(model=spec["model"], **spec["engine"])
    return dict(run_on(llm, spec), num_gpu_blocks=llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
                ranks=llm.collective_rpc(rank_probe()))
