"""``step_tables``: how one kernel launch finds every slot's cache and its group's tables (CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_duo.backend.step_tables import StepTables, slot_tensors
from vllm_duo.slot_plan import RETRIEVAL, STREAMING

BS, D = 16, 64


def _slot(name: str, kind: int, head: int, blocks: int = 4):
    cache = torch.zeros(blocks, 1, BS, 2 * D, dtype=torch.bfloat16)
    return SimpleNamespace(name=name, kind=kind, head=head, layer=SimpleNamespace(kv_cache=cache))


def _step(tokens: int = 5):
    retrieval = SimpleNamespace(slot_mapping=torch.arange(tokens), block_table=torch.zeros(3, 8, dtype=torch.int32))
    streaming = SimpleNamespace(slot_mapping=torch.arange(tokens) + 100,
                                block_table=torch.zeros(3, 6, dtype=torch.int32))
    slots = [_slot("l0", RETRIEVAL, 0), _slot("l0.duo_s0", STREAMING, 1), _slot("l0.duo_s1", STREAMING, -1)]
    metas = {"l0": retrieval, "l0.duo_s0": streaming, "l0.duo_s1": streaming}
    return slots, metas, retrieval, streaming


def test_one_row_per_kv_cache_group():
    slots, metas, retrieval, streaming = _step()
    step = StepTables.for_step(metas, slots)
    assert step.group_keys(slots) == (0, 1, 1)
    assert step.slot_mappings.dtype == torch.int64 and step.slot_mappings.shape == (2, 5)
    assert step.slot_mappings[1].tolist() == [100, 101, 102, 103, 104]
    assert step.block_table_ptrs.tolist() == [retrieval.block_table.data_ptr(), streaming.block_table.data_ptr()]
    assert step.block_table_strides.tolist() == [8, 6]
    assert step.block_size == BS


def test_built_once_per_step():
    slots, metas, _, _ = _step()
    first = StepTables.for_step(metas, slots)
    assert StepTables.for_step(metas, slots) is first  # later layers of the same step
    assert StepTables.for_step(dict(metas), slots) is not first  # a new step


def test_slot_tensors():
    slots, metas, _, _ = _step()
    t = slot_tensors(slots, StepTables.for_step(metas, slots), torch.device("cpu"))
    assert t.kv_ptrs.tolist() == [s.layer.kv_cache.data_ptr() for s in slots]
    assert t.slot_kv_head.tolist() == [0, 1, -1]
    assert t.slot_streaming.tolist() == [0, 1, 1]
    assert t.slot_group.tolist() == [0, 1, 1]
    # the window kernel's slots: real streaming slots only (not the padding slot)
    assert t.stream_kv_ptrs.tolist() == [slots[1].layer.kv_cache.data_ptr()]
    assert t.stream_kv_head.tolist() == [1] and t.stream_group.tolist() == [1]


def test_unexpected_cache_layout_is_refused():
    slots, metas, _, _ = _step()
    slots[1].layer.kv_cache = torch.zeros(4, 1, BS, 4 * D)[..., :2 * D]  # rows not contiguous
    with pytest.raises(RuntimeError, match="expected contiguous"):
        slot_tensors(slots, StepTables.for_step(metas, slots), torch.device("cpu"))
