"""Device tables that let one kernel launch reach every slot cache of a layer, in buffers that
stay in place, so a CUDA graph captured once replays correctly with each later step's values.

vLLM gives each KV-cache group (retrieval slots, streaming slots) its own slot mapping and block
table, and one metadata builder per group. One :class:`StepTables` is shared by the builders of a
model runner; each group owns a row. Per step, ``build()`` copies the group's slot mapping into
its row of ``slot_mappings`` (a persistent ``[num_groups, max_tokens]`` buffer, the layout
``write_kv`` reads) and records where the group's block table lives. Per layer,
:class:`SlotTensors` says which cache, which row and which block table each slot uses: the
kernels read block-table addresses from these device tables, so a table that moves is handled by
rewriting the addresses in place (outside any graph), never by re-capturing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_duo.slot_plan import RETRIEVAL

_RUNNERS: dict[int, tuple[object, "StepTables"]] = {}  # id(vllm_config) -> (config kept alive, tables)


@dataclass(frozen=True)
class SlotTensors:
    """One layer's per-slot kernel inputs (device), fixed once the caches are bound."""

    kv_ptrs: torch.Tensor  # int64 [num_slots]: data_ptr() of each slot cache
    slot_kv_head: torch.Tensor  # int32 [num_slots], -1 = padding slot
    slot_streaming: torch.Tensor  # int32 [num_slots]
    slot_group: torch.Tensor  # int32 [num_slots]: the slot's row in StepTables.slot_mappings
    bt_ptrs: torch.Tensor  # int64 [num_slots]: data_ptr() of the slot's group block table
    bt_strides: torch.Tensor  # int64 [num_slots]: its row stride
    # The real streaming slots alone (the window prefill kernel's launch).
    stream_kv_ptrs: torch.Tensor
    stream_kv_head: torch.Tensor
    stream_bt_ptrs: torch.Tensor
    stream_bt_strides: torch.Tensor
    rows: tuple[int, ...]  # host copy of slot_group
    stream_rows: tuple[int, ...]
    num_long_slots: int  # real retrieval slots: the ones whose keys grow with the context


class StepTables:
    """Per-step tables of all KV-cache groups of one model runner, in persistent buffers."""

    def __init__(self, max_tokens: int, device: torch.device | str):
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.rows: dict[tuple[str, ...], int] = {}
        self.slot_mappings: torch.Tensor | None = None  # int64 [num_rows, max_tokens]
        self._filled: list[int] = []  # per row: columns written by the last step
        self.bt_ptrs: list[int] = []  # per row, host: where the group's block table lives
        self.bt_strides: list[int] = []
        self._layers: dict[str, SlotTensors] = {}  # by first slot name: rewritten if a table moves

    @classmethod
    def for_runner(cls, vllm_config, device: torch.device | str) -> "StepTables":
        """The tables shared by every duo builder of the model runner that owns ``vllm_config``."""
        key = id(vllm_config)
        if key not in _RUNNERS:
            sched = vllm_config.scheduler_config
            capture = getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
            _RUNNERS[key] = (vllm_config, cls(max(sched.max_num_batched_tokens, capture), device))
        return _RUNNERS[key][1]

    def add_group(self, layer_names) -> int:
        """The row of the KV-cache group holding ``layer_names`` (builders of one group share it)."""
        key = tuple(sorted(layer_names))
        if key not in self.rows:
            if self.slot_mappings is not None:
                raise RuntimeError("duo: a KV-cache group was added after the step tables were "
                                   "allocated; builders must all exist before the first step")
            self.rows[key] = len(self.rows)
            self._filled.append(0)
            self.bt_ptrs.append(0)
            self.bt_strides.append(0)
        return self.rows[key]

    def write_slot_mapping(self, row: int, slot_mapping: torch.Tensor) -> None:
        """Copy this step's slot mapping of group ``row`` in place; columns the previous step
        wrote past this one's end become -1, so padded tokens of a replayed graph write nothing."""
        if self.slot_mappings is None:
            self.slot_mappings = torch.full((len(self.rows), self.max_tokens), -1, dtype=torch.int64,
                                            device=self.device)
        m = slot_mapping.shape[0]
        if m > self.max_tokens:
            raise RuntimeError(f"duo: a step of {m} tokens exceeds the {self.max_tokens} the step "
                               "tables were sized for (max_num_batched_tokens)")
        dst = self.slot_mappings[row]
        dst[:m].copy_(slot_mapping, non_blocking=True)
        if self._filled[row] > m:
            dst[m:self._filled[row]].fill_(-1)
        self._filled[row] = m

    def set_block_table(self, row: int, table: torch.Tensor) -> None:
        """Record group ``row``'s block table; if it moved, rewrite every layer's addresses."""
        ptr, stride = table.data_ptr(), table.stride(0)
        if (self.bt_ptrs[row], self.bt_strides[row]) == (ptr, stride):
            return
        self.bt_ptrs[row], self.bt_strides[row] = ptr, stride
        for t in self._layers.values():
            self._write_block_tables(t)

    def layer_tensors(self, slots: list, rows: list[int]) -> SlotTensors:
        """Per-slot kernel tables of one layer (``rows[i]``: slot i's group row); checks the cache
        layout the kernels address. Build once the caches are bound, outside any graph."""
        for s in slots:
            c = s.layer.kv_cache
            bs, width = c.shape[2], c.shape[3]
            if c.shape[1] != 1 or c.stride(3) != 1 or c.stride(2) != width or c.stride(0) != bs * width:
                raise RuntimeError(f"duo slot cache {s.name} has layout {tuple(c.shape)}/{c.stride()}; "
                                   "expected contiguous [num_blocks, 1, block_size, 2 * head_size]")
        streaming = [i for i, s in enumerate(slots) if s.head >= 0 and s.kind != RETRIEVAL]
        dev = self.device

        def i64(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.int64, device=dev)

        def i32(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.int32, device=dev)

        t = SlotTensors(
            kv_ptrs=i64(s.layer.kv_cache.data_ptr() for s in slots),
            slot_kv_head=i32(s.head for s in slots),
            slot_streaming=i32(int(s.kind != RETRIEVAL) for s in slots),
            slot_group=i32(rows),
            bt_ptrs=i64([0] * len(slots)), bt_strides=i64([0] * len(slots)),
            stream_kv_ptrs=i64(slots[i].layer.kv_cache.data_ptr() for i in streaming),
            stream_kv_head=i32(slots[i].head for i in streaming),
            stream_bt_ptrs=i64([0] * len(streaming)), stream_bt_strides=i64([0] * len(streaming)),
            rows=tuple(rows), stream_rows=tuple(rows[i] for i in streaming),
            num_long_slots=sum(1 for s in slots if s.head >= 0 and s.kind == RETRIEVAL))
        self._write_block_tables(t)
        self._layers[slots[0].name] = t
        return t

    def _write_block_tables(self, t: SlotTensors) -> None:
        for rows, ptrs, strides in ((t.rows, t.bt_ptrs, t.bt_strides),
                                    (t.stream_rows, t.stream_bt_ptrs, t.stream_bt_strides)):
            if rows:
                ptrs.copy_(torch.tensor([self.bt_ptrs[r] for r in rows], dtype=torch.int64))
                strides.copy_(torch.tensor([self.bt_strides[r] for r in rows], dtype=torch.int64))
