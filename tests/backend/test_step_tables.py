"""``step_tables``: how one kernel launch finds every slot's cache and its group's tables, in
buffers that stay in place across steps (what a replayed CUDA graph needs) (CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_duo.backend.step_tables import StepTables
from vllm_duo.slot_plan import RETRIEVAL, STREAMING

BS, D = 16, 64


def _slot(name: str, kind: int, head: int, blocks: int = 4):
    cache = torch.zeros(blocks, 1, BS, 2 * D, dtype=torch.bfloat16)
    return SimpleNamespace(name=name, kind=kind, head=head, layer=SimpleNamespace(kv_cache=cache))


def _layer():
    """One layer: a retrieval slot (group 0), a streaming slot and a padding slot (group 1)."""
    tables = StepTables(max_tokens=8, device="cpu")
    rows = [tables.add_group(["l0"]), tables.add_group(["l0.duo_s0", "l0.duo_s1"])]
    slots = [_slot("l0", RETRIEVAL, 0), _slot("l0.duo_s0", STREAMING, 1), _slot("l0.duo_s1", STREAMING, -1)]
    return tables, slots, [rows[0], rows[1], rows[1]]


def test_groups_get_rows_once():
    tables = StepTables(max_tokens=8, device="cpu")
    assert tables.add_group(["a", "b"]) == 0 and tables.add_group(["c"]) == 1
    assert tables.add_group(["b", "a"]) == 0  # a second builder of the same group shares the row


def test_slot_mappings_are_written_in_place():
    tables, _, _ = _layer()
    tables.write_slot_mapping(1, torch.arange(5) + 100)
    buf = tables.slot_mappings
    assert buf.dtype == torch.int64 and buf.shape == (2, 8)
    assert buf[1, :5].tolist() == [100, 101, 102, 103, 104]
    tables.write_slot_mapping(1, torch.tensor([7, 8]))  # a shorter step
    assert tables.slot_mappings is buf  # same storage: a captured graph reads this step's values
    # what the longer step wrote past this step's end no longer names a cache row
    assert buf[1].tolist() == [7, 8, -1, -1, -1, -1, -1, -1]


def test_too_many_tokens_is_refused():
    tables, _, _ = _layer()
    with pytest.raises(RuntimeError, match="exceeds the 8"):
        tables.write_slot_mapping(0, torch.arange(9))


def test_no_group_after_allocation():
    tables, _, _ = _layer()
    tables.write_slot_mapping(0, torch.arange(3))
    with pytest.raises(RuntimeError, match="after the step tables were allocated"):
        tables.add_group(["late"])


def test_layer_tensors():
    tables, slots, rows = _layer()
    retrieval, streaming = torch.zeros(3, 8, dtype=torch.int32), torch.zeros(3, 6, dtype=torch.int32)
    tables.set_block_table(0, retrieval)
    tables.set_block_table(1, streaming)
    t = tables.layer_tensors(slots, rows)
    assert t.kv_ptrs.tolist() == [s.layer.kv_cache.data_ptr() for s in slots]
    assert t.slot_kv_head.tolist() == [0, 1, -1]
    assert t.slot_streaming.tolist() == [0, 1, 1]
    assert t.slot_group.tolist() == [0, 1, 1]
    assert t.bt_ptrs.tolist() == [retrieval.data_ptr(), streaming.data_ptr(), streaming.data_ptr()]
    assert t.bt_strides.tolist() == [8, 6, 6]
    assert t.num_long_slots == 1
    # the window kernel's slots: real streaming slots only (not the padding slot)
    assert t.stream_kv_ptrs.tolist() == [slots[1].layer.kv_cache.data_ptr()]
    assert t.stream_kv_head.tolist() == [1]
    assert t.stream_bt_ptrs.tolist() == [streaming.data_ptr()] and t.stream_bt_strides.tolist() == [6]


def test_a_moved_block_table_is_followed_in_place():
    """Kernels read block-table addresses from device tables: when a group's table moves, the
    tables of every layer are rewritten in place (a captured graph then reads the new address)."""
    tables, slots, rows = _layer()
    tables.set_block_table(0, torch.zeros(3, 8, dtype=torch.int32))
    tables.set_block_table(1, torch.zeros(3, 6, dtype=torch.int32))
    t = tables.layer_tensors(slots, rows)
    ptrs, stream_ptrs = t.bt_ptrs, t.stream_bt_ptrs
    moved = torch.zeros(5, 12, dtype=torch.int32)
    tables.set_block_table(1, moved)
    assert t.bt_ptrs is ptrs and t.stream_bt_ptrs is stream_ptrs
    assert t.bt_ptrs.tolist()[1:] == [moved.data_ptr()] * 2 and t.bt_strides.tolist() == [8, 12, 12]
    assert t.stream_bt_ptrs.tolist() == [moved.data_ptr()] and t.stream_bt_strides.tolist() == [12]


def test_unexpected_cache_layout_is_refused():
    tables, slots, rows = _layer()
    slots[1].layer.kv_cache = torch.zeros(4, 1, BS, 4 * D)[..., :2 * D]  # rows not contiguous
    with pytest.raises(RuntimeError, match="expected contiguous"):
        tables.layer_tensors(slots, rows)


def test_one_table_set_per_runner():
    config = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=64),
                             compilation_config=SimpleNamespace(max_cudagraph_capture_size=512))
    a = StepTables.for_runner(config, "cpu")
    assert StepTables.for_runner(config, "cpu") is a and a.max_tokens == 512
    other = SimpleNamespace(scheduler_config=config.scheduler_config,
                            compilation_config=SimpleNamespace(max_cudagraph_capture_size=None))
    assert StepTables.for_runner(other, "cpu") is not a
