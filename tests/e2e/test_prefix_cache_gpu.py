"""Prefix caching with duo (explicit ``enable_prefix_caching=True``, experimental; marked gpu).

A batch sharing a long prefix, after one warm-up request has cached it: greedy tokens must equal
the same run with caching off, and every prompt must hit the cached prefix (``num_cached_tokens``
of each output; hit rate printed). The prefix
is far longer than sink + window, so every hit depends on the sink blocks coming back.
"""

from __future__ import annotations

import random

import pytest

from tests.e2e.engine_run import LLAMA3_8B, run_engine, write_model

pytestmark = pytest.mark.gpu


def test_shared_prefix_same_tokens_with_caching_on_and_off(tmp_path):
    model = write_model(str(tmp_path / "llama3"), LLAMA3_8B)
    rng = random.Random(7)
    prefix = [rng.randrange(1000, 100000) for _ in range(6000)]
    prompts = [prefix + [rng.randrange(1000, 100000) for _ in range(rng.randint(50, 400))] for _ in range(8)]
    mask = [[(layer + head) % 2 for head in range(8)] for layer in range(32)]
    runs = {}
    for caching in (False, True):
        runs[caching] = run_engine(dict(
            model=model, prompts=prompts, warmup_prompts=[prefix + [5]], max_tokens=32,
            # eager: the KV-block bookkeeping under test is the same, and the 8B engine starts twice as fast
            engine=dict(max_model_len=8192, gpu_memory_utilization=0.85, max_num_seqs=16, enforce_eager=True,
                        enable_prefix_caching=caching, attention_backend="duo",
                        additional_config={"duo_attention": {"retrieval_mask": mask}})))
    stats = runs[True]["prefix_cache"]
    print(f"prefix cache: {stats['hits']} hits of {stats['queries']} queried tokens "
          f"({stats['hits'] / max(stats['queries'], 1):.1%})")
    assert runs[True]["tokens"] == runs[False]["tokens"]
    assert all(hit >= len(prefix) // 2 for hit in stats["per_request"]), stats  # every prompt hit its prefix
