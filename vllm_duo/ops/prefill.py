"""``streaming_prefill``: prompt-chunk attention of every streaming slot of a layer, one launch.

A query at absolute position t reads keys p <= t with p < sink or p > t - window. Each program
takes a tile of BLOCK_M queries of one request and one query head and visits only the key tiles
of the sink and of the window behind its queries: O(sink + window) work per query, not
O(context). Keys before the chunk come from the paged slot caches, the chunk's own keys from the
step's K/V tensors, so the cache only has to hold what later steps read (the block manager maps
the rest of a long chunk to the null block) and chunked prefill sees exactly what one long
prefill sees. A Triton kernel: FA3's local
window cannot express the sink, and a two-call window + sink merge gave wrong rows on H100
(withdrawn; in git history, `git log -- docs/wip`); this one applies the exact mask inside each tile
where a tile holds keys some query of the program must not see, and no mask on the whole tiles
that every query sees (at the default window, almost all of them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_duo.ops.slots import check_kv_scales

HEAD_DIMS = (64, 128, 256)


# BLOCK_M, BLOCK_N, num_warps, num_stages, pack: a program's BLOCK_M rows are BLOCK_M queries of
# one query head, or (pack) BLOCK_M // G queries of all G query heads of its KV head, which then
# share each K/V tile load and a narrower key range.
LaunchConfig = tuple[int, int, int, int, bool]


def launch_config(head_dim: int, group: int, fp8: bool = False) -> LaunchConfig:
    """Per head_dim, GQA group G and cache type: the fastest tiles timed on the H200
    (``benchmarks/prefill.py --part window-configs``, G=4, bf16, fresh prompts). head_dim 128:
    128 x 64 tiles, packed when G is a power of two, else one query head per tile. At the default
    prefill window (8192) they take 0.78x / 0.84x of the packed 128 x 32 tiles' time on 2 x 32K /
    2 x 16K prompts, and the unpacked ones 0.62x of 64 x 64 (2 x 32K). At window 256 (3 stages not
    timed there) packed 128 x 64 tiles with 2 stages were within 1 % of 128 x 32, and unpacked ones
    0.69x of 64 x 64 (64 x 1K) and 0.68x (64 x 32K). They spill up to 188 bytes per thread on
    sm_90 (ptxas -v, Triton 3.6), within tests/kernels/test_streaming_prefill_compile.py's bound."""
    if head_dim <= 64:
        return 64, 64, 4, 2, False
    if head_dim <= 128:
        if group >= 2 and group & (group - 1) == 0:
            return 128, 64, 8, 3, True
        return 128, 64, 8, 2, False
    # fp8 -> bf16 conversion needs registers
    return (32, 16, 8, 2, False) if fp8 else (32, 32, 8, 2, False)


@triton.jit
def _attend(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, tok0, ctx, lo, hi, t,
            sink, window, scale_log2, k_scale, v_scale, FRESH: tl.constexpr, FP8: tl.constexpr,
            BLOCK_SIZE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) over keys [lo, hi): from the slot cache, or
    (``FRESH``, keys of this chunk: p >= ctx) from the step's K/V rows tok0 + p - ctx. An ``FP8``
    cache holds K/V divided by their per-tensor scales: K's goes into the scores, V's into V.
    Without ``MASK`` the caller guarantees whole tiles that every row of the program sees."""
    offs_d = tl.arange(0, D)
    for start in range(lo, hi, BLOCK_N):
        p = start + tl.arange(0, BLOCK_N)
        p_ok = p < hi
        if FRESH:
            tok = (tok0 + p - ctx).to(tl.int64)
            k_ptr = k_new + tok[None, :] * stride_kt + offs_d[:, None]
            v_ptr = v_new + tok[:, None] * stride_vt + offs_d[None, :]
        else:
            blk_ptr = bt + p // BLOCK_SIZE
            if MASK:
                blk = tl.load(blk_ptr, mask=p_ok, other=0).to(tl.int64)
            else:
                blk = tl.load(blk_ptr).to(tl.int64)
            row = (blk * BLOCK_SIZE + p % BLOCK_SIZE) * (2 * D)
            k_ptr = kv + row[None, :] + offs_d[:, None]
            v_ptr = kv + row[:, None] + D + offs_d[None, :]
        if MASK:
            k = tl.load(k_ptr, mask=p_ok[None, :], other=0.0)
            v = tl.load(v_ptr, mask=p_ok[:, None], other=0.0)
        else:  # whole tiles inside [lo, hi)
            k = tl.load(k_ptr)
            v = tl.load(v_ptr)
        if not FRESH:
            if FP8:
                k = k.to(q.dtype)  # e4m3 values are exact in bf16/fp16
                v = (v.to(tl.float32) * v_scale).to(q.dtype)
        s = tl.dot(q, k) * scale_log2
        if FP8 and not FRESH:
            s = s * k_scale
        if MASK:
            seen = p_ok[None, :] & (p[None, :] <= t[:, None]) & \
                ((p[None, :] < sink) | (p[None, :] > t[:, None] - window))
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        w = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_window(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, tok0, ctx, lo, hi, t,
                   t_lo, t_hi, sink, window, scale_log2, k_scale, v_scale, FRESH: tl.constexpr,
                   FP8: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Window keys [lo, hi) (all >= sink) of queries [t_lo, t_hi): the whole tiles inside
    [t_hi - window, t_lo] are seen by every query, so they skip the mask (at the default window
    almost every tile); the tiles before and after apply it. Tiles stay aligned at lo."""
    a = lo + tl.cdiv(tl.maximum(t_hi - window - lo, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(a, hi)
    b = a + (tl.maximum(tl.minimum(hi, t_lo + 1) - a, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, tok0, ctx, lo, a, t,
                            sink, window, scale_log2, k_scale, v_scale, FRESH, FP8, BLOCK_SIZE, D, BLOCK_N, True)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, tok0, ctx, a, b, t,
                            sink, window, scale_log2, k_scale, v_scale, FRESH, FP8, BLOCK_SIZE, D, BLOCK_N, False)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, tok0, ctx, b, hi, t,
                            sink, window, scale_log2, k_scale, v_scale, FRESH, FP8, BLOCK_SIZE, D, BLOCK_N, True)
    return acc, m_i, l_i


# Per-step values must not pick a new Triton specialization (each a compile of seconds, in the
# middle of serving): the block-table row (the step's number of decodes; 1 and multiples of 16
# specialize) and the alignment of query_start_loc / seq_lens (sliced past the decodes; without an
# fp8 cache they also stand in for the scale pointers).
@triton.jit(do_not_specialize=["bt_row0"],
            do_not_specialize_on_alignment=["QSL", "SEQ_LENS", "K_SCALE", "V_SCALE"])
def _streaming_prefill_kernel(
        Q, K, V, O, KV_PTRS, BT_PTRS, BT_STRIDES, SLOT_HEAD, QSL, SEQ_LENS, K_SCALE, V_SCALE,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        bt_row0, sink, window, scale_log2,
        G: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, HEADS: tl.constexpr):
    # HEADS query heads per program (1, or G when packed): rows r are query r // HEADS of the
    # tile's QPT queries, head r % HEADS of the program's heads.
    QPT: tl.constexpr = BLOCK_M // HEADS
    req = tl.program_id(0)
    tile = tl.program_id(1)
    slot = tl.program_id(2) // (G // HEADS)
    g0 = (tl.program_id(2) % (G // HEADS)) * HEADS
    q0 = tl.load(QSL)
    q_start = tl.load(QSL + req) - q0
    q_len = tl.load(QSL + req + 1) - q0 - q_start
    if tile * QPT >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + req)
    ctx = seq_len - q_len  # position of the request's first query
    dtype = Q.dtype.element_ty
    k_scale = 1.0
    v_scale = 1.0
    if FP8:
        kv = tl.load(KV_PTRS + slot).to(tl.pointer_type(tl.float8e4nv))
        k_scale = tl.load(K_SCALE)  # device values, as vLLM may update them
        v_scale = tl.load(V_SCALE)
    else:
        kv = tl.load(KV_PTRS + slot).to(tl.pointer_type(dtype))
    bt = tl.load(BT_PTRS + slot).to(tl.pointer_type(tl.int32)) + \
        (bt_row0 + req).to(tl.int64) * tl.load(BT_STRIDES + slot)
    kv_head = tl.load(SLOT_HEAD + slot)
    k_new = K + kv_head * stride_kh
    v_new = V + kv_head * stride_vh

    rows = tl.arange(0, BLOCK_M)
    offs_m = tile * QPT + rows // HEADS
    head = kv_head * G + g0 + rows % HEADS
    offs_d = tl.arange(0, D)
    m_ok = (rows < QPT * HEADS) & (offs_m < q_len)
    tok = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    t = ctx + offs_m
    t_lo = ctx + tile * QPT
    t_hi = tl.minimum(t_lo + QPT, seq_len)  # one past the tile's last query

    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Sink [0, sink_end) and window [win_lo, t_hi), each split at ctx into cache and chunk parts.
    sink_end = tl.minimum(sink, t_hi)
    win_lo = tl.maximum(sink_end, t_lo - window + 1)
    cache_end = tl.minimum(sink_end, ctx)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, q_start, ctx,
                            0, cache_end, t, sink, window, scale_log2, k_scale, v_scale, False, FP8,
                            BLOCK_SIZE, D, BLOCK_N, True)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, q_start, ctx,
                            ctx, sink_end, t, sink, window, scale_log2, k_scale, v_scale, True, FP8,
                            BLOCK_SIZE, D, BLOCK_N, True)
    cache_end = tl.minimum(t_hi, ctx)
    acc, m_i, l_i = _attend_window(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, q_start, ctx,
                                   win_lo, cache_end, t, t_lo, t_hi, sink, window, scale_log2, k_scale,
                                   v_scale, False, FP8, BLOCK_SIZE, D, BLOCK_N)
    fresh_lo = tl.maximum(win_lo, ctx)
    acc, m_i, l_i = _attend_window(acc, m_i, l_i, q, kv, bt, k_new, v_new, stride_kt, stride_vt, q_start, ctx,
                                   fresh_lo, t_hi, t, t_lo, t_hi, sink, window, scale_log2, k_scale,
                                   v_scale, True, FP8, BLOCK_SIZE, D, BLOCK_N)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(dtype), mask=m_ok[:, None])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, kv_ptrs: torch.Tensor,
           block_table_ptrs: torch.Tensor,
           block_table_strides: torch.Tensor, slot_kv_head: torch.Tensor, query_start_loc: torch.Tensor,
           seq_lens: torch.Tensor, num_kv_heads: int, block_size: int, sink_size: int,
           window: int, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Errors worded for the caller; shared by the wrapper and the fake impl."""
    check_kv_scales("streaming_prefill", k_scale, v_scale, q.device)
    if q.dtype not in (torch.bfloat16, torch.float16) or q.dim() != 3:
        raise ValueError(f"streaming_prefill: q must be bfloat16/float16 [num_tokens, num_q_heads, "
                         f"head_dim], got {q.dtype} {tuple(q.shape)}")
    if q.shape[2] not in HEAD_DIMS or q.stride(2) != 1:
        raise ValueError(f"streaming_prefill: head_dim must be one of {HEAD_DIMS} with a contiguous "
                         f"last dimension, got {q.shape[2]} (stride {q.stride(2)})")
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"streaming_prefill: out must be {q.dtype} {tuple(q.shape)} with a contiguous "
                         f"last dimension, got {out.dtype} {tuple(out.shape)}")
    if num_kv_heads <= 0 or q.shape[1] % num_kv_heads:
        raise ValueError(f"streaming_prefill: num_q_heads ({q.shape[1]}) must be a multiple of "
                         f"num_kv_heads ({num_kv_heads})")
    want = (q.shape[0], num_kv_heads, q.shape[2])
    for name, t in (("k", k), ("v", v)):
        if t.shape != want or t.dtype != q.dtype or t.stride(2) != 1 or t.device != q.device:
            raise ValueError(f"streaming_prefill: {name} (this chunk's keys/values) must be {q.dtype} "
                             f"{want} with a contiguous last dimension, got {t.dtype} {tuple(t.shape)}")
    if block_size <= 0 or block_size & (block_size - 1) or sink_size < 0 or window < 1:
        raise ValueError(f"streaming_prefill: need a power-of-two block_size, sink_size >= 0, window "
                         f">= 1, got {block_size}, {sink_size}, {window}")
    n = kv_ptrs.numel()
    for name, t, dt in (("kv_ptrs", kv_ptrs, torch.int64), ("block_table_ptrs", block_table_ptrs, torch.int64),
                        ("block_table_strides", block_table_strides, torch.int64),
                        ("slot_kv_head", slot_kv_head, torch.int32)):
        if t.dtype != dt or t.shape != (n,) or t.device != q.device:
            raise ValueError(f"streaming_prefill: {name} must be {dt} [num_slots={n}] on {q.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    r = seq_lens.numel()
    if seq_lens.dtype != torch.int32 or query_start_loc.dtype != torch.int32 or \
            query_start_loc.shape != (r + 1,) or seq_lens.device != q.device or \
            query_start_loc.device != q.device:
        raise ValueError(f"streaming_prefill: query_start_loc/seq_lens must be int32 [num_reqs + 1] / "
                         f"[num_reqs] on {q.device}, got {query_start_loc.dtype} "
                         f"{tuple(query_start_loc.shape)} / {seq_lens.dtype} {tuple(seq_lens.shape)}")


@torch.library.custom_op("vllm_duo::streaming_prefill", mutates_args=("out",))
def _streaming_prefill_op(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          kv_ptrs: torch.Tensor,
                          block_table_ptrs: torch.Tensor, block_table_strides: torch.Tensor,
                          slot_kv_head: torch.Tensor, query_start_loc: torch.Tensor,
                          seq_lens: torch.Tensor, block_table_row0: int, max_query_len: int,
                          num_kv_heads: int, block_size: int, sink_size: int, window: int,
                          scale: float, k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None) -> None:
    launch(out, q, k, v, kv_ptrs, block_table_ptrs, block_table_strides, slot_kv_head, query_start_loc,
           seq_lens, block_table_row0, max_query_len, num_kv_heads, block_size, sink_size, window, scale,
           launch_config(q.shape[2], q.shape[1] // num_kv_heads, k_scale is not None), k_scale, v_scale)


def launch(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_ptrs: torch.Tensor,
           block_table_ptrs: torch.Tensor, block_table_strides: torch.Tensor, slot_kv_head: torch.Tensor,
           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table_row0: int,
           max_query_len: int, num_kv_heads: int, block_size: int, sink_size: int, window: int,
           scale: float, config: LaunchConfig, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> None:
    """The kernel launch with explicit tiles (unchecked: the op checks its inputs first)."""
    num_slots, group, d = kv_ptrs.numel(), q.shape[1] // num_kv_heads, q.shape[2]
    if num_slots == 0 or seq_lens.numel() == 0 or max_query_len <= 0:
        return
    fp8 = k_scale is not None
    block_m, block_n, num_warps, num_stages, pack = config
    heads = group if pack else 1
    if block_m < heads:
        raise ValueError(f"streaming_prefill: a packed tile of {block_m} rows cannot hold the {group} "
                         f"query heads of a KV head; use BLOCK_M >= {group} or no packing")
    grid = (seq_lens.numel(), triton.cdiv(max_query_len, block_m // heads), num_slots * (group // heads))
    _streaming_prefill_kernel[grid](
        q, k, v, out, kv_ptrs, block_table_ptrs, block_table_strides, slot_kv_head, query_start_loc,
        seq_lens, k_scale if fp8 else seq_lens, v_scale if fp8 else seq_lens,  # not read unless fp8
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), block_table_row0,
        sink_size, window, scale * 1.4426950408889634,
        G=group, BLOCK_SIZE=block_size, D=d, BLOCK_M=block_m, BLOCK_N=block_n, FP8=fp8, HEADS=heads,
        num_warps=num_warps, num_stages=num_stages)


@_streaming_prefill_op.register_fake
def _(out, q, k, v, kv_ptrs, block_table_ptrs, block_table_strides, slot_kv_head, query_start_loc,
      seq_lens, block_table_row0, max_query_len, num_kv_heads, block_size, sink_size, window,
      scale, k_scale=None, v_scale=None) -> None:
    _check(q, k, v, out, kv_ptrs, block_table_ptrs, block_table_strides, slot_kv_head, query_start_loc,
           seq_lens, num_kv_heads, block_size, sink_size, window, k_scale, v_scale)


def streaming_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_ptrs: torch.Tensor,
                      block_table_ptrs: torch.Tensor,
                      block_table_strides: torch.Tensor, slot_kv_head: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *, max_query_len: int,
                      num_kv_heads: int, block_size: int, sink_size: int, window: int,
                      scale: float | None = None, block_table_row0: int = 0,
                      out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Sink + window attention of prompt chunks for the streaming slots listed; returns ``out``.

    ``q``/``out``: ``[num_tokens, num_q_heads, head_dim]``, request i's queries at rows
    ``query_start_loc[i] - query_start_loc[0]`` onward, at absolute positions ending at
    ``seq_lens[i] - 1``; ``k``/``v``: ``[num_tokens, num_kv_heads, head_dim]``, the same rows'
    keys and values, read for keys inside the chunk (the caches only for keys before it). Slot s (a cache ``[num_blocks, block_size, 2 * head_dim]`` at
    ``kv_ptrs[s]``, K then V) serves KV head ``slot_kv_head[s]``, i.e. query heads
    ``h*G .. h*G+G-1``, and reads request i's block ids from row ``block_table_row0 + i`` of its
    int32 table. Query heads of other slots are left untouched. Block-table entries between the
    sink and each query tile's window are never read. With ``k_scale`` and ``v_scale`` (one-element
    float32 tensors, vLLM's per-tensor scales) the caches are fp8 e4m3 holding K / k_scale and
    V / v_scale; the chunk's own ``k``/``v`` stay in q's dtype.
    """
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _check(q, k, v, out, kv_ptrs, block_table_ptrs, block_table_strides, slot_kv_head, query_start_loc,
           seq_lens, num_kv_heads, block_size, sink_size, window, k_scale, v_scale)
    torch.ops.vllm_duo.streaming_prefill(
        out, q, k, v, kv_ptrs, block_table_ptrs, block_table_strides, slot_kv_head, query_start_loc,
        seq_lens, block_table_row0, max_query_len, num_kv_heads, block_size, sink_size, window,
        q.shape[2] ** -0.5 if scale is None else scale, k_scale, v_scale)
    return out
