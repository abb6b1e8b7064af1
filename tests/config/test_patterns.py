"""Pattern loading, binarisation and TP slicing (pure data, CPU)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import PATTERN_NAMES, pattern_dir
from vllm_duo.errors import DuoConfigError
from vllm_duo.patterns import binarize, check_shape, check_tp, load_gates, rank_kv_heads, slice_for_rank
from vllm_duo.slot_plan import layer_slots, slot_counts

# Per-layer retrieval counts the reference prints for Llama-3-8B-1048k at sparsity 0.5, seed 42.
REFERENCE_L3_S050 = [1, 1, 2, 2, 2, 4, 2, 4, 6, 4, 5, 3, 2, 6, 5, 5, 5, 6, 3, 5, 6, 3, 3, 6, 4, 5, 3, 4, 6, 5, 8, 2]


@pytest.mark.parametrize("name", PATTERN_NAMES)
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_reference_patterns_counts(name, sparsity):
    gates = load_gates(pattern_dir(name)).gates
    mask = binarize(gates, sparsity=sparsity)
    assert mask.shape == gates.shape and mask.dtype == np.uint8
    assert mask.sum() == round(gates.size * (1 - sparsity))
    assert np.array_equal(mask, binarize(gates.copy(), sparsity=sparsity)), "not deterministic"


def test_matches_reference_selection():
    gates = load_gates(pattern_dir("Llama-3-8B-Instruct-Gradient-1048k")).gates
    assert binarize(gates, sparsity=0.5).sum(axis=1).tolist() == REFERENCE_L3_S050


def test_ties_broken_by_seed_not_order():
    gates = np.ones((4, 8))
    a, b = binarize(gates, sparsity=0.5, seed=1), binarize(gates, sparsity=0.5, seed=2)
    assert a.sum() == b.sum() == 16
    assert not np.array_equal(a, b)
    assert np.array_equal(a, binarize(gates, sparsity=0.5, seed=1))


def test_threshold_and_extremes():
    gates = np.array([[0.1, 0.6], [0.9, 0.4]])
    assert binarize(gates, threshold=0.5).tolist() == [[0, 1], [1, 0]]
    assert binarize(gates, sparsity=0.0).all() and not binarize(gates, sparsity=1.0).any()


def test_loads_bare_tsv_and_clips(tmp_path):
    tsv = tmp_path / "g.tsv"
    tsv.write_text("1.2\t-0.1\n0.5\t0.5\n")
    assert load_gates(str(tsv)).gates.tolist() == [[1.0, 0.0], [0.5, 0.5]]


@pytest.mark.parametrize("content,msg", [
    ("", "empty"),
    ("0.1\t0.2\n0.3\n", "ragged"),
    ("0.1\tnan\n", "NaN/inf"),
    ("0.1\tinf\n", "NaN/inf"),
    ("0.1\tabc\n", "not a row of numbers"),
])
def test_bad_tsv(tmp_path, content, msg):
    tsv = tmp_path / "full_attention_heads.tsv"
    tsv.write_text(content)
    with pytest.raises(DuoConfigError, match=msg):
        load_gates(str(tmp_path))


def test_binary_garbage(tmp_path):
    (tmp_path / "x.tsv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DuoConfigError, match="not text"):
        load_gates(str(tmp_path / "x.tsv"))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DuoConfigError, match="does not exist"):
        load_gates(str(tmp_path / "nope"))
    with pytest.raises(DuoConfigError, match="has no full_attention_heads.tsv"):
        load_gates(str(tmp_path))


def test_shape_mismatch_names_both():
    with pytest.raises(DuoConfigError, match=r"\(32, 8\).*\(30, 3\)"):
        check_shape(np.ones((32, 8)), 30, 3, "SmolLM2")


@pytest.mark.parametrize("kv_heads", [8, 32])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_slicing_covers_heads_like_vllm(kv_heads, tp):
    mask = np.random.RandomState(0).randint(0, 2, (32, kv_heads)).astype(np.uint8)
    parts = [slice_for_rank(mask, tp, r) for r in range(tp)]
    assert all(p.shape == (32, kv_heads // tp) for p in parts)
    assert np.array_equal(np.concatenate(parts, axis=1), mask)
    # every rank reports the same slot counts (vLLM requires equal specs on all ranks)
    r0 = [layer_slots(mask, i, tp, 0) for i in range(32)]
    for r in range(tp):
        for i in range(32):
            s = layer_slots(mask, i, tp, r)
            assert (len(s.retrieval_heads), len(s.streaming_heads)) == \
                (len(r0[i].retrieval_heads), len(r0[i].streaming_heads))
            assert sorted(h for h in s.retrieval_heads + s.streaming_heads if h >= 0) == list(range(kv_heads // tp))
    assert sum(slot_counts(mask, tp)) >= 32 * kv_heads // tp


def test_tp_replication_when_tp_exceeds_kv_heads():
    # vLLM: with 2 KV heads and TP 8, ranks 0-3 hold head 0 and ranks 4-7 head 1.
    assert [rank_kv_heads(2, 8, r) for r in range(8)] == [[0]] * 4 + [[1]] * 4


@pytest.mark.parametrize("kv,tp,msg", [(8, 3, "does not divide"), (4, 6, "not a multiple"), (8, 0, ">= 1")])
def test_tp_that_does_not_fit(kv, tp, msg):
    with pytest.raises(DuoConfigError, match=msg):
        check_tp(kv, tp)
