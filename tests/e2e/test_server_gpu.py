"""The real ``vllm serve`` with duo over HTTP, SmolLM2-135M-Instruct (marked gpu).

Each server is a separate process started once per module: FLASH_ATTN, duo with every head a
retrieval head (must give FLASH_ATTN's greedy text on both endpoints), and duo with half the heads
streaming: patterns/smollm2-135m-instruct at sparsity 0.5 when present, else a seeded random mask.
Requests go one at a time, so the batches, and therefore the numerics, are the same on every
server. Server logs go to $OUT if set.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.e2e.models import SMOLLM2, SMOLLM2_PATTERN, model_shape, random_mask
from tests.e2e.server import MODEL_NAME, VllmServer, chat, complete, free_port, passkey_prompt, serve_argv, stream

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason=f"{SMOLLM2} not found (devkit --model)")]

# Prefix caching off on every server (duo has it on by default): cached prefixes change FLASH_ATTN's
# numerics (first run: "duo full == FLASH_ATTN over HTTP" failed with it on for FLASH_ATTN only).
COMMON = ["--max-model-len", "8192", "--max-num-seqs", "8", "--gpu-memory-utilization", "0.3",
          "--seed", "0", "--no-enable-prefix-caching"]
# (pass key, filler repeats of about 25 tokens, depth): about 1K to 6.5K tokens.
PASSKEYS = [(31415, 45, 0.2), (27182, 110, 0.5), (16180, 180, 0.7), (14142, 260, 0.9)]
SHORT = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4, 5,"]


def _log_dir(tmp_path_factory) -> str:
    return os.environ.get("OUT") or str(tmp_path_factory.mktemp("server_logs"))


def _collect(tmp_path_factory, name: str, backend: str, duo: dict | None) -> dict[str, list[str]]:
    port = free_port()
    log = os.path.join(_log_dir(tmp_path_factory), f"server_{name}.log")
    with VllmServer(serve_argv(SMOLLM2, port, backend, duo, COMMON), port, log) as s:
        return {
            "passkey": [complete(s.url, passkey_prompt(k, r, d), 12) for k, r, d in PASSKEYS],
            "chat": [chat(s.url, passkey_prompt(k, r, d, question=False), 24) for k, r, d in PASSKEYS],
            "short": [complete(s.url, p, 16) for p in SHORT],
            "short_chat": [chat(s.url, p, 16) for p in SHORT],
            "streamed": [stream(s.url, "/v1/completions", dict(model=MODEL_NAME, prompt=p, max_tokens=16,
                                                               temperature=0.0)).text for p in SHORT],
        }


@pytest.fixture(scope="module")
def flash_attn(tmp_path_factory):
    return _collect(tmp_path_factory, "flash_attn", "FLASH_ATTN", None)


@pytest.fixture(scope="module")
def duo_full(tmp_path_factory):
    return _collect(tmp_path_factory, "duo_full", "duo", {"pattern": "full"})


@pytest.fixture(scope="module")
def duo_mixed(tmp_path_factory):
    duo = {"pattern": SMOLLM2_PATTERN, "sparsity": 0.5} if os.path.isdir(SMOLLM2_PATTERN) else \
        {"retrieval_mask": random_mask(*model_shape(SMOLLM2), sparsity=0.5, seed=0)}
    return _collect(tmp_path_factory, "duo_mixed", "duo", duo)


def test_duo_full_equals_flash_attn_over_http(flash_attn, duo_full):
    """Both endpoints, long and short prompts: identical greedy text."""
    for key in ("passkey", "chat", "short", "short_chat"):
        assert duo_full[key] == flash_attn[key], key


def test_streamed_equals_non_streamed(duo_full):
    assert duo_full["streamed"] == duo_full["short"]


def _hits(answers: list[str]) -> int:
    return sum(str(k) in a for (k, _, _), a in zip(PASSKEYS, answers, strict=True))


def test_passkey_found(duo_full, flash_attn):
    """All-retrieval duo finds every pass key FLASH_ATTN finds (an absolute bar of 3 of 4 failed
    on the first H100 run; SmolLM2 is weak at high depths on this prompt, see vllm-duo niah)."""
    for key in ("passkey", "chat"):
        print(f"{key}: FLASH_ATTN {_hits(flash_attn[key])}/4, duo full {_hits(duo_full[key])}/4")
        assert _hits(duo_full[key]) >= _hits(flash_attn[key]), (duo_full[key], flash_attn[key])


def test_mixed_mask_short_prompts_equal_full(duo_mixed, duo_full, flash_attn):
    """Prompt + answer < sink + recent (320): streaming heads see every token, so the text
    equals all-retrieval; on long prompts the identified pattern at 50 % finds at most one pass
    key fewer than FLASH_ATTN (NIAH: within one or two cases of full on 40 / 80 prompts)."""
    assert duo_mixed["short"] == duo_full["short"]
    assert duo_mixed["short_chat"] == duo_full["short_chat"]
    assert all(a.strip() for a in duo_mixed["passkey"] + duo_mixed["chat"])
    hits, full = _hits(duo_mixed["passkey"]), _hits(flash_attn["passkey"])
    print(f"mixed-mask pass keys: {hits} / {len(PASSKEYS)} (FLASH_ATTN {full})")
    assert hits >= full - 1, (duo_mixed["passkey"], flash_attn["passkey"])


def test_bad_pattern_is_refused_before_gpu_work(tmp_path):
    missing = str(tmp_path / "no-such-pattern")
    argv = serve_argv(SMOLLM2, free_port(), "duo", {"pattern": missing}, COMMON)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "does not exist" in proc.stdout + proc.stderr
