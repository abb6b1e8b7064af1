"""Cases and a float32 PyTorch reference for ``streaming_prefill`` (prompt chunks, sink + window).

The kernel reads keys before the chunk from the cache and the chunk's own keys from the step's
K/V tensors. So every cache cell it must not load is NaN: positions between the sink and the
first query's window, and every position of the chunk itself (the block manager maps most of a
long chunk to the null block). A block-table entry whose block holds only such positions is a
garbage id. In the step's K/V tensors, heads of no listed slot are NaN.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from tests.kernels.reference import GARBAGE_IDS, cdiv, quantize_fp8


NEEDLE_SCALE = 32.0  # a needle's value: even at softmax weight 1/(sink + window) it moves the output


@dataclass
class PrefillCase:
    q: torch.Tensor  # [num_tokens, num_q_heads, D]
    k: torch.Tensor  # [num_tokens, num_kv_heads, D]: this step's keys
    v: torch.Tensor
    truth: list[list[torch.Tensor]]  # [slot][request] -> [seq_len, 2D] float32 K|V of every position
    caches: list[torch.Tensor]  # per streaming slot [pool_blocks, block_size, 2D]
    tables: list[torch.Tensor]  # per slot int32 [row0 + num_reqs, width]
    kv_heads: list[int]
    q_lens: list[int]
    seq_lens: list[int]
    num_kv_heads: int
    block_size: int
    sink: int
    window: int
    row0: int
    k_scale: torch.Tensor | None = None  # fp8 caches (see to_fp8)
    v_scale: torch.Tensor | None = None

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.num_kv_heads

    @property
    def heads(self) -> list[int]:
        """Query heads of the listed slots (the kernel leaves the others untouched)."""
        return [h for k in self.kv_heads for h in range(k * self.group, (k + 1) * self.group)]

    def args(self) -> dict:
        dev = self.q.device
        qsl = [7]  # a nonzero base, as a slice of vLLM's query_start_loc has
        for n in self.q_lens:
            qsl.append(qsl[-1] + n)
        return dict(
            kv_ptrs=torch.tensor([c.data_ptr() for c in self.caches], dtype=torch.int64, device=dev),
            block_table_ptrs=torch.tensor([t.data_ptr() for t in self.tables], dtype=torch.int64, device=dev),
            block_table_strides=torch.tensor([t.stride(0) for t in self.tables], dtype=torch.int64, device=dev),
            slot_kv_head=torch.tensor(self.kv_heads, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(self.q_lens), num_kv_heads=self.num_kv_heads, block_size=self.block_size,
            sink_size=self.sink, window=self.window, block_table_row0=self.row0,
            k_scale=self.k_scale, v_scale=self.v_scale)


def to_fp8(case: PrefillCase, k_scale: float, v_scale: float) -> PrefillCase:
    """The case with fp8 e4m3 caches (K / k_scale, V / v_scale); the truth of cached positions
    becomes what the kernel can read back (dequantized), the chunk's own keys stay as given."""
    d = case.q.shape[2]
    caches = [torch.cat([quantize_fp8(c[..., :d], k_scale), quantize_fp8(c[..., d:], v_scale)], -1)
              for c in case.caches]
    truth = []
    for per_slot in case.truth:
        truth.append([])
        for x, n, s in zip(per_slot, case.q_lens, case.seq_lens, strict=True):
            x = x.clone()
            x[:s - n, :d] = quantize_fp8(x[:s - n, :d], k_scale).float() * k_scale
            x[:s - n, d:] = quantize_fp8(x[:s - n, d:], v_scale).float() * v_scale
            truth[-1].append(x)
    dev = case.q.device
    return replace(case, caches=caches, truth=truth,
                   k_scale=torch.tensor([k_scale], dtype=torch.float32, device=dev),
                   v_scale=torch.tensor([v_scale], dtype=torch.float32, device=dev))


def make_prefill_case(q_lens: list[int], ctx_lens: list[int], *, num_kv_heads: int, group: int,
                      head_dim: int, kv_heads: list[int], block_size: int = 16, sink: int = 64,
                      window: int = 256, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      device: str = "cuda", needles: list[list[int]] | None = None) -> PrefillCase:
    """Requests with ``ctx_lens[i]`` cached tokens and a chunk of ``q_lens[i]`` new ones; the
    values at positions ``needles[i]`` are scaled by NEEDLE_SCALE (every slot)."""
    rng = random.Random(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens, strict=True)]
    starts = [sum(q_lens[:r]) for r in range(len(q_lens))]
    k_new = torch.full((sum(q_lens), num_kv_heads, head_dim), float("nan"))
    v_new = torch.full_like(k_new, float("nan"))
    truth: list[list[torch.Tensor]] = []
    width = max(cdiv(s, block_size) for s in seq_lens) + 3
    row0 = rng.randrange(0, 3)
    need = sum(cdiv(s, block_size) for s in seq_lens)
    pool = need + 5
    caches, tables = [], []
    for h in kv_heads:
        cache = torch.randn(pool, block_size, 2 * head_dim, generator=gen).to(dtype)
        ids = torch.randperm(pool, generator=gen).tolist()
        table = torch.tensor([[rng.choice(GARBAGE_IDS) for _ in range(width + 2)]
                              for _ in range(row0 + len(q_lens))], dtype=torch.int32)
        truth.append([])
        for r, (s, n) in enumerate(zip(seq_lens, q_lens)):
            first = s - n
            true_kv = torch.randn(cdiv(s, block_size) * block_size, 2 * head_dim, generator=gen)
            if needles:
                true_kv[needles[r], head_dim:] *= NEEDLE_SCALE
            true_kv = true_kv.to(dtype)
            truth[-1].append(true_kv[:s].float().to(device))
            k_new[starts[r]:starts[r] + n, h] = true_kv[first:s, :head_dim].float()
            v_new[starts[r]:starts[r] + n, h] = true_kv[first:s, head_dim:].float()
            for j in range(cdiv(s, block_size)):
                blk = ids.pop()
                pos = torch.arange(j * block_size, (j + 1) * block_size)
                unread = ((pos >= sink) & (pos < first - window + 1)) | (pos >= first)
                if bool(unread.all()):
                    continue  # entry stays garbage: the kernel must not even read it
                table[row0 + r, j] = blk
                cache[blk] = true_kv[j * block_size:(j + 1) * block_size]
                cache[blk, unread] = float("nan")
        caches.append(cache.to(device))
        tables.append(table.to(device)[:, :width])  # row stride width + 2 > width
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    return PrefillCase(q=q, k=k_new.to(dtype).to(device), v=v_new.to(dtype).to(device), truth=truth,
                       caches=caches, tables=tables, kv_heads=list(kv_heads), q_lens=list(q_lens),
                       seq_lens=seq_lens, num_kv_heads=num_kv_heads, block_size=block_size, sink=sink,
                       window=window, row0=row0)


def reference(case: PrefillCase, scale: float, rows_per_step: int = 1024) -> torch.Tensor:
    """float32 sink + window attention for the slots' query heads; other heads NaN.

    Queries go ``rows_per_step`` at a time over the keys any of them may see (sink plus the
    window behind them), so 64K-token prompts fit in memory.
    """
    out = torch.full(case.q.shape, float("nan"), dtype=torch.float32, device=case.q.device)
    d, g, dev = case.q.shape[2], case.group, case.q.device
    tok = 0
    for r, (n, s) in enumerate(zip(case.q_lens, case.seq_lens)):
        for i0 in range(0, n, rows_per_step):
            t = torch.arange(s - n + i0, s - n + min(n, i0 + rows_per_step), device=dev)
            lo = max(int(t[0]) - case.window + 1, 0)
            p = torch.cat([torch.arange(min(case.sink, lo), device=dev), torch.arange(lo, int(t[-1]) + 1, device=dev)])
            seen = (p[None] <= t[:, None]) & ((p[None] < case.sink) | (p[None] > t[:, None] - case.window))
            rows = slice(tok + i0, tok + i0 + len(t))
            for truth, h in zip(case.truth, case.kv_heads):
                kv = truth[r][p]
                k, v = kv[:, :d], kv[:, d:]
                for hq in range(h * g, (h + 1) * g):
                    logits = (case.q[rows, hq].float() @ k.T) * scale
                    out[rows, hq] = torch.softmax(logits.masked_fill(~seen, float("-inf")), -1) @ v
        tok += n
    return out


def needle_positions(ctx: int, sink: int, window: int) -> list[int]:
    """Where the sink and window mutations bite for the chunk's first query (at ``ctx``): the last
    sink key, the key just before its window and its oldest window key."""
    return [sink - 1, ctx - window, ctx - window + 1]


def mutations(case: PrefillCase) -> dict[str, PrefillCase]:
    """The case with one kernel input wrong; its reference is what a kernel with that bug returns.

    "One block skipped": each request's table entry of the block holding the last sink key points
    at a fully cached block of its window instead (the truth is rewritten to match)."""
    bs, dev = case.block_size, case.q.device
    tables = [t.clone() for t in case.tables]
    truth = [[x.clone() for x in per_slot] for per_slot in case.truth]
    for r, (n, s) in enumerate(zip(case.q_lens, case.seq_lens)):
        first = s - n
        j = (case.sink - 1) // bs
        src = cdiv(first - case.window + 1, bs)
        assert (src + 1) * bs <= first and src > j, "needs a fully cached window block"
        cached = torch.arange(j * bs, min((j + 1) * bs, first), device=dev)
        for slot in range(len(case.kv_heads)):
            tables[slot][case.row0 + r, j] = case.tables[slot][case.row0 + r, src]
            truth[slot][r][cached] = case.truth[slot][r][cached - j * bs + src * bs]
    return {"sink dropped (sink=0)": replace(case, sink=0),
            "sink - 1": replace(case, sink=case.sink - 1),
            "window - 1": replace(case, window=case.window - 1),
            "window + 1": replace(case, window=case.window + 1),
            "one block skipped (entry -> a window block)": replace(case, tables=tables, truth=truth)}


MUTATION_CASE = dict(q_lens=[200, 64, 512], ctx_lens=[700, 1500, 16000], num_kv_heads=4, group=2,
                     head_dim=128, kv_heads=[0, 2], block_size=16, sink=64, window=256)


def needle_case(device: str, dtype: torch.dtype = torch.bfloat16) -> PrefillCase:
    """MUTATION_CASE with needles where each mutation bites (chunks behind 700..16000 cached)."""
    c = MUTATION_CASE
    # "window + 1" reads key ctx - window from the cache: NaN there, but its block must be mapped
    # (not a garbage id, whose read would fault and end the session), so it shares a block with
    # ctx - window + 1.
    assert all((ctx - c["window"] + 1) % c["block_size"] for ctx in c["ctx_lens"])
    return make_prefill_case(**c, dtype=dtype, device=device, seed=1, needles=[
        needle_positions(ctx, c["sink"], c["window"]) for ctx in c["ctx_lens"]])
