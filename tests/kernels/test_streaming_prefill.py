"""``streaming_prefill`` against the float32 reference: prompt chunks with sink + window.

On the GPU (marked gpu): bf16 and fp16, GQA, several slots, ragged batches, chunks of 256..16K
tokens behind up to 48K cached tokens, prompts up to 64K, random sink/window/block sizes; and
fp8 e4m3 caches with per-tensor scales, against the reference on the values the cache holds. On
the CPU the same kernel runs under Triton's interpreter (fp16: its bf16 ``tl.dot`` is wrong), on
small cases, so CI checks the masking logic without a GPU. Planted needles (prefill_reference)
make a dropped sink, a window off by one or a skipped block fail the check; on the CPU their
references show that by design, on the GPU the kernel run with each wrong input is rejected.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

from dataclasses import replace

import pytest
import torch

from tests.kernels.prefill_reference import (
    PrefillCase,
    make_prefill_case,
    mutations,
    needle_case,
    reference,
    to_fp8,
)
from tests.kernels.reference import METRIC, scaled_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_kernel(case: PrefillCase, config: tuple | None = None) -> torch.Tensor:
    """The op (its default tiles), or with ``config`` the launch with those tiles."""
    from vllm_duo.ops import streaming_prefill
    from vllm_duo.ops.prefill import launch

    out = torch.full_like(case.q, float("nan"))  # poisoned: every row the kernel owns is written
    if config is None:
        streaming_prefill(case.q, case.k, case.v, out=out, **case.args())
        return out
    a = case.args()
    launch(out, case.q, case.k, case.v, a["kv_ptrs"], a["block_table_ptrs"], a["block_table_strides"],
           a["slot_kv_head"], a["query_start_loc"], a["seq_lens"], a["block_table_row0"], a["max_query_len"],
           a["num_kv_heads"], a["block_size"], a["sink_size"], a["window"], case.q.shape[2] ** -0.5, config,
           a.get("k_scale"), a.get("v_scale"))
    return out


def run_case(dtype: torch.dtype, device: str, q_lens: list[int], ctx_lens: list[int], *, kv_heads: list[int],
             num_kv_heads: int = 8, group: int = 4, head_dim: int = 128, block_size: int = 16,
             sink: int = 64, window: int = 256, seed: int = 0, config: tuple | None = None) -> tuple[float, float]:
    """(scaled error, scaled error of an all-zeros output); asserts the first is <= 1."""
    case = make_prefill_case(q_lens, ctx_lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                             kv_heads=kv_heads, block_size=block_size, sink=sink, window=window,
                             dtype=dtype, seed=seed, device=device)
    out = run_kernel(case, config)
    heads = case.heads
    ref = reference(case, head_dim ** -0.5)[:, heads]
    others = [h for h in range(num_kv_heads * group) if h not in heads]
    assert out[:, others].isnan().all(), "heads of other slots must be left untouched"
    gap = scaled_error(out[:, heads], ref)
    assert gap <= 1, f"streaming_prefill: scaled error {gap:.3g} > 1 ({METRIC})"
    return gap, scaled_error(torch.zeros_like(ref), ref)


COMPARES = "streaming_prefill vs float32 PyTorch reference"

CPU_CASES = [
    dict(q_lens=[100], ctx_lens=[0], kv_heads=[1], num_kv_heads=2, group=2, head_dim=64, sink=20, window=50),
    dict(q_lens=[70, 33, 129], ctx_lens=[0, 300, 41], kv_heads=[0, 3], num_kv_heads=4, group=2,
         head_dim=64, sink=20, window=50, block_size=8),
    dict(q_lens=[90], ctx_lens=[500], kv_heads=[0], num_kv_heads=1, group=1, head_dim=128, sink=0,
         window=1, block_size=32),
    dict(q_lens=[64, 1], ctx_lens=[17, 200], kv_heads=[1], num_kv_heads=2, group=3, head_dim=64, sink=5,
         window=70),
    # A window of many tiles: most key tiles are seen by every query of a program and skip the
    # mask, in the cache part and in the chunk part; tile edges not aligned to the window.
    dict(q_lens=[300, 45], ctx_lens=[230, 0], kv_heads=[0, 1], num_kv_heads=2, group=2, head_dim=64, sink=10,
         window=150, block_size=8),
]


# Tiles beside the default: packed GQA rows (one query tile of several queries per head, several
# tiles per prompt, a group of 3 leaving rows unused) and a plain one of several tiles.
CPU_CONFIGS = [None, (8, 16, 4, 1, True), (32, 16, 4, 1, True), (16, 16, 4, 1, False)]


def test_cpu_interpreter() -> None:
    """All CPU_CASES under TRITON_INTERPRET=1 (a fresh process: the flag is read at import), with
    the default tiles and CPU_CONFIGS."""
    code = ("import torch\nfrom tests.kernels.test_streaming_prefill import CPU_CASES, CPU_CONFIGS, run_case\n"
            "for cfg in CPU_CONFIGS:\n    for c in CPU_CASES:\n        run_case(torch.float16, 'cpu', config=cfg, **c)\n"
            "print('ok', len(CPU_CASES))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_lens,ctx_lens", [
    ([4096], [0]),  # a whole prompt
    ([256], [65280]),  # the last 256-token chunk of a 64K prompt
    ([16384], [49152]),  # the last 16K chunk of a 64K prompt
    ([1000, 37, 2048, 5], [0, 3000, 70, 9000]),  # a ragged batch of chunks
])
def test_gpu_against_reference(dtype, q_lens, ctx_lens, evidence) -> None:
    """Llama-3-8B's head layout (8 KV heads, GQA 4, head_dim 128), half the heads streaming."""
    gap, zeros = run_case(dtype, "cuda", q_lens, ctx_lens, kv_heads=[0, 2, 3, 7])
    evidence(COMPARES, METRIC, gap, "all-zeros output", zeros, label=f"{dtype} q {q_lens} ctx {ctx_lens}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("seed", range(12))
def test_gpu_random(seed: int, evidence) -> None:
    """Random shapes: head_dim 64/128/256, GQA 1..8, block 16/32, sink/window not block-aligned."""
    rng = random.Random(seed)
    n = rng.randint(1, 5)
    num_kv_heads, group = rng.choice([(1, 1), (2, 4), (8, 4), (4, 8), (3, 3)])
    kv_heads = sorted(rng.sample(range(num_kv_heads), rng.randint(1, num_kv_heads)))
    gap, zeros = run_case(rng.choice([torch.bfloat16, torch.float16]), "cuda",
                          [rng.choice([1, rng.randint(2, 300), rng.randint(256, 6000)]) for _ in range(n)],
                          [rng.choice([0, rng.randint(1, 20000)]) for _ in range(n)], kv_heads=kv_heads,
                          num_kv_heads=num_kv_heads, group=group, head_dim=rng.choice([64, 128, 256]),
                          block_size=rng.choice([16, 32]), sink=rng.choice([0, 4, 64, 100]),
                          window=rng.choice([1, 100, 256, 1000, 4000]), seed=seed)
    evidence(COMPARES, METRIC, gap, "all-zeros output", zeros, label=f"seed {seed}")


@pytest.mark.parametrize("fp8", [False, True])
def test_cpu_mutations_separate(fp8: bool) -> None:
    """By design: the reference of each mutated input differs beyond the tolerance (the needles
    survive fp8 quantization, saturated or not)."""
    case = to_fp8(needle_case("cpu"), K_SCALE, V_SCALE) if fp8 else needle_case("cpu")
    heads = case.heads
    ref = reference(case, case.q.shape[2] ** -0.5)[:, heads]
    gaps = {what: scaled_error(reference(wrong, case.q.shape[2] ** -0.5)[:, heads], ref)
            for what, wrong in mutations(case).items()}
    assert all(g > 1 for g in gaps.values()), gaps


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_wrong_kernel_inputs_are_rejected(dtype, evidence) -> None:
    """Planted needles: the kernel agrees with the reference; the kernel run with the sink
    dropped or one shorter, the window one shorter or longer, or one block skipped, is rejected."""
    case = needle_case("cuda", dtype)
    heads = case.heads
    ref = reference(case, case.q.shape[2] ** -0.5)[:, heads]
    gap = scaled_error(run_kernel(case)[:, heads], ref)
    compares = COMPARES + ", planted needles, chunks behind 700..16000 cached tokens"
    label = str(dtype).removeprefix("torch.")
    evidence(compares, METRIC, gap, "all-zeros output", scaled_error(torch.zeros_like(ref), ref), label=label)
    for what, wrong in mutations(case).items():
        evidence(compares, METRIC, gap, f"kernel run with {what}",
                 scaled_error(run_kernel(wrong)[:, heads], ref), label=label)


K_SCALE, V_SCALE = 0.1, 0.2  # != 1, so a kernel that ignores a scale fails


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("q_lens,ctx_lens", [([4096], [0]), ([16384], [49152]),
                                             ([1000, 37, 2048, 5], [0, 3000, 70, 9000])])
def test_gpu_fp8_against_reference(q_lens, ctx_lens, evidence) -> None:
    """fp8 caches (bf16 queries and chunk K/V): the reference runs on the dequantized cache; the
    kernel run with either scale doubled must be rejected."""
    case = to_fp8(make_prefill_case(q_lens, ctx_lens, num_kv_heads=8, group=4, head_dim=128,
                                    kv_heads=[0, 2, 3, 7], seed=3), K_SCALE, V_SCALE)
    heads = case.heads
    ref = reference(case, 128 ** -0.5)[:, heads]
    gap = scaled_error(run_kernel(case)[:, heads], ref)
    compares = COMPARES + ", fp8 e4m3 cache"
    label = f"q {q_lens} ctx {ctx_lens}"
    assert gap <= 1, f"streaming_prefill fp8: scaled error {gap:.3g} > 1 ({METRIC})"
    evidence(compares, METRIC, gap, "all-zeros output", scaled_error(torch.zeros_like(ref), ref), label=label)
    if sum(ctx_lens):  # a scale only matters for keys read from the cache
        for what, k, v in (("k_scale doubled", 2 * K_SCALE, V_SCALE), ("v_scale doubled", K_SCALE, 2 * V_SCALE)):
            wrong = replace(case, k_scale=torch.full_like(case.k_scale, k), v_scale=torch.full_like(case.v_scale, v))
            evidence(compares, METRIC, gap, f"kernel run with {what}",
                     scaled_error(run_kernel(wrong)[:, heads], ref), label=label)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp8_wrong_kernel_inputs_are_rejected(evidence) -> None:
    """The planted-needle mutations on fp8 caches."""
    case = to_fp8(needle_case("cuda"), K_SCALE, V_SCALE)
    heads = case.heads
    ref = reference(case, case.q.shape[2] ** -0.5)[:, heads]
    gap = scaled_error(run_kernel(case)[:, heads], ref)
    compares = COMPARES + ", fp8 e4m3 cache, planted needles"
    for what, wrong in mutations(case).items():
        evidence(compares, METRIC, gap, f"kernel run with {what}",
                 scaled_error(run_kernel(wrong)[:, heads], ref), label="fp8")
