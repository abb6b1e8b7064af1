"""``paged_decode``: DuoAttention decode attention over every KV slot of a layer, one launch.

Kernel: ``csrc/paged_decode.cu``. Host work here is planning the flash-decoding partitions from a
host int and allocating the output and workspace, so the per-layer call never syncs.
"""

from __future__ import annotations

import functools

import torch

from vllm_duo.ops import _ext
from vllm_duo.ops.slots import check_kv_scales

HEAD_DIMS = (64, 128, 256)
MAX_GROUP = 8  # query heads per KV head the kernel keeps in registers
PARTITION_SIZE = 512  # keys per CTA: amortises the combine, still splits one long sequence
MIN_PARTITION_SIZE = 128
# Long rows take longer partitions, up to this, at about 1/32 of the row: on an H200 at 64K-128K
# keys, 2K-key partitions beat 512-key ones by 2-8 %, at 4K keys 512 stays best
# (benchmarks/results/decode_kernel_nvidia_h200_2026-11-30.json).
MAX_PLANNED_PARTITION = 2048
_KEYS_PER_PARTITION_SHARE = 32
MAX_PARTITIONS = 128  # bounds workspace and combine cost; past 64K keys partitions grow
_CTAS_PER_SM = 4  # below this many CTAs per SM, partitions shrink to fill the GPU
_GRAPH_CTAS_PER_SM = 16  # a captured launch: long rows split until this many CTAs per SM


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():  # tracing with fake CUDA tensors on a CPU-only host
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_partitions(max_seq_len: int, num_seqs: int, num_slots: int, num_sms: int) -> tuple[int, int]:
    """``(partition_size, num_partitions)`` for a launch whose longest row has ``max_seq_len`` keys.

    Partitions start at ``PARTITION_SIZE`` keys, or about a 32nd of a long row (up to
    ``MAX_PLANNED_PARTITION``); they shrink (down to 128 keys) when the batch would not give every
    SM a few CTAs, and grow when a row would need more than ``MAX_PARTITIONS``. Any plan is correct
    for any row: the kernel lengthens a row's partitions if it holds more keys than planned for.
    """
    size = PARTITION_SIZE
    while size < MAX_PLANNED_PARTITION and size * 2 * _KEYS_PER_PARTITION_SHARE <= max_seq_len:
        size *= 2
    while size > MIN_PARTITION_SIZE and \
            num_seqs * num_slots * _cdiv(max_seq_len, size) < _CTAS_PER_SM * num_sms:
        size //= 2
    size = max(size, MIN_PARTITION_SIZE * _cdiv(max_seq_len, MIN_PARTITION_SIZE * MAX_PARTITIONS))
    return size, max(1, _cdiv(max_seq_len, size))


def plan_graph_partitions(max_len: int, num_seqs: int, num_long_slots: int,
                          num_sms: int) -> tuple[int, int]:
    """``(partition_size, num_partitions)`` for a launch captured once in a CUDA graph and
    replayed for rows of any length up to ``max_len``.

    The grid is fixed at capture, so it cannot follow each step's longest row. Rows up to
    ``PARTITION_SIZE`` keys take one partition (the other CTAs of the row exit at once); a longer
    row spreads over all ``num_partitions`` (the kernel lengthens partitions to cover it), which
    are enough for the ``num_seqs * num_long_slots`` long rows (retrieval slots) to give every SM
    ``_GRAPH_CTAS_PER_SM`` CTAs.
    """
    wanted = _cdiv(_GRAPH_CTAS_PER_SM * num_sms, max(1, num_seqs * num_long_slots))
    return PARTITION_SIZE, max(1, min(wanted, MAX_PARTITIONS, _cdiv(max_len, PARTITION_SIZE)))


def _check_inputs(q: torch.Tensor, slot_tensors: dict[str, torch.Tensor], seq_lens: torch.Tensor,
                  num_kv_heads: int, block_size: int, sink_size: int, window: int,
                  k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """Shape/dtype/device errors worded for the caller; shared by the wrapper and the fake impl."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"paged_decode: q must be bfloat16 or float16, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"paged_decode: q must be [num_seqs, num_q_heads, head_dim], got {tuple(q.shape)}")
    num_seqs, num_q_heads, head_dim = q.shape
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"paged_decode: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if q.stride(2) != 1 or q.stride(1) % 8 or q.stride(0) % 8:
        raise ValueError("paged_decode: q needs a contiguous last dimension and row strides that are "
                         f"multiples of 8 elements (16 bytes), got strides {q.stride()}")
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"paged_decode: num_q_heads ({num_q_heads}) must be a multiple of "
                         f"num_kv_heads ({num_kv_heads})")
    if num_q_heads // num_kv_heads > MAX_GROUP:
        raise ValueError(f"paged_decode: at most {MAX_GROUP} query heads per KV head, got "
                         f"{num_q_heads // num_kv_heads}")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"paged_decode: block_size must be a power of two, got {block_size}")
    if sink_size < 0 or window < 1:
        raise ValueError(f"paged_decode: need sink_size >= 0 and window >= 1, got {sink_size}, {window}")
    num_slots = slot_tensors["kv_ptrs"].numel()
    for name, t in slot_tensors.items():
        want = torch.int64 if name in ("kv_ptrs", "block_table_ptrs", "block_table_strides") else torch.int32
        if t.dtype != want or t.shape != (num_slots,) or t.device != q.device:
            raise ValueError(f"paged_decode: {name} must be {want} [num_slots={num_slots}] on {q.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (num_seqs,) or seq_lens.device != q.device:
        raise ValueError(f"paged_decode: seq_lens must be int32 [num_seqs={num_seqs}] on {q.device}, got "
                         f"{seq_lens.dtype} {tuple(seq_lens.shape)} on {seq_lens.device}")
    check_kv_scales("paged_decode", k_scale, v_scale, q.device)


def paged_decode(q: torch.Tensor, kv_ptrs: torch.Tensor, block_table_ptrs: torch.Tensor,
                 block_table_strides: torch.Tensor, slot_kv_head: torch.Tensor,
                 slot_streaming: torch.Tensor, seq_lens: torch.Tensor, *, max_seq_len: int,
                 num_kv_heads: int, block_size: int, sink_size: int, window: int,
                 scale: float | None = None, partition_size: int | None = None,
                 out: torch.Tensor | None = None, graph_slots: int | None = None,
                 check: bool = True, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention (one query token per sequence) for all slots; returns ``out``.

    Retrieval slots attend keys ``[0, L)``, streaming slots ``p < sink_size or p > L-1-window``
    (L = ``seq_lens[i]``, the query is at L-1; L = 0 rows get zeros). Query heads
    ``h*G .. h*G+G-1`` use the slot that serves KV head h. ``max_seq_len`` (a host int, >= every
    L for best speed) sets the launch shape; under CUDA graphs pass a fixed value such as the
    model's max length and ``graph_slots`` (the number of slots whose rows grow with the
    context, e.g. real retrieval slots): the plan is then :func:`plan_graph_partitions`.
    Streaming slots never touch block-table entries between sink and window. ``check=False``
    skips this wrapper's input checks (the C++ op makes the same ones; per-layer hot path).
    With ``k_scale`` and ``v_scale`` (float32, one element each, on the device, read there, so
    a captured graph uses their values at replay) the caches are fp8 e4m3 and K/V read as
    ``float(fp8) * scale``; q and ``out`` keep q's dtype.

    >>> import torch
    >>> from vllm_duo.ops import decode_slots, paged_decode
    >>> D, bs, G = 128, 16, 4                      # head_dim, block_size, query heads per KV head
    >>> caches = [torch.randn(64, bs, 2 * D, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    >>> tables = [torch.randperm(64, dtype=torch.int32, device="cuda").view(2, 32) for _ in range(2)]
    >>> slots = decode_slots(caches, tables, kv_heads=[0, 1], streaming=[False, True], device="cuda")
    >>> q = torch.randn(2, 2 * G, D, dtype=torch.bfloat16, device="cuda")  # [num_seqs, q heads, D]
    >>> seq_lens = torch.tensor([500, 37], dtype=torch.int32, device="cuda")
    >>> out = paged_decode(q, *slots, seq_lens, max_seq_len=500, num_kv_heads=2, block_size=bs,
    ...                    sink_size=64, window=256)
    >>> out.shape
    torch.Size([2, 8, 128])
    """
    if check:
        _ext.require()
        if q.device.type != "cuda":
            raise ValueError(f"paged_decode: q must be a CUDA tensor, got {q.device}")
        slot_tensors = dict(kv_ptrs=kv_ptrs, block_table_ptrs=block_table_ptrs,
                            block_table_strides=block_table_strides, slot_kv_head=slot_kv_head,
                            slot_streaming=slot_streaming)
        _check_inputs(q, slot_tensors, seq_lens, num_kv_heads, block_size, sink_size, window,
                      k_scale, v_scale)
        if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                                or out.stride(2) != 1):
            raise ValueError(f"paged_decode: out must be {q.dtype} {tuple(q.shape)} on {q.device} with "
                             f"a contiguous last dimension, got {out.dtype} {tuple(out.shape)} on "
                             f"{out.device}")
        if partition_size is not None and partition_size < 1:
            raise ValueError(f"paged_decode: partition_size must be positive, got {partition_size}")
    num_seqs, num_q_heads, head_dim = q.shape
    if partition_size is None and graph_slots is not None:
        partition_size, num_partitions = plan_graph_partitions(
            max_seq_len, num_seqs, graph_slots, _num_sms(q.device.index or 0))
    elif partition_size is None:
        partition_size, num_partitions = plan_partitions(
            max_seq_len, num_seqs, kv_ptrs.numel(), _num_sms(q.device.index or 0))
    else:
        num_partitions = max(1, _cdiv(max_seq_len, partition_size))
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    tmp_out = torch.empty(num_seqs, num_q_heads, num_partitions, head_dim, dtype=torch.float32,
                          device=q.device)
    tmp_lse = torch.empty(num_seqs, num_q_heads, num_partitions, dtype=torch.float32, device=q.device)
    torch.ops.vllm_duo.paged_decode(
        out, q, kv_ptrs, block_table_ptrs, block_table_strides, slot_kv_head, slot_streaming,
        seq_lens, num_kv_heads, block_size, sink_size, window,
        head_dim ** -0.5 if scale is None else scale, partition_size, tmp_out, tmp_lse, k_scale,
        v_scale)
    return out


@_ext.register_fake("vllm_duo::paged_decode")
def _paged_decode_fake(out: torch.Tensor, q: torch.Tensor, kv_ptrs: torch.Tensor,
                       block_table_ptrs: torch.Tensor, block_table_strides: torch.Tensor,
                       slot_kv_head: torch.Tensor, slot_streaming: torch.Tensor,
                       seq_lens: torch.Tensor, num_kv_heads: int, block_size: int, sink_size: int,
                       window: int, scale: float, partition_size: int, tmp_out: torch.Tensor,
                       tmp_lse: torch.Tensor, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    slot_tensors = dict(kv_ptrs=kv_ptrs, block_table_ptrs=block_table_ptrs,
                        block_table_strides=block_table_strides, slot_kv_head=slot_kv_head,
                        slot_streaming=slot_streaming)
    _check_inputs(q, slot_tensors, seq_lens, num_kv_heads, block_size, sink_size, window, k_scale,
                  v_scale)
    num_seqs, num_q_heads, head_dim = q.shape
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"paged_decode: out must be {q.dtype} {tuple(q.shape)}")
    parts = tmp_lse.shape[2] if tmp_lse.dim() == 3 else 0
    if tmp_lse.shape != (num_seqs, num_q_heads, parts) or parts < 1 or \
            tmp_out.shape != (num_seqs, num_q_heads, parts, head_dim) or \
            tmp_out.dtype != torch.float32 or tmp_lse.dtype != torch.float32:
        raise ValueError("paged_decode: tmp_out/tmp_lse must be float32 [num_seqs, num_q_heads, P, "
                         "head_dim] and [num_seqs, num_q_heads, P]")
