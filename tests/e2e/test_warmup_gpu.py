"""No Triton compile while serving the first prompts: duo's prefill kernels are compiled in
vLLM's profile run at engine start (GPU).

An engine (the seeded tiny Llama, a mixed mask, vLLM's defaults) counts the compiled variants of
duo's Triton prefill kernels after it starts, then serves a prompt longer than sink + window and
its next turn (a prefix hit: a chunk after cached tokens), and counts again. The gap is the
number of variants compiled while serving: 0. Control: the same engine with the profile-run
warm-up switched off must compile while serving, or the count could not see a compile.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.e2e.reference_model import make_model
from vllm_duo.eval.engine_proc import run_job
from vllm_duo.eval.evidence import check

pytestmark = pytest.mark.gpu
MASK = [[1, 0], [0, 1], [0, 0], [1, 1]]
SINK, RECENT = 16, 64


def compiled_variants() -> int:
    """Compiled variants of duo's Triton prefill kernels in this process (Triton's in-memory cache)."""
    from vllm_duo.ops import prefill

    kernels = [prefill._streaming_prefill_kernel]
    return sum(len(cache[0]) for kernel in kernels for cache in kernel.device_caches.values())


def first_prompts(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: compiled variants after engine start and after a long prompt and its next turn."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker (and its kernel caches) in this process
    if spec["no_warmup"]:
        from vllm_duo.backend.impl import DuoAttentionImpl

        DuoAttentionImpl._compile_window_kernel = lambda *args, **kwargs: None
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["engine"])
    started = compiled_variants()
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    first = [3 + i % 900 for i in range(spec["prompt_tokens"])]
    out = llm.generate([TokensPrompt(prompt_token_ids=first)], params, use_tqdm=False)
    turn = first + list(out[0].outputs[0].token_ids) + [5 + i % 800 for i in range(300)]
    second = llm.generate([TokensPrompt(prompt_token_ids=turn)], params, use_tqdm=False)
    return {"after_start": started, "after_serving": compiled_variants(),
            "second_turn_cached_tokens": second[0].num_cached_tokens}


def test_first_prompts_compile_no_prefill_kernel(tmp_path) -> None:
    model = make_model(str(tmp_path / "tiny_llama"), seed=0)
    engine = dict(load_format="auto", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.08,
                  kv_cache_memory_bytes=2 << 30, seed=0, skip_tokenizer_init=True, attention_backend="duo",
                  additional_config={"duo_attention": {"retrieval_mask": MASK, "sink_size": SINK,
                                                       "recent_size": RECENT, "prefill_recent_size": RECENT}})
    runs = {name: run_job("tests.e2e.test_warmup_gpu:first_prompts",
                          dict(model=model, engine=engine, prompt_tokens=600, no_warmup=name == "cold"))
            for name in ("warm", "cold")}
    assert runs["warm"]["second_turn_cached_tokens"] > 0, "the second turn must resume after cached tokens"
    warm, cold = (runs[n]["after_serving"] - runs[n]["after_start"] for n in ("warm", "cold"))
    check("warmup::first_prompts_compile_no_prefill_kernel",
          "Triton prefill-kernel variants compiled while serving a first long prompt and its next turn",
          "compiled variants after serving - after engine start", 0, warm,
          "the same engine without the profile-run warm-up", cold)
