"""Device tables that let one kernel launch reach every slot cache of a layer.

vLLM gives each KV-cache group (retrieval slots, streaming slots) its own slot mapping and block
table. Per step, :class:`StepTables` stacks them once for all layers; per layer,
:func:`slot_tensors` records which cache and which group each slot uses (static once vLLM has
bound the caches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_duo.slot_plan import RETRIEVAL


@dataclass
class StepTables:
    metas: dict  # vLLM's per-layer metadata of this step (identity marks the step)
    group_index: dict[int, int]  # id(group metadata) -> row in the stacked tables
    slot_mappings: torch.Tensor  # int64 [num_groups, num_tokens]
    block_table_ptrs: torch.Tensor  # int64 [num_groups]
    block_table_strides: torch.Tensor  # int64 [num_groups]
    block_size: int

    @classmethod
    def for_step(cls, metas: dict, slots: list) -> "StepTables":
        """The tables of this step, built by the first layer that asks."""
        global _current
        if _current is not None and _current.metas is metas:
            return _current
        groups = list({id(m): m for m in metas.values()}.values())
        n = min(g.slot_mapping.shape[0] for g in groups)
        device = groups[0].slot_mapping.device
        block_size = slots[0].layer.kv_cache.shape[2]
        cur = cls(
            metas=metas, group_index={id(g): i for i, g in enumerate(groups)},
            slot_mappings=torch.stack([g.slot_mapping[:n].to(torch.int64) for g in groups]),
            block_table_ptrs=torch.tensor([g.block_table.data_ptr() for g in groups],
                                          dtype=torch.int64).to(device, non_blocking=True),
            block_table_strides=torch.tensor([g.block_table.stride(0) for g in groups],
                                             dtype=torch.int64).to(device, non_blocking=True),
            block_size=block_size)
        _current = cur
        return cur

    def group_keys(self, slots: list) -> tuple[int, ...]:
        return tuple(self.group_index[id(self.metas[s.name])] for s in slots)


_current: StepTables | None = None  # holds its metas, so a step's id cannot be reused


@dataclass(frozen=True)
class SlotTensors:
    kv_ptrs: torch.Tensor  # int64 [num_slots]: data_ptr() of each slot cache
    slot_kv_head: torch.Tensor  # int32 [num_slots], -1 = padding slot
    slot_streaming: torch.Tensor  # int32 [num_slots]
    slot_group: torch.Tensor  # int32 [num_slots]: the slot's row in StepTables
    # The real streaming slots alone (the window prefill kernel's launch): cache pointers,
    # KV heads and group rows (int64, to index StepTables' per-step tables).
    stream_kv_ptrs: torch.Tensor
    stream_kv_head: torch.Tensor
    stream_group: torch.Tensor


def slot_tensors(slots: list, step: StepTables, device: torch.device) -> SlotTensors:
    """Per-slot kernel tables of one layer; checks the cache layout the kernels address."""
    for s in slots:
        c = s.layer.kv_cache
        bs, row = c.shape[2], c.shape[3]
        if c.shape[1] != 1 or c.stride(3) != 1 or c.stride(2) != row or c.stride(0) != bs * row:
            raise RuntimeError(f"duo slot cache {s.name} has layout {tuple(c.shape)}/{c.stride()}; "
                               "expected contiguous [num_blocks, 1, block_size, 2 * head_size]")
    streaming = [i for i, s in enumerate(slots) if s.head >= 0 and s.kind != RETRIEVAL]
    groups = step.group_keys(slots)
    return SlotTensors(
        kv_ptrs=torch.tensor([s.layer.kv_cache.data_ptr() for s in slots], dtype=torch.int64,
                             device=device),
        slot_kv_head=torch.tensor([s.head for s in slots], dtype=torch.int32, device=device),
        slot_streaming=torch.tensor([int(s.kind != RETRIEVAL) for s in slots], dtype=torch.int32,
                                    device=device),
        slot_group=torch.tensor(groups, dtype=torch.int32, device=device),
        stream_kv_ptrs=torch.tensor([slots[i].layer.kv_cache.data_ptr() for i in streaming],
                                    dtype=torch.int64, device=device),
        stream_kv_head=torch.tensor([slots[i].head for i in streaming], dtype=torch.int32, device=device),
        stream_group=torch.tensor([groups[i] for i in streaming], dtype=torch.int64, device=device))
