"""``write_kv``: store a step's keys and values into every slot cache of a layer, one launch.

Kernel: ``csrc/write_kv.cu``. Replaces one ``reshape_and_cache_flash`` call per slot.
"""

from __future__ import annotations

import torch

from vllm_duo.ops import _ext
from vllm_duo.ops.slots import check_kv_scales


def _check_inputs(key: torch.Tensor, value: torch.Tensor, kv_ptrs: torch.Tensor,
                  slot_kv_head: torch.Tensor, slot_group: torch.Tensor, slot_mappings: torch.Tensor,
                  k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """Shape/dtype/device errors worded for the caller; shared by the wrapper and the fake impl."""
    if key.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"write_kv: key must be bfloat16 or float16, got {key.dtype}")
    if key.dim() != 3 or key.shape[2] % 8:
        raise ValueError("write_kv: key must be [num_tokens, num_kv_heads, head_dim] with head_dim a "
                         f"multiple of 8, got {tuple(key.shape)}")
    if value.shape != key.shape or value.dtype != key.dtype or value.device != key.device:
        raise ValueError(f"write_kv: value ({value.dtype} {tuple(value.shape)} on {value.device}) must "
                         f"match key ({key.dtype} {tuple(key.shape)} on {key.device})")
    for name, t in (("key", key), ("value", value)):
        if t.stride(2) != 1 or t.stride(1) % 8 or t.stride(0) % 8:
            raise ValueError(f"write_kv: {name} needs a contiguous last dimension and row strides that "
                             f"are multiples of 8 elements (16 bytes), got strides {t.stride()}")
    num_slots = kv_ptrs.numel()
    for name, t, want in (("kv_ptrs", kv_ptrs, torch.int64), ("slot_kv_head", slot_kv_head, torch.int32),
                          ("slot_group", slot_group, torch.int32)):
        if t.dtype != want or t.shape != (num_slots,) or t.device != key.device:
            raise ValueError(f"write_kv: {name} must be {want} [num_slots={num_slots}] on {key.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if slot_mappings.dtype != torch.int64 or slot_mappings.dim() != 2 or \
            slot_mappings.shape[1] < key.shape[0] or slot_mappings.device != key.device:
        raise ValueError(f"write_kv: slot_mappings must be int64 [num_groups, >= {key.shape[0]}] on "
                         f"{key.device}, got {slot_mappings.dtype} {tuple(slot_mappings.shape)} on "
                         f"{slot_mappings.device}")
    if slot_mappings.stride(1) != 1:
        raise ValueError("write_kv: slot_mappings needs contiguous rows")
    check_kv_scales("write_kv", k_scale, v_scale, key.device)


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_ptrs: torch.Tensor,
             slot_kv_head: torch.Tensor, slot_group: torch.Tensor,
             slot_mappings: torch.Tensor, *, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None, check: bool = True) -> None:
    """Write K/V of each slot's KV head to its cache rows ``slot_mappings[slot_group[slot], t]``.

    A row is ``block_id * block_size + offset`` in the slot cache ``[num_blocks, block_size, 2D]``
    (K goes to ``[..., :D]``, V to ``[..., D:]``); -1 rows and -1 slots are skipped. Slots of one
    kind usually share a row of ``slot_mappings`` (group), as they share vLLM's slot mapping.
    With ``k_scale`` and ``v_scale`` (float32, one element each, on the device) the caches are
    fp8 e4m3 and take ``e4m3(x / scale)``, rounded to nearest even and saturated to +-448, as
    vLLM's ``reshape_and_cache_flash``.

    >>> import torch
    >>> from vllm_duo.ops import write_kv
    >>> T, H, D, bs = 3, 2, 128, 16                 # tokens, KV heads, head_dim, block_size
    >>> key, value = (torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    >>> caches = [torch.zeros(8, bs, 2 * D, dtype=torch.bfloat16, device="cuda") for _ in range(H)]
    >>> kv_ptrs = torch.tensor([c.data_ptr() for c in caches], device="cuda")
    >>> heads = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    >>> groups = torch.tensor([0, 1], dtype=torch.int32, device="cuda")   # each slot its own mapping
    >>> mappings = torch.tensor([[16, 17, 18], [40, -1, 41]], device="cuda")  # [num_groups, T]
    >>> write_kv(key, value, kv_ptrs, heads, groups, mappings)
    >>> bool((caches[1][2, 8, :D] == key[0, 1]).all())   # row 40 = block 2, offset 8
    True
    """
    if check:  # the C++ op makes the same checks; check=False is the per-layer hot path
        _ext.require()
        if key.device.type != "cuda":
            raise ValueError(f"write_kv: key must be a CUDA tensor, got {key.device}")
        _check_inputs(key, value, kv_ptrs, slot_kv_head, slot_group, slot_mappings, k_scale, v_scale)
    torch.ops.vllm_duo.write_kv(key, value, kv_ptrs, slot_kv_head, slot_group, slot_mappings,
                                k_scale, v_scale)


@_ext.register_fake("vllm_duo::write_kv")
def _write_kv_fake(key: torch.Tensor, value: torch.Tensor, kv_ptrs: torch.Tensor,
                   slot_kv_head: torch.Tensor, slot_group: torch.Tensor,
                   slot_mappings: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    _check_inputs(key, value, kv_ptrs, slot_kv_head, slot_group, slot_mappings, k_scale, v_scale)


if _ext.available():
    # It writes through raw addresses torch cannot see: keep graph passes from dropping it.
    torch.fx.node.has_side_effect(torch.ops.vllm_duo.write_kv.default)
