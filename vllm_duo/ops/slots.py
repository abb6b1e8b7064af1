"""Slot tables: the device tensors that let one kernel launch reach every slot cache of a layer.

A slot is one KV head's own cache, a separate allocation ``[num_blocks, block_size, 2 * head_dim]``
(K in ``[..., :head_dim]``, V in ``[..., head_dim:]``) with its own int32 block table
``[rows, row_stride]``. The kernels take raw addresses, so the launch does not depend on how many
caches there are or where they live, and stays valid inside a CUDA graph as long as the
addressed tensors stay alive and in place.

The caches hold the query's dtype, or fp8 e4m3 when the ops get ``k_scale`` and ``v_scale``
(vLLM's per-tensor ``layer._k_scale``/``_v_scale``): stored ``e4m3(x / scale)``, read
``float(fp8) * scale``, as vLLM's FLASH_ATTN fp8 KV cache.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class DecodeSlots(NamedTuple):
    """Per-slot tensors in ``paged_decode``'s argument order (``paged_decode(q, *slots, ...)``)."""

    kv_ptrs: torch.Tensor  # int64 [num_slots]: data_ptr() of each slot cache
    block_table_ptrs: torch.Tensor  # int64 [num_slots]: data_ptr() of each int32 block table
    block_table_strides: torch.Tensor  # int64 [num_slots]: row stride of each block table
    slot_kv_head: torch.Tensor  # int32 [num_slots]: local KV head served, -1 = padding slot
    slot_streaming: torch.Tensor  # int32 [num_slots]: 1 = streaming head, 0 = retrieval head


def decode_slots(caches: Sequence[torch.Tensor | None], block_tables: Sequence[torch.Tensor | None],
                 kv_heads: Sequence[int], streaming: Sequence[bool],
                 device: torch.device | str) -> DecodeSlots:
    """Build :class:`DecodeSlots` on ``device``; ``None`` cache/table (padding slots) become 0.

    This copies from the host: do it when the caches or tables change (once per step at most),
    not inside a captured graph. The caller keeps ``caches`` and ``block_tables`` alive.
    """
    n = len(kv_heads)
    if not len(caches) == len(block_tables) == len(streaming) == n:
        raise ValueError("decode_slots: caches, block_tables, kv_heads and streaming need one "
                         f"entry per slot, got {len(caches)}, {len(block_tables)}, {n}, "
                         f"{len(streaming)}")
    for i, table in enumerate(block_tables):
        if table is not None and (table.dtype != torch.int32 or table.dim() != 2 or table.stride(1) != 1):
            raise ValueError(f"decode_slots: block table {i} must be int32 [rows, row_stride] "
                             f"with contiguous rows, got {table.dtype} {tuple(table.shape)}")

    def ptrs(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64,
                            device=device)

    return DecodeSlots(
        kv_ptrs=ptrs(caches),
        block_table_ptrs=ptrs(block_tables),
        block_table_strides=torch.tensor([0 if t is None else t.stride(0) for t in block_tables],
                                         dtype=torch.int64, device=device),
        slot_kv_head=torch.tensor(list(kv_heads), dtype=torch.int32, device=device),
        slot_streaming=torch.tensor([int(s) for s in streaming], dtype=torch.int32, device=device))


def check_kv_scales(op: str, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                    device: torch.device) -> None:
    """fp8 cache scales: both (float32, one element, on ``device``, read there by the kernel, so a
    captured graph sees later values) or neither (the cache dtype is the query's)."""
    if (k_scale is None) != (v_scale is None):
        raise ValueError(f"{op}: k_scale and v_scale must be given together (fp8 e4m3 cache) or not "
                         "at all")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None and (s.dtype != torch.float32 or s.numel() != 1 or s.device != device):
            raise ValueError(f"{op}: k_scale and v_scale must be float32 tensors of one element on "
                             f"{device}, got {name} {s.dtype} {tuple(s.shape)} on {s.device}")
