"""Duo decode inside vLLM's full CUDA graphs: replays equal eager runs (GPU).

The seeded attention-matters tiny Llama (real weights, tests/e2e/reference_model.py) with a mixed
retrieval mask generates greedily under vLLM's defaults (torch.compile + FULL_AND_PIECEWISE: pure
decode steps replay a full graph captured once per batch size) at 1, 3, 8, 17 and 64 requests, so
padded batches (3 -> 4, 17 -> 24) replay too. An ``enforce_eager=True`` engine then scores the
generated tokens teacher-forced (``prompt_logprobs``); the gap is the largest |logprob
difference| over all generated tokens.

- Tolerance: the same gap for FLASH_ATTN (graphs on vs eager scoring, same prompts) plus a bf16
  margin: both sides compute the same math through different kernels (decode vs prefill).
- Control: duo all-streaming (pattern "streaming") generates, the mixed mask scores; its gap must
  exceed the tolerance, or the test could not fail.
- The worker must report FULL_AND_PIECEWISE: a backend that declared no full-graph support would
  be downgraded to PIECEWISE and this test would compare eager with eager.

Both model runners (V2, vLLM 0.26's default for Llama, and V1) are covered; the ten engines start
concurrently. TP=2 over Ray under the same defaults: tests/e2e/test_ray_gpu.py.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

from tests.e2e.reference_model import TINY_LLAMA, make_model
from vllm_duo.eval.agreement import run_parallel
from vllm_duo.eval.evidence import check

pytestmark = pytest.mark.gpu
MASK = [[1, 0], [0, 1], [0, 0], [1, 1]]
SINK, RECENT = 16, 64
BATCHES = (1, 3, 8, 17, 64)
STEPS = 24
BF16_MARGIN = 0.05  # decode vs prefill kernels in bf16 on this model (reference: max error 0.07)
RUNNERS = {"v2": "1", "v1": "0"}  # VLLM_USE_V2_MODEL_RUNNER


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("tiny_llama")), seed=0)


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, TINY_LLAMA["vocab_size"]) for _ in range(rng.randrange(100, 700))]
            for _ in range(max(BATCHES))]


def _engine(backend: str, pattern: Any = MASK, **kw) -> dict[str, Any]:
    engine = dict(load_format="auto", dtype="bfloat16", max_model_len=2048, max_num_seqs=max(BATCHES),
                  gpu_memory_utilization=0.08, kv_cache_memory_bytes=2 << 30, enable_prefix_caching=False, seed=0,
                  skip_tokenizer_init=True, attention_backend=backend)
    if backend == "duo":
        opts = {"pattern": pattern} if isinstance(pattern, str) else {"retrieval_mask": pattern}
        # Prefill window = recent: the 100..700-token prompts slide it, so all-streaming (the
        # control) differs from the mask in prompt and decode alike (the default 8192 would
        # prefill them densely and leave only the 24 decode steps to tell them apart).
        engine["additional_config"] = {"duo_attention": dict(opts, sink_size=SINK, recent_size=RECENT,
                                                             prefill_recent_size=RECENT)}
    engine.update(kw)
    return engine


def _probe():
    """For ``collective_rpc``, built in a closure so cloudpickle ships it by value."""

    def probe(worker) -> dict[str, Any]:
        cfg = worker.vllm_config.compilation_config
        mode = cfg.cudagraph_mode
        return {"cudagraph_mode": getattr(mode, "name", str(mode)),
                "capture_sizes": list(cfg.cudagraph_capture_sizes or [])}

    return probe


def generate_batches(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: greedy generation of prompts[:b] for each b in spec["batches"], one engine; each
    generated token's logprob; the worker's resolved CUDA-graph mode."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = spec["runner"]
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc sends the probe by cloudpickle
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            detokenize=False, logprobs=0)
    runs = []
    for b in spec["batches"]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"][:b]], params,
                            use_tqdm=False)
        runs.append([{"tokens": list(o.outputs[0].token_ids),
                      "logprobs": [step[t].logprob for t, step in zip(o.outputs[0].token_ids,
                                                                       o.outputs[0].logprobs)]}
                     for o in outs])
    return {"runs": runs, "ranks": llm.collective_rpc(_probe())}


def score(spec: dict[str, Any]) -> dict[str, Any]:
    """Job: teacher-forced logprob of every token after its prompt, for each (prompt, tokens)."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = spec["runner"]
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["engine"])
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    seqs = [p + t for p, t in spec["pairs"]]
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
    scores = []
    for (prompt, _), seq, o in zip(spec["pairs"], seqs, outs):
        lps = o.prompt_logprobs  # [None, {token: Logprob}, ...] one per position
        scores.append([lps[i][seq[i]].logprob for i in range(len(prompt), len(seq))])
    return {"scores": scores}


def _gaps(runs: list[dict], scored: dict[str, Any]) -> list[float]:
    """Per generation run: the largest |logprob difference| between its generated tokens'
    logprobs and their teacher-forced scores by one eager engine (all runs scored together)."""
    gaps, i = [], 0
    for gen in runs:
        gap = 0.0
        for run in gen["runs"]:
            for out in run:
                gap = max([gap] + [abs(a - b) for a, b in zip(out["logprobs"], scored["scores"][i], strict=True)])
                i += 1
        gaps.append(gap)
    return gaps


def _pairs(runs: list[dict]) -> list[list[list[int]]]:
    prompts = _prompts()
    pairs = []
    for gen in runs:
        for b, run in zip(BATCHES, gen["runs"], strict=True):
            assert len(run) == b and all(len(out["tokens"]) == STEPS for out in run)
            pairs += [[prompt, out["tokens"]] for prompt, out in zip(prompts, run)]
    return pairs


@pytest.fixture(scope="module")
def graph_runs(tiny) -> dict[str, dict]:
    """Per runner: FLASH_ATTN, duo (mixed) and the control (all-streaming) generate with graphs on;
    then an eager FLASH_ATTN engine scores FLASH_ATTN's tokens and an eager duo engine (mixed)
    scores duo's and the control's."""
    gen = {}
    for runner, env in RUNNERS.items():
        for name, engine in (("fa", _engine("FLASH_ATTN")), ("duo", _engine("duo")),
                             ("control", _engine("duo", pattern="streaming"))):
            gen[f"{runner}/{name}"] = dict(model=tiny, runner=env, engine=engine, prompts=_prompts(),
                                           batches=list(BATCHES), max_tokens=STEPS)
    done = run_parallel(gen, workers=len(gen), job="tests.e2e.test_cudagraph_gpu:generate_batches")
    score = {}
    for runner, env in RUNNERS.items():
        score[f"{runner}/fa_score"] = dict(model=tiny, runner=env, engine=_engine("FLASH_ATTN", enforce_eager=True),
                                           pairs=_pairs([done[f"{runner}/fa"]]))
        score[f"{runner}/duo_score"] = dict(model=tiny, runner=env, engine=_engine("duo", enforce_eager=True),
                                            pairs=_pairs([done[f"{runner}/duo"], done[f"{runner}/control"]]))
    done.update(run_parallel(score, workers=len(score), job="tests.e2e.test_cudagraph_gpu:score"))
    return done


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_graph_replays_match_eager(graph_runs, runner) -> None:
    fa, duo = graph_runs[f"{runner}/fa"], graph_runs[f"{runner}/duo"]
    [fa_gap] = _gaps([fa], graph_runs[f"{runner}/fa_score"])
    duo_gap, control_gap = _gaps([duo, graph_runs[f"{runner}/control"]], graph_runs[f"{runner}/duo_score"])
    for name, res in (("FLASH_ATTN", fa), ("duo", duo)):
        modes = {r["cudagraph_mode"] for r in res["ranks"]}
        assert modes == {"FULL_AND_PIECEWISE"}, f"{name} ran with CUDA-graph mode {modes}, not full graphs for decode"
        sizes = res["ranks"][0]["capture_sizes"]
        assert all(any(s >= b for s in sizes) for b in BATCHES), f"{name}: capture sizes {sizes} miss a batch"
    tolerance = 2 * fa_gap + BF16_MARGIN
    print(f"runner {runner}: FLASH_ATTN graph-vs-eager gap {fa_gap:.4f}, duo {duo_gap:.4f}, "
          f"control (streaming scored by mixed) {control_gap:.4f}, tolerance {tolerance:.4f}")
    check(f"tests/e2e/test_cudagraph_gpu.py::test_graph_replays_match_eager[{runner}]",
          compares=f"duo mixed mask, full CUDA graphs (batches {BATCHES}) vs eager, runner {runner}",
          metric="max |logprob diff| of generated tokens, teacher-forced by an enforce_eager engine",
          tolerance=tolerance, gap=duo_gap,
          control="duo pattern=streaming generates, mixed mask scores", control_gap=control_gap)


def test_backend_decode_replays_with_new_steps(monkeypatch) -> None:
    """One layer through the real builders and impl, without an engine: a decode step captured at
    each padded batch size (1, 4, 8) replays later steps with new lengths, block tables, slot
    mappings and K/V, and fewer requests than captured (padding), and matches a float32
    reference and the eager forward. vLLM's per-step tensors are stood in for by persistent
    buffers refilled in place, as both model runners do."""
    from types import SimpleNamespace

    import torch
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_duo.backend import impl as impl_module
    from vllm_duo.backend.builder import DuoMetadataBuilder
    from vllm_duo.block_manager import slot_kind_specs
    from vllm_duo.options import DuoOptions
    from vllm_duo.slot_plan import RETRIEVAL, STREAMING

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    H, G, D, BS, WIDTH, POOL, MAXR, SINK_, WIN = 2, 4, 128, 16, 64, 600, 8, 16, 64
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_batched_tokens=64, max_num_seqs=MAXR),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=MAXR),
        model_config=SimpleNamespace(max_model_len=WIDTH * BS))
    specs = slot_kind_specs(block_size=BS, head_size=D, dtype=bf16, sink_size=SINK_, recent_size=WIN,
                            prefill_window=WIN, tail_only_batches=0)
    builders = [DuoMetadataBuilder(specs[0], ["l0"], config, dev),
                DuoMetadataBuilder(specs[1], ["l0.duo_s0"], config, dev)]
    names = ["l0", "l0.duo_s0"]
    caches = [torch.randn(POOL, 1, BS, 2 * D, dtype=bf16, device=dev) for _ in range(2)]
    slots = [SimpleNamespace(name=names[0], kind=RETRIEVAL, head=0, layer=SimpleNamespace(kv_cache=caches[0])),
             SimpleNamespace(name=names[1], kind=STREAMING, head=1, layer=SimpleNamespace(kv_cache=caches[1]))]
    impl = impl_module.DuoAttentionImpl(num_heads=H * G, head_size=D, scale=D ** -0.5, num_kv_heads=H,
                                        alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    impl.set_slots(slots, DuoOptions(sink_size=SINK_, recent_size=WIN), BS)
    context = SimpleNamespace(attn_metadata=None)
    monkeypatch.setattr(impl_module, "get_forward_context", lambda: context)

    # vLLM's persistent per-step buffers
    seq_lens = torch.zeros(MAXR, dtype=torch.int32, device=dev)
    qsl = torch.arange(MAXR + 1, dtype=torch.int32, device=dev)
    tables = [torch.zeros(MAXR, WIDTH, dtype=torch.int32, device=dev) for _ in range(2)]
    mappings = [torch.full((MAXR,), -1, dtype=torch.int64, device=dev) for _ in range(2)]
    q = torch.zeros(MAXR, H * G, D, dtype=bf16, device=dev)
    k, v = (torch.zeros(MAXR, H, D, dtype=bf16, device=dev) for _ in range(2))
    out = torch.zeros(MAXR, H * G, D, dtype=bf16, device=dev)

    def step(lens: list[int], padded: int, seed: int) -> dict:
        """Fill the buffers for one decode step of len(lens) requests padded to ``padded``;
        build both groups' metadata as the runner does every step."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = len(lens)
        seq_lens.zero_()
        seq_lens[:n] = torch.tensor(lens, dtype=torch.int32)
        for table, mapping in zip(tables, mappings):
            table.zero_()
            mapping.fill_(-1)
            blocks = torch.randperm(POOL - 1, generator=gen) + 1  # rows get disjoint blocks
            for r, L in enumerate(lens):
                table[r] = blocks[r * WIDTH:(r + 1) * WIDTH].to(dev, torch.int32)
                mapping[r] = int(table[r, (L - 1) // BS]) * BS + (L - 1) % BS
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen).to(dev, bf16))
        metas = {}
        for name, builder, table, mapping in zip(names, builders, tables, mappings):
            cm = CommonAttentionMetadata(
                query_start_loc=qsl[:padded + 1], query_start_loc_cpu=qsl[:padded + 1].cpu(),
                seq_lens=seq_lens[:padded], num_reqs=padded, num_actual_tokens=padded, max_query_len=1,
                max_seq_len=max(lens), block_table_tensor=table[:padded], slot_mapping=mapping[:padded])
            metas[name] = builder.build(0, cm)
        context.attn_metadata = metas
        return metas

    def forward(metas: dict, padded: int) -> None:
        impl.forward(None, q[:padded], k[:padded], v[:padded], None, metas["l0"], output=out[:padded])

    def reference(lens: list[int]) -> torch.Tensor:
        ref = torch.zeros(len(lens), H * G, D)
        for s, streaming in ((0, False), (1, True)):
            cache = caches[s][:, 0].float().reshape(-1, 2 * D)
            for r, L in enumerate(lens):
                pos = torch.arange(L)
                if streaming:
                    pos = pos[(pos < SINK_) | (pos > L - 1 - WIN)]
                rows = tables[s][r, pos // BS].long().cpu() * BS + pos % BS
                kv = cache[rows.to(dev)].cpu()
                heads = slice(s * G, (s + 1) * G)
                p = torch.softmax(q[r, heads].float().cpu() @ kv[:, :D].T * D ** -0.5, dim=-1)
                ref[r, heads] = p @ kv[:, D:]
        return ref

    rng = torch.Generator().manual_seed(0)
    for padded in (1, 4, 8):
        metas = step([40] * padded, padded, seed=padded)
        forward(metas, padded)  # warm-up outside the graph, as vLLM does
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward(metas, padded)
        for n, seed in ((padded, 100 + padded), (max(1, padded - 1), 200 + padded)):
            lens = torch.randint(1, WIDTH * BS, (n,), generator=rng).tolist()
            step(lens, padded, seed)
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            replayed = out[:padded].float().cpu()
            ref = reference(lens)
            err = (replayed[:n] - ref).abs().max().item()
            assert err < 2e-2 * max(1.0, ref.abs().max().item()), (padded, n, err)
            assert (replayed[n:] == 0).all(), "padded rows must be zeros"
            forward(step(lens, padded, seed), padded)  # the same step eagerly
            eager = out[:n].float().cpu()
            assert (eager - replayed[:n]).abs().max().item() < 2e-2, (padded, n)
