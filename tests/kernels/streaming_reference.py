"""Streaming-head attention cases, a float32 PyTorch reference, and an FA3 emulation for CPU.

Cases are built the way the duo builder leaves a streaming slot's block table: blocks of the
freed gap (``sink_blocks <= j < (first_t - W + 1) // block_size``) and entries past a row's end
point at the null block 0, whose cells are NaN, as are unwritten cells and unused pool blocks.
Real block ids are a random permutation of the pool, so nothing is contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NULL = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class StreamingCase:
    q: torch.Tensor  # [num_tokens, G, D]
    pool: torch.Tensor  # [num_blocks, block_size, 1, 2D]: vLLM's FlashAttention NHD slot layout
    cu_seqlens_q: torch.Tensor  # int32 [R + 1]
    seq_lens: torch.Tensor  # int32 [R]
    block_table: torch.Tensor  # int32 [R, cols]
    keys: list[torch.Tensor]  # logical K per request [seq_len, D]
    values: list[torch.Tensor]
    q_lens: list[int]
    lens: list[int]
    windows: list[int]  # window of each request (decides its gap, as the builder does)
    sink: int
    block_size: int

    @property
    def k_cache(self) -> torch.Tensor:
        return self.pool[..., :self.head_dim]

    @property
    def v_cache(self) -> torch.Tensor:
        return self.pool[..., self.head_dim:]

    @property
    def head_dim(self) -> int:
        return self.q.shape[2]

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


def make_case(q_lens: list[int], lens: list[int], windows: list[int], *, sink: int, group: int = 4,
              head_dim: int = 128, block_size: int = 16, dtype: torch.dtype = torch.bfloat16,
              null_fill: str = "nan", extra_cols: int = 3, shared_prompt: bool = False,
              seed: int = 0, device: str = "cuda") -> StreamingCase:
    """``null_fill``: "nan" (a read of the gap poisons the output) or "garbage" (finite, for
    kernels that read and mask the gap, like Triton's R-SWA). ``shared_prompt``: every request
    is a chunk of one prompt (same keys and queries by position), to compare chunkings."""
    assert all(0 < q <= L for q, L in zip(q_lens, lens))
    gen = torch.Generator(device=device).manual_seed(seed)
    D, bs = head_dim, block_size
    cols = max(cdiv(L, bs) for L in lens) + extra_cols
    kept = []
    for q, L, W in zip(q_lens, lens, windows):
        gap_end = max(0, L - q - W + 1) // bs
        kept.append([j for j in range(cdiv(L, bs)) if j < cdiv(sink, bs) or j >= gap_end])
    pool_blocks = 1 + sum(len(k) for k in kept) + 5
    perm = (torch.randperm(pool_blocks - 1, generator=gen, device=device) + 1).tolist()
    pool = torch.full((pool_blocks, bs, 1, 2 * D), float("nan"), dtype=dtype, device=device)
    if null_fill == "garbage":
        pool[NULL] = 100 * torch.randn(bs, 1, 2 * D, generator=gen, device=device).to(dtype)
    table = torch.full((len(lens), cols), NULL, dtype=torch.int32)
    keys, values = [], []
    prompt_kv = torch.randn(max(lens), 2 * D, generator=gen, device=device).to(dtype)
    prompt_q = torch.randn(max(lens), group, D, generator=gen, device=device).to(dtype)
    for r, L in enumerate(lens):
        kv = prompt_kv[:L] if shared_prompt else \
            torch.randn(L, 2 * D, generator=gen, device=device).to(dtype)
        keys.append(kv[:, :D])
        values.append(kv[:, D:])
        ids = [perm.pop() for _ in kept[r]]
        table[r, kept[r]] = torch.tensor(ids, dtype=torch.int32)
        padded = torch.full((cdiv(L, bs) * bs, 2 * D), float("nan"), dtype=dtype, device=device)
        padded[:L] = kv  # cells past the end stay NaN: unwritten
        pool[torch.tensor(ids, device=device)] = padded.view(-1, bs, 1, 2 * D)[kept[r]]
    # q is a head slice of a wider tensor, as the impl passes it
    q = torch.randn(sum(q_lens), 2 * group, D, generator=gen, device=device).to(dtype)[:, :group]
    if shared_prompt:
        q.copy_(torch.cat([prompt_q[L - ql:L] for ql, L in zip(q_lens, lens)]))
    cu = torch.tensor([0] + q_lens, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    return StreamingCase(q=q, pool=pool, cu_seqlens_q=cu,
                         seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                         block_table=table.to(device), keys=keys, values=values, q_lens=list(q_lens),
                         lens=list(lens), windows=list(windows), sink=sink, block_size=bs)


def reference(case: StreamingCase, query_block: int = 1024) -> torch.Tensor:
    """float32 [num_tokens, G, D] from the logical K/V: explicit Lambda mask, plain softmax.
    Each block of queries gathers only the keys it may attend (sink + its window)."""
    out = torch.empty(case.q.shape, dtype=torch.float32, device=case.q.device)
    row = 0
    for r, (ql, L, W) in enumerate(zip(case.q_lens, case.lens, case.windows)):
        first = L - ql
        K, V = case.keys[r].float(), case.values[r].float()
        for i0 in range(0, ql, query_block):
            t = torch.arange(first + i0, first + min(ql, i0 + query_block), device=K.device)
            p = torch.arange(L, device=K.device)
            p = p[(p < case.sink) | ((p > t[0] - W) & (p <= t[-1]))]
            allowed = (p[None, :] <= t[:, None]) & ((p[None, :] < case.sink) | (p[None, :] > t[:, None] - W))
            qb = case.q[row + i0:row + i0 + len(t)].float()  # [n, G, D]
            s = torch.einsum("ngd,kd->gnk", qb, K[p]) * case.scale
            s = s.masked_fill(~allowed[None], float("-inf"))
            out[row + i0:row + i0 + len(t)] = torch.einsum("gnk,kd->ngd", torch.softmax(s, -1), V[p])
        row += ql
    return out


def emulated_flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k,
                                    softmax_scale, causal=False, window_size=None, block_table=None,
                                    return_softmax_lse=False, out=None, fa_version=3,
                                    tile_m: int = 128, tile_n: int = 176):
    """FA3's paged varlen forward as its docstring defines it, in float32, reading keys the
    way FA3 does: whole key tiles of ``tile_n`` from key 0, from the first tile any query of a
    ``tile_m`` query tile may see (a NaN there poisons the output, as on the GPU). Rows of
    requests with no visible key are left NaN (FA3 leaves them unspecified)."""
    total, H, D = q.shape
    lse = torch.full((H, total), float("nan"), dtype=torch.float32, device=q.device)
    out = torch.full_like(q, float("nan")) if out is None else out
    left, right = window_size if window_size is not None else (-1, -1)
    right = 0 if causal else right
    bs = k.shape[1]
    cu, used = cu_seqlens_q.tolist(), seqused_k.tolist()
    for b in range(len(used)):
        q0, ql, K = cu[b], cu[b + 1] - cu[b], used[b]
        assert ql <= max_seqlen_q and K <= max_seqlen_k, (ql, max_seqlen_q, K, max_seqlen_k)
        for m0 in range(0, ql, tile_m):
            m1 = min(ql, m0 + tile_m)
            a = torch.arange(K - ql + m0, K - ql + m1, device=q.device)  # aligned positions
            lo = 0 if left < 0 else max(0, int(a[0]) - left)
            hi = K if right < 0 else min(K, int(a[-1]) + right + 1)
            if hi <= lo:
                continue
            p = torch.arange(lo // tile_n * tile_n, min(K, cdiv(hi, tile_n) * tile_n), device=q.device)
            assert int(p[-1]) // bs < block_table.shape[1], "block table too narrow"
            blocks = block_table[b, p // bs].long()
            kk = k[blocks, p % bs, 0].float()
            vv = v[blocks, p % bs, 0].float()
            vis = torch.ones(len(a), len(p), dtype=torch.bool, device=q.device)
            if right >= 0:
                vis &= p[None, :] <= a[:, None] + right
            if left >= 0:
                vis &= p[None, :] >= a[:, None] - left
            s = torch.einsum("nhd,kd->hnk", q[q0 + m0:q0 + m1].float(), kk) * softmax_scale
            s = s.masked_fill(~vis[None], float("-inf"))
            mx = s.amax(-1, keepdim=True).clamp(min=-1e30)
            e = torch.exp(s - mx)
            o = torch.einsum("hnk,kd->nhd", e, vv) / e.sum(-1).transpose(0, 1)[..., None]
            rows = vis.any(1)
            idx = torch.arange(q0 + m0, q0 + m1, device=q.device)[rows]
            out[idx] = o[rows].to(out.dtype)
            lse[:, idx] = (torch.log(e.sum(-1)) + mx[..., 0])[:, rows]
    return (out, lse) if return_softmax_lse else out


def segments(case: StreamingCase) -> list[tuple[int, int, int]]:
    """(r0, r1, window): runs of requests with one window, as the impl splits decodes/prompts."""
    runs: list[tuple[int, int, int]] = []
    for r, W in enumerate(case.windows):
        if runs and runs[-1][2] == W:
            runs[-1] = (runs[-1][0], r + 1, W)
        else:
            runs.append((r, r + 1, W))
    return runs


def run_segments(case: StreamingCase, call) -> torch.Tensor:
    """``call(q, out, cu, seq_lens, table, max_query_len, max_seq_len, window)`` per segment,
    into a NaN-poisoned output that is a head slice of a wider tensor (as the impl's)."""
    n, G, D = case.q.shape
    out = torch.full((n, G + 1, D), float("nan"), dtype=case.q.dtype, device=case.q.device)[:, :G]
    cu = case.cu_seqlens_q
    for r0, r1, W in segments(case):
        a, b = case.cu_seqlens_q[r0].item(), case.cu_seqlens_q[r1].item()
        call(case.q[a:b], out[a:b], cu[r0:r1 + 1] - cu[r0], case.seq_lens[r0:r1],
             case.block_table[r0:r1], max(case.q_lens), max(case.lens), W)
    return out


def run_streaming(case: StreamingCase, **kw) -> torch.Tensor:
    from vllm_duo.backend.streaming_prefill import streaming_attention

    def call(q, out, cu, seq_lens, table, max_q, max_k, W):
        streaming_attention(q, case.k_cache, case.v_cache, out, cu, seq_lens, table, max_q, max_k,
                            case.sink, W, case.scale, **kw)

    return run_segments(case, call)


def run_rswa(case: StreamingCase) -> torch.Tensor:
    """vLLM's Triton R-SWA path exactly as the impl calls it (reads and masks the gap)."""
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    def call(q, out, cu, seq_lens, table, max_q, max_k, W):
        sink_lens = torch.full_like(seq_lens, case.sink)
        unified_attention(q=q, k=case.k_cache, v=case.v_cache, out=out, cu_seqlens_q=cu,
                          max_seqlen_q=max_q, seqused_k=seq_lens, max_seqlen_k=max_k,
                          softmax_scale=case.scale, causal=True, window_size=(-1, -1),
                          block_table=table, softcap=0, q_descale=None, k_descale=None,
                          v_descale=None, rswa_prefix_lens=sink_lens, rswa_window=W)

    return run_segments(case, call)
