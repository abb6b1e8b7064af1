"""Spec, registration, admission cap and grouping, through vLLM's own config code."""

from __future__ import annotations

import pytest
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from tests.block_manager.conftest import (
    BLOCK,
    DTYPE,
    HEAD_DIM,
    NUM_LAYERS,
    RECENT,
    SINK,
    duo_specs,
    kv_cache_config,
    kv_cache_manager,
    make_vllm_config,
    random_mask,
)
from vllm_duo import compat
from vllm_duo.block_manager import (
    DuoStreamingManager,
    DuoStreamingSpec,
    duo_kv_cache_specs,
    register_duo_kv_cache_spec,
)
from vllm_duo.slot_plan import slot_counts


def _spec(**kw: int) -> DuoStreamingSpec:
    args = dict(sink_size=SINK, recent_size=RECENT, sliding_window=RECENT) | kw
    return DuoStreamingSpec(block_size=BLOCK, num_kv_heads=1, head_size=HEAD_DIM, dtype=DTYPE, **args)


def test_registration_is_idempotent_and_keeps_builtins() -> None:
    register_duo_kv_cache_spec()
    register_duo_kv_cache_spec()
    assert KVCacheSpecRegistry.get_manager_class(_spec()) is DuoStreamingManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(_spec()) is DuoStreamingSpec
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=HEAD_DIM, dtype=DTYPE)
    assert KVCacheSpecRegistry.get_manager_class(full) is FullAttentionManager


def test_rejects_window_narrower_than_recent() -> None:
    with pytest.raises(ValueError, match="recent_size"):
        _spec(recent_size=512, sliding_window=256)


def test_uniform_only_with_identical_streaming_specs() -> None:
    spec = _spec()
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=HEAD_DIM, dtype=DTYPE)
    swa = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=HEAD_DIM, dtype=DTYPE,
                            sliding_window=RECENT)
    assert spec.is_uniform_with_collection({"a": spec, "b": _spec()})
    for other in (full, swa, _spec(sink_size=32), _spec(sliding_window=1024)):
        assert not spec.is_uniform_with_collection({"a": spec, "b": other})
    assert not full.is_uniform_with_collection({"a": full, "b": spec})


@pytest.mark.parametrize(("in_flight", "max_len", "expected"), [
    # sink 4 blocks + cdiv(255 + in_flight, 16) + 1 window blocks
    (1024, 131072, 4 + cdiv(255 + 1024, 16) + 1),
    (16384, 131072, 4 + cdiv(255 + 16384, 16) + 1),
    # never more than the whole sequence
    (1024, 512, 512 // 16),
])
def test_admission_cap(in_flight: int, max_len: int, expected: int) -> None:
    assert _spec().max_admission_blocks_per_request(in_flight, max_len) == expected


def test_tail_only_cap_is_windows_not_in_flight_tokens() -> None:
    """Tail-only: sink + (1 + batches) windows of cdiv(255, 16) + 1 blocks, whatever is in flight;
    never more than the plain cap (tiny chunks) or the sequence."""
    tail = _spec(tail_only_batches=2)
    assert tail.max_admission_blocks_per_request(32768, 131072) == 4 + 3 * 17
    assert tail.max_admission_blocks_per_request(16, 131072) == _spec().max_admission_blocks_per_request(16, 131072)
    assert tail.max_admission_blocks_per_request(32768, 256) == 256 // 16
    assert not tail.is_uniform_with_collection({"a": tail, "b": _spec()})
    with pytest.raises(ValueError, match="tail_only_batches"):
        _spec(tail_only_batches=-1)


def test_prefill_window_sets_the_cap() -> None:
    assert _spec(sliding_window=1024).max_admission_blocks_per_request(1024, 131072) == \
        4 + cdiv(1023 + 1024, 16) + 1


def test_slot_names_and_kinds() -> None:
    mask = random_mask()
    mask[0], mask[1] = 1, 0  # an all-retrieval and an all-streaming layer too
    specs = duo_specs(mask)
    n_ret, n_str = slot_counts(mask, 1)
    assert len(specs) == n_ret + n_str == NUM_LAYERS * 8
    assert sum(isinstance(s, DuoStreamingSpec) for s in specs.values()) == n_str
    for i in range(NUM_LAYERS):
        base, r = f"model.layers.{i}.self_attn.attn", int(mask[i].sum())
        suffixes = [f"duo_r{j}" for j in range(r)] + [f"duo_s{j}" for j in range(8 - r)]
        expected = [base] + [f"{base}.{s}" for s in suffixes[1:]]  # slot 0 is the real layer
        assert [n for n in specs if n == base or n.startswith(base + ".")] == expected
        kinds = [FullAttentionSpec] * r + [DuoStreamingSpec] * (8 - r)
        assert [type(specs[n]) for n in expected] == kinds


def test_tp_ranks_report_identical_specs() -> None:
    mask = random_mask(3)
    ranks = [duo_kv_cache_specs(mask, block_size=BLOCK, head_size=HEAD_DIM, dtype=DTYPE, sink_size=SINK,
                                recent_size=RECENT, prefill_window=RECENT, tp_size=2, tp_rank=r)
             for r in range(2)]
    assert ranks[0] == ranks[1]
    assert len(ranks[0]) == sum(slot_counts(mask, 2))


def test_vllm_groups_streaming_apart_and_caps_admission(model_config) -> None:
    config = make_vllm_config(model_config, max_model_len=32768, max_num_batched_tokens=2048)
    specs = duo_specs(random_mask())
    cfg = kv_cache_config(config, specs, num_blocks=4000)
    kinds = [type(g.kv_cache_spec) for g in cfg.kv_cache_groups]
    assert set(kinds) == {FullAttentionSpec, DuoStreamingSpec}
    for group in cfg.kv_cache_groups:
        assert {type(specs[n]) for n in group.layer_names} == {type(group.kv_cache_spec)}
    assert sorted(n for g in cfg.kv_cache_groups for n in g.layer_names) == sorted(specs)
    if compat.V033:
        # One packed buffer that every group overlays: one same-sized tensor per group.
        assert sorted(sorted(t.layers) for t in cfg.kv_cache_tensors) == \
            sorted(sorted(g.layer_names) for g in cfg.kv_cache_groups)
        assert len({t.size for t in cfg.kv_cache_tensors}) == 1
    else:
        # One tensor per group slot, shared by one layer of every group: all pages are 1 head.
        assert len(cfg.kv_cache_tensors) == max(len(g.layer_names) for g in cfg.kv_cache_groups)

    manager = kv_cache_manager(config, cfg)
    for single in manager.coordinator.single_type_managers:
        if isinstance(single.kv_cache_spec, DuoStreamingSpec):
            assert isinstance(single, DuoStreamingManager)
            assert compat.admission_cap(single) == \
                single.kv_cache_spec.max_admission_blocks_per_request(config.max_in_flight_tokens, 32768)
        else:
            assert compat.admission_cap(single) is None
