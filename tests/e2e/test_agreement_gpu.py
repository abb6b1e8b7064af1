"""Model-scale agreement on weights where attention drives the output (GPU).

Four attention layouts (Llama-3-8B GQA, Llama-2-7B MHA, Mistral-7B, Qwen2-7B: heads, KV heads,
head_dim and rope kept; 2 layers, narrow MLP) with seeded weights scaled so attention matters
(tests/e2e/reference_model.py). Every comparison is a teacher-forced logprob gap
(vllm_duo/eval/agreement.py) with a tolerance calibrated by FLASH_ATTN against itself, and a
control that must break it. Each test writes an evidence row (vllm_duo/eval/evidence.py).

All engines of the module start in one fixture, four at a time, with torch.compile and CUDA
graphs on (vLLM's defaults).
"""

from __future__ import annotations

import os
import random

import pytest

from tests.e2e.reference_model import LAYOUTS, forward_logprobs, load, make_model
from vllm_duo.eval import agreement
from vllm_duo.eval.evidence import check

pytestmark = pytest.mark.gpu
PROMPT_LENS = (100, 700, 2500, 6000)
SHORT_LENS = (50, 120, 200, 250)  # + 32 generated tokens < sink + recent = 320
STEPS = 32
# The windowed runs pin the prefill window to the recent window: below the default (8192) the
# 100..6000-token prompts would prefill densely and never slide the window kernel.
PREFILL_W = 256
METRIC = "max over requests of mean |logprob diff| over generated tokens, teacher-forced"


def mixed_mask(layout: str) -> list[list[int]]:
    cfg = LAYOUTS[layout]
    return [[(layer + head) % 2 for head in range(cfg["num_key_value_heads"])]
            for layer in range(cfg["num_hidden_layers"])]


def _prompts(lengths, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 32000) for _ in range(n)] for n in lengths]


PROMPTS = _prompts(PROMPT_LENS, 0)
SHORT = _prompts(SHORT_LENS, 1)
BOTH = SHORT + PROMPTS
WITH_SHORT = ("fa", "duo_streaming")  # runs that also generate from the short prompts


def prompts_of(gen: str) -> list[list[int]]:
    return BOTH if gen in WITH_SHORT else PROMPTS


def _duo(**options) -> dict:
    return dict(agreement.ENGINE, attention_backend="duo", additional_config={"duo_attention": options})


def _fp8(engine: dict) -> dict:
    return dict(engine, kv_cache_dtype="fp8")


def _jobs(models: dict[str, str]) -> tuple[dict, dict]:
    """Generating engines (phase 1), then scoring engines (phase 2) that score phase 1's tokens."""
    gen, score = {}, {}
    for layout, model in models.items():
        base = dict(model=model, prompts=PROMPTS, max_tokens=STEPS)
        gen[f"{layout}/duo_full"] = dict(base, engine=_duo(pattern="full"))
        gen[f"{layout}/duo_mixed"] = dict(base, engine=dict(
            _duo(retrieval_mask=mixed_mask(layout), prefill_recent_size=PREFILL_W), max_num_batched_tokens=256))
        score[f"{layout}/fa"] = dict(base, prompts=BOTH, engine=dict(agreement.ENGINE,
                                                                   attention_backend="FLASH_ATTN"))
    llama3 = models["llama3"]
    gen["llama3/duo_streaming"] = dict(model=llama3, prompts=BOTH, max_tokens=STEPS,
                                       engine=_duo(pattern="streaming", prefill_recent_size=PREFILL_W))
    # Whole prompts in one step (every chunk starts at position 0): the fresh-prompt path.
    gen["llama3/duo_mixed_fresh"] = dict(model=llama3, prompts=PROMPTS, max_tokens=STEPS, engine=dict(
        _duo(retrieval_mask=mixed_mask("llama3"), prefill_recent_size=PREFILL_W), max_num_batched_tokens=16384))
    # The default windows: these prompts prefill densely, decode reads sink + recent.
    gen["llama3/duo_mixed_default"] = dict(model=llama3, prompts=PROMPTS, max_tokens=STEPS,
                                           engine=_duo(retrieval_mask=mixed_mask("llama3")))
    # The same in chunks of 256: every continuing chunk ends within sink + 8192, so every slot,
    # streaming ones included, attends it through FA3's causal path over its cache.
    gen["llama3/duo_mixed_default_chunked"] = dict(model=llama3, prompts=PROMPTS, max_tokens=STEPS, engine=dict(
        _duo(retrieval_mask=mixed_mask("llama3")), max_num_batched_tokens=256))
    fa = dict(agreement.ENGINE, attention_backend="FLASH_ATTN")
    gen["llama3/fa_fp8"] = dict(model=llama3, prompts=PROMPTS, max_tokens=STEPS, engine=_fp8(fa))
    gen["llama3/duo_full_fp8"] = dict(model=llama3, prompts=PROMPTS, max_tokens=STEPS,
                                      engine=_fp8(_duo(pattern="full")))
    gen["llama3/duo_mixed_fp8"] = dict(model=llama3, prompts=PROMPTS, max_tokens=STEPS, engine=_fp8(
        _duo(retrieval_mask=mixed_mask("llama3"), prefill_recent_size=PREFILL_W)))
    score["llama3/fa_fp8_scorer"] = dict(model=llama3, engine=_fp8(fa))
    gen["llama3/duo_full_v1"] = dict(model=llama3, prompts=PROMPTS, max_tokens=STEPS,
                                     engine=_duo(pattern="full"), env={"VLLM_USE_V2_MODEL_RUNNER": "0"})
    score["llama3/rswa"] = dict(model=llama3, engine=_duo(retrieval_mask=mixed_mask("llama3"),
                                                          streaming_prefill="rswa", prefill_recent_size=PREFILL_W))
    return gen, score


def _spread(jobs: dict) -> None:
    """On a machine with several GPUs, give the engines different ones."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus > 1:
        for i, spec in enumerate(jobs.values()):
            spec["env"] = dict(spec.get("env", {}), CUDA_VISIBLE_DEVICES=str(i % gpus))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("agreement")
    models = {name: make_model(str(root / name), seed=0, **cfg) for name, cfg in LAYOUTS.items()}
    logs = os.environ.get("VLLM_DUO_ENGINE_LOGS") or str(root)  # one log per engine
    gen, score = _jobs(models)
    _spread(gen)
    done = agreement.run_parallel(gen, log_dir=logs)
    for name, spec in score.items():
        layout = name.split("/")[0]
        mine = {k.split("/", 1)[1]: v for k, v in done.items() if k.startswith(layout + "/")}
        spec["score"] = {k: agreement.scored_sequences(prompts_of(k), r) for k, r in mine.items()}
        if name.endswith("/fa"):
            spec["score"]["self"] = []
    _spread(score)
    done.update(agreement.run_parallel(score, log_dir=logs))
    return {"models": models, **done}


def _gap(runs: dict, layout: str, gen: str, scorer: str, part: slice = slice(None)) -> float:
    """``gen``'s generated tokens scored by ``scorer`` (requests ``part`` of its prompts)."""
    run = runs[f"{layout}/{gen}"]
    scores = runs[f"{layout}/{scorer}"]["scores"]["self" if gen == scorer else gen]
    return agreement.gap(prompts_of(gen)[part], {"logprobs": run["logprobs"][part]}, scores[part])


def _fa_noise(runs: dict, layout: str) -> float:
    """FLASH_ATTN's generated tokens scored by FLASH_ATTN: the comparison's own noise."""
    return _gap(runs, layout, "fa", "fa")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_full_pattern_equals_flash_attn(runs, layout) -> None:
    tol = agreement.tolerance(_fa_noise(runs, layout))
    check(f"agreement::full_equals_flash_attn[{layout}]", f"duo pattern='full' vs FLASH_ATTN ({layout})",
          METRIC, tol, _gap(runs, layout, "duo_full", "fa"),
          "duo mixed mask scored by FLASH_ATTN", _gap(runs, layout, "duo_mixed", "fa"))


def _reference_scores(runs: dict, layout: str, gen: str, mask: list[list[int]],
                      dense_prompt: bool = False) -> list[list[float]]:
    """float32 reference logprobs of ``gen``'s sequences: streaming queries see sink 64 + the last
    256 keys, or (``dense_prompt``, the default prefill window covering these prompts) every
    earlier key from a prompt position and sink + 256 from a generated one."""
    import torch

    config, weights = load(runs["models"][layout])
    out = []
    for prompt, tokens in zip(prompts_of(gen), runs[f"{layout}/{gen}"]["tokens"], strict=True):
        seq = prompt + tokens
        windows = torch.full((len(seq),), PREFILL_W)
        if dense_prompt:
            windows[:len(prompt)] = len(seq) + 1
        lp = forward_logprobs(config, weights, seq, mask, sink=64, windows=windows, device="cuda")
        out.append(lp[:-1].gather(1, torch.tensor(seq[1:], device="cuda")[:, None])[:, 0].tolist())
        del lp
        torch.cuda.empty_cache()
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_mixed_mask_equals_float32_reference(runs, layout) -> None:
    """Duo with a mixed mask, prompts chunked at 256 tokens (window kernel), against the float32
    plain-PyTorch reference of the semantics (query at t sees p <= t, or p < sink or t - W < p <= t)."""
    full = [[1] * len(row) for row in mixed_mask(layout)]
    noise = agreement.gap(BOTH, runs[f"{layout}/fa"], _reference_scores(runs, layout, "fa", full))
    mixed = mixed_mask(layout)
    duo = runs[f"{layout}/duo_mixed"]
    check(f"agreement::mixed_equals_float32_reference[{layout}]",
          f"duo mixed mask, chunks of 256 vs float32 reference ({layout})", METRIC,
          agreement.tolerance(noise), agreement.gap(PROMPTS, duo, _reference_scores(runs, layout, "duo_mixed", mixed)),
          "duo pattern='full' scored by the mixed-mask reference",
          agreement.gap(PROMPTS, runs[f"{layout}/duo_full"],
                        _reference_scores(runs, layout, "duo_full", mixed)))


def test_fresh_prompts_equal_float32_reference(runs) -> None:
    """Duo with a mixed mask, the four prompts (100..6000 tokens) in one step: the fresh-prompt
    path (FA3 on the step's own K/V per run of retrieval heads, the streaming heads' fresh path),
    against the float32 reference."""
    mixed = mixed_mask("llama3")
    full = [[1] * len(row) for row in mixed]
    noise = agreement.gap(BOTH, runs["llama3/fa"], _reference_scores(runs, "llama3", "fa", full))
    check("agreement::fresh_prompts_equal_float32_reference[llama3]",
          "duo mixed mask, whole prompts in one step vs float32 reference (llama3)", METRIC,
          agreement.tolerance(noise),
          agreement.gap(PROMPTS, runs["llama3/duo_mixed_fresh"],
                        _reference_scores(runs, "llama3", "duo_mixed_fresh", mixed)),
          "duo pattern='full' scored by the mixed-mask reference",
          agreement.gap(PROMPTS, runs["llama3/duo_full"], _reference_scores(runs, "llama3", "duo_full", mixed)))


def test_default_windows_equal_float32_reference(runs) -> None:
    """Duo with a mixed mask and the default windows: prompts up to sink + 8192 tokens prefill
    densely (FLASH_ATTN's one-call path), generated tokens read sink + recent. Control: the same
    mask with the prefill window pinned to 256, scored by this reference."""
    mixed = mixed_mask("llama3")
    full = [[1] * len(row) for row in mixed]
    noise = agreement.gap(BOTH, runs["llama3/fa"], _reference_scores(runs, "llama3", "fa", full))
    check("agreement::default_windows_equal_float32_reference[llama3]",
          "duo mixed mask, default windows (dense prefill, decode sink + recent) vs float32 reference (llama3)",
          METRIC, agreement.tolerance(noise),
          agreement.gap(PROMPTS, runs["llama3/duo_mixed_default"],
                        _reference_scores(runs, "llama3", "duo_mixed_default", mixed, dense_prompt=True)),
          "duo mixed, prefill window 256, scored by the dense-prefill reference",
          agreement.gap(PROMPTS, runs["llama3/duo_mixed"],
                        _reference_scores(runs, "llama3", "duo_mixed", mixed, dense_prompt=True)))


def test_default_windows_in_chunks_equal_float32_reference(runs) -> None:
    """As the default-windows test, with the prompts in chunks of 256 tokens: each continuing
    chunk ends within sink + 8192, so the streaming slots attend it through FA3's causal path
    over their caches (which then hold every key) instead of the window kernel. Control: the
    prefill window pinned to 256, scored by this reference."""
    mixed = mixed_mask("llama3")
    full = [[1] * len(row) for row in mixed]
    noise = agreement.gap(BOTH, runs["llama3/fa"], _reference_scores(runs, "llama3", "fa", full))
    check("agreement::default_windows_in_chunks_equal_float32_reference[llama3]",
          "duo mixed mask, default windows, chunks of 256 (causal FA3 in every slot) vs float32 reference "
          "(llama3)", METRIC, agreement.tolerance(noise),
          agreement.gap(PROMPTS, runs["llama3/duo_mixed_default_chunked"],
                        _reference_scores(runs, "llama3", "duo_mixed_default_chunked", mixed, dense_prompt=True)),
          "duo mixed, prefill window 256, scored by the dense-prefill reference",
          agreement.gap(PROMPTS, runs["llama3/duo_mixed"],
                        _reference_scores(runs, "llama3", "duo_mixed", mixed, dense_prompt=True)))


def test_fp8_full_pattern_equals_flash_attn_fp8(runs) -> None:
    """kv_cache_dtype='fp8': duo with every head retrieval against FLASH_ATTN with fp8, whose
    own run-to-run gap calibrates. Control: duo mixed (fp8) scored by FLASH_ATTN fp8."""
    check("agreement::fp8_full_equals_flash_attn_fp8[llama3]", "duo pattern='full' fp8 vs FLASH_ATTN fp8",
          METRIC, agreement.tolerance(_gap(runs, "llama3", "fa_fp8", "fa_fp8_scorer")),
          _gap(runs, "llama3", "duo_full_fp8", "fa_fp8_scorer"),
          "duo mixed fp8 scored by FLASH_ATTN fp8", _gap(runs, "llama3", "duo_mixed_fp8", "fa_fp8_scorer"))


def test_fp8_moves_duo_no_more_than_flash_attn(runs) -> None:
    """fp8 against bf16 of the same semantics: duo mixed fp8 scored by duo mixed bf16 (the rswa
    scorer, equal to the window kernel by the test below) within the tolerance of FLASH_ATTN fp8
    scored by FLASH_ATTN bf16. Control: duo pattern='full' fp8 scored by the mixed bf16 engine."""
    check("agreement::fp8_duo_shift_within_flash_attn_fp8_shift[llama3]",
          "duo mixed fp8 vs duo mixed bf16, tolerance from FLASH_ATTN fp8 vs bf16", METRIC,
          agreement.tolerance(_gap(runs, "llama3", "fa_fp8", "fa")),
          _gap(runs, "llama3", "duo_mixed_fp8", "rswa"),
          "duo pattern='full' fp8 scored by the mixed bf16 engine", _gap(runs, "llama3", "duo_full_fp8", "rswa"))


def test_window_kernel_chunked_equals_rswa(runs) -> None:
    """streaming_prefill='window' chunked at 256 tokens vs 'rswa' (vLLM's Triton R-SWA) in one
    8192-token step: both the streaming kernel and the chunking change."""
    check("agreement::window_256_equals_rswa_8192[llama3]", "duo mixed: window kernel @256 vs rswa @8192",
          METRIC, agreement.tolerance(_fa_noise(runs, "llama3")), _gap(runs, "llama3", "duo_mixed", "rswa"),
          "duo pattern='full' scored by the mixed rswa engine", _gap(runs, "llama3", "duo_full", "rswa"))


def test_all_streaming_equals_full_below_sink_plus_recent(runs) -> None:
    short, long = slice(0, len(SHORT)), slice(len(SHORT), None)
    check("agreement::all_streaming_short_equals_full[llama3]",
          "duo all-streaming vs FLASH_ATTN, prompts + output < sink + recent", METRIC,
          agreement.tolerance(_fa_noise(runs, "llama3")),
          _gap(runs, "llama3", "duo_streaming", "fa", short),
          "the same engine on prompts of 100..6000 tokens", _gap(runs, "llama3", "duo_streaming", "fa", long))


def test_v1_model_runner_full_equals_flash_attn(runs) -> None:
    check("agreement::v1_runner_full_equals_flash_attn[llama3]",
          "duo pattern='full' under vLLM's V1 model runner vs FLASH_ATTN (V2)", METRIC,
          agreement.tolerance(_fa_noise(runs, "llama3")), _gap(runs, "llama3", "duo_full_v1", "fa"),
          "duo mixed mask scored by FLASH_ATTN", _gap(runs, "llama3", "duo_mixed", "fa"))
