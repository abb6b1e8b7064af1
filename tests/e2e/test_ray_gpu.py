"""Duo through Ray: tensor parallel 2 and pipeline parallel 2 against one GPU (marked gpu, 2 GPUs).

The Llama-3-8B attention layout with seeded weights where attention matters
(tests/e2e/reference_model.py; saved weights, so TP=1 and TP=2 load the same model), a mixed mask
at 50 %, eager; then TP=2 with vLLM's default compile + CUDA graphs (VARIANTS). TP=2 / PP=2
tokens are scored by teacher forcing in the TP=1 engine of the same backend; FLASH_ATTN's own
TP=2 / PP=2 gap calibrates the tolerance; the control is FLASH_ATTN's TP=2 tokens scored by duo
(all-retrieval vs mixed). Duo's prefill window is its decode window (PREFILL_W), so the scoring
prefill computes what decode computed: with the default 8,192-token prefill window every prompt
here prefills densely, duo's score of a sequence equals FLASH_ATTN's, and neither the check nor
its control could fail (seen on an H200 pair, 2026-12-01). Every worker rank must report the same
number of KV blocks (and, within TP, identical slot caches).
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

from tests.e2e.ray_run import run_ranked
from tests.e2e.reference_model import LAYOUTS, make_model
from vllm_duo.eval import agreement
from vllm_duo.eval.evidence import check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed"),
]

LENGTHS = [100, 700, 2500, 6000]
STEPS = 32
PARALLEL = {"tp2": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"},
            "pp2": {"pipeline_parallel_size": 2, "distributed_executor_backend": "ray"}}
MASK = [[(layer + head) % 2 for head in range(8)] for layer in range(2)]
SINK, RECENT = 64, 256
PREFILL_W = RECENT  # streaming heads see sink + RECENT keys in prefill (scoring) as in decode
DUO_OPTIONS = {"retrieval_mask": MASK, "sink_size": SINK, "recent_size": RECENT, "prefill_recent_size": PREFILL_W}
BACKENDS = {"FLASH_ATTN": {"attention_backend": "FLASH_ATTN"},
            "duo": {"attention_backend": "duo", "additional_config": {"duo_attention": DUO_OPTIONS}}}
GRAPH_START_S = 300  # an engine start with torch.compile and graph capture, over Ray
METRIC = "max over requests of mean |logprob diff| over generated tokens, teacher-forced in the TP=1 engine"


def check_ranks(result: dict, world: int, same_layout: bool) -> None:
    ranks = result["ranks"]
    assert len(ranks) == world, ranks
    blocks = {r["num_gpu_blocks"] for r in ranks}
    assert len(blocks) == 1 and blocks.pop() > 0, [r["num_gpu_blocks"] for r in ranks]
    if same_layout:
        assert all(r["layout"] == ranks[0]["layout"] for r in ranks), "TP ranks hold different KV caches"


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 32000) for _ in range(n)] for n in LENGTHS]


def _score_on_one_gpu(model: str, prompts: list[list[int]], runs: dict, keys: dict[str, list[str]]) -> dict:
    """Both backends' TP=1 engines at once (one GPU each), each scoring, teacher-forced, the
    runs named in ``keys[backend]``."""
    one = {backend: dict(model=model, prompts=prompts, max_tokens=STEPS,
                         score={k: agreement.scored_sequences(prompts, runs[k]) for k in keys[backend]},
                         engine=dict(agreement.ENGINE, enforce_eager=True, **engine),
                         env={"CUDA_VISIBLE_DEVICES": str(i)})
           for i, (backend, engine) in enumerate(BACKENDS.items())}
    return agreement.run_parallel(one, workers=2, log_dir=os.environ.get("VLLM_DUO_ENGINE_LOGS"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Ray runs one after another (each takes both GPUs), then both TP=1 engines at once (one
    GPU each), each scoring its backend's Ray runs and FLASH_ATTN's TP=2 run."""
    model = make_model(str(tmp_path_factory.mktemp("llama3_layout")), seed=0, **LAYOUTS["llama3"])
    prompts = _prompts(0)
    log = os.path.join(os.environ["OUT"], "ray_engines.log") if os.environ.get("OUT") else None
    done = {}
    for backend, engine in BACKENDS.items():
        for name, parallel in PARALLEL.items():
            done[f"{backend}/{name}"] = run_ranked(
                dict(model=model, prompts=prompts, max_tokens=STEPS, name=f"{backend} {name}",
                     engine=dict(engine, enforce_eager=True, **parallel)), log_path=log)
    keys = {b: [k for k in done if k.startswith(b)] + ["FLASH_ATTN/tp2"] for b in BACKENDS}
    tp1 = _score_on_one_gpu(model, prompts, done, keys)
    done.update({f"{backend}/tp1": r for backend, r in tp1.items()})
    return dict(done, prompts=prompts)


def _gap(runs: dict, gen: str, scorer: str) -> float:
    return agreement.gap(runs["prompts"], runs[gen], runs[scorer]["scores"][gen])


@pytest.mark.parametrize("name", list(PARALLEL))
def test_ray_parallel_agrees_with_one_gpu(runs, name) -> None:
    check_ranks(runs[f"duo/{name}"], 2, same_layout=name == "tp2")
    check_ranks(runs[f"FLASH_ATTN/{name}"], 2, same_layout=name == "tp2")
    calibration = _gap(runs, f"FLASH_ATTN/{name}", "FLASH_ATTN/tp1")
    check(f"ray::{name}_equals_tp1[duo]", f"duo {name.upper()} over Ray vs duo on one GPU", METRIC,
          agreement.tolerance(calibration), _gap(runs, f"duo/{name}", "duo/tp1"),
          "FLASH_ATTN TP=2 tokens scored by duo TP=1", _gap(runs, "FLASH_ATTN/tp2", "duo/tp1"))


# Engine overrides per variant, all at TP=2 over Ray with torch.compile + FULL_AND_PIECEWISE.
# On an H200 pair (NVLink multicast off) FLASH_ATTN itself did not start with vLLM 0.26's defaults:
# CUBLAS_STATUS_EXECUTION_FAILED in the first compiled forward, V2 and V1 model runners, custom
# all-reduce on or off (benchmarks/results/ray_tp2_fa_graph_capture_failure_2026-11-30.log). With
# FlashInfer's fused all-reduce + RMSNorm pass off (on by default at TP > 1 on Hopper; only a
# compiled model runs it) it started (2026-12-01). The test skips a variant where FLASH_ATTN fails.
NO_AR_FUSION = {"compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}
VARIANTS = {"defaults": {},
            "no_ar_fusion": NO_AR_FUSION,
            "no_ar_fusion_no_custom_ar": dict(NO_AR_FUSION, disable_custom_all_reduce=True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_default_graphs_agree_with_one_gpu(tmp_path, variant) -> None:
    """Duo at TP=2 over Ray with compile and CUDA graphs starts with full decode graphs on every
    rank and agrees with duo on one GPU, by the logprob test (FLASH_ATTN's own TP=2-graphs gap
    calibrates; control: FLASH_ATTN's TP=2 tokens scored by duo). Skips where FLASH_ATTN itself
    does not start so (in that variant)."""
    from vllm_duo.eval.engine_proc import EngineJobError

    model = make_model(str(tmp_path / "llama3_layout"), seed=0, **LAYOUTS["llama3"])
    prompts = _prompts(1)
    log = os.path.join(os.environ["OUT"], "ray_graph_engines.log") if os.environ.get("OUT") else None
    done = {}
    for backend, engine in BACKENDS.items():
        spec = dict(model=model, prompts=prompts, max_tokens=STEPS, name=f"{backend} tp2 graphs, {variant}",
                    engine=dict(engine, **PARALLEL["tp2"], **VARIANTS[variant]))
        try:  # bounded: on an H200 pair a start once ran past a 10-minute device call without a word
            done[backend] = run_ranked(spec, log_path=log, timeout=GRAPH_START_S)
        except EngineJobError as e:
            if backend == "FLASH_ATTN":
                pytest.skip(f"FLASH_ATTN itself does not start at TP=2 with graphs ({variant}) here: "
                            f"{str(e).splitlines()[0]}")
            raise
    assert {r["cudagraph_mode"] for r in done["duo"]["ranks"]} == {"FULL_AND_PIECEWISE"}, done["duo"]["ranks"]
    check_ranks(done["duo"], 2, same_layout=True)
    tp1 = _score_on_one_gpu(model, prompts, done, {backend: list(done) for backend in BACKENDS})

    def gap(gen: str, scorer: str) -> float:
        return agreement.gap(prompts, done[gen], tp1[scorer]["scores"][gen])

    check(f"ray::tp2_graphs_equals_tp1[duo,{variant}]",
          f"duo TP2 over Ray, compile + CUDA graphs ({variant}), vs duo on one GPU",
          METRIC, agreement.tolerance(gap("FLASH_ATTN", "FLASH_ATTN")), gap("duo", "duo"),
          "FLASH_ATTN TP=2 tokens scored by duo TP=1", gap("FLASH_ATTN", "duo"))
