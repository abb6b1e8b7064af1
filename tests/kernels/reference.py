"""Test cases for the decode/write kernels, a float32 PyTorch reference, and the checked run.

Inputs are built to catch reads the kernel must not do: block tables are random permutations of
a shared pool, gap entries of streaming slots and entries past a row's end hold garbage ids
(huge or negative, a read faults), and every cache cell no query may read is NaN.

fp8 e4m3 caches (vLLM's FLASH_ATTN fp8 KV cache) hold ``e4m3(x / scale)``; the reference runs on
the dequantized cache (``float(fp8) * scale``). They are built and poisoned through uint8 views,
since float8 tensors have few torch kernels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from vllm_duo.ops import DecodeSlots, decode_slots, plan_partitions

GARBAGE_IDS = (1 << 30, -7, (1 << 31) - 1, -(1 << 31))
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_NAN = 0x7F  # a float8_e4m3fn NaN byte
FP8_SCALES = (0.05, 0.03)  # k_scale, v_scale: K/V of magnitude ~1-10 span much of e4m3's range


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """vLLM's fp8 KV-cache store: e4m3(x / scale), round to nearest even, saturated to +-448."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_kv(kv: torch.Tensor, k_scale: torch.Tensor, v_scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn ``[..., 2D]`` cache rows from K/V rows ``[..., 2D]``, each half its own scale."""
    D = kv.shape[-1] // 2
    halves = [quantize_fp8(kv[..., :D], k_scale), quantize_fp8(kv[..., D:], v_scale)]
    return torch.cat([h.view(torch.uint8) for h in halves], -1).view(torch.float8_e4m3fn)


def attended(L: int, streaming: bool, sink: int, window: int, device: torch.device) -> torch.Tensor:
    """Key positions a query at L-1 attends (retrieval: all; streaming: sink + window)."""
    pos = torch.arange(L, device=device)
    return pos[(pos < sink) | (pos > L - 1 - window)] if streaming else pos


@dataclass
class DecodeCase:
    q: torch.Tensor  # [num_seqs, num_q_heads, D]
    caches: list[torch.Tensor | None]  # per slot [pool_blocks, block_size, 2D]; None = padding slot
    tables: list[torch.Tensor | None]  # per slot int32 [num_seqs, width], row stride > width
    kv_heads: list[int]
    streaming: list[bool]
    lens: list[int]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    num_kv_heads: int
    block_size: int
    sink: int
    window: int
    scale: float
    slots: DecodeSlots
    k_scale: torch.Tensor | None = None  # fp8 e4m3 caches: float32 one-element scales, else None
    v_scale: torch.Tensor | None = None

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.num_kv_heads

    def rows(self, slot: int, seq: int) -> torch.Tensor:
        """Flat cache rows (block_id * block_size + offset) of the keys ``seq`` attends in ``slot``."""
        pos = attended(self.lens[seq], self.streaming[slot], self.sink, self.window, self.q.device)
        blocks = self.tables[slot][seq, pos // self.block_size].long()
        return blocks * self.block_size + pos % self.block_size

    def cache_rows(self, slot: int, rows: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(rows), 2D]`` rows of a slot cache, an fp8 one dequantized."""
        D = self.q.shape[2]
        if self.k_scale is None:
            return self.caches[slot].view(-1, 2 * D)[rows].float()
        kv = self.caches[slot].view(torch.uint8).view(-1, 2 * D)[rows].view(torch.float8_e4m3fn).float()
        return torch.cat([kv[:, :D] * self.k_scale, kv[:, D:] * self.v_scale], -1)


def make_case(lens: list[int], *, num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
              block_size: int, streaming_heads: list[bool], pad_slots: int = 0, sink: int = 64,
              window: int = 256, pool_blocks: int | None = None, table_width: int | None = None,
              slot_order: list[int] | None = None, seed: int = 0, kv_std: float = 1.0,
              fp8_scales: tuple[float, float] | None = None, device: str = "cuda") -> DecodeCase:
    """A random case, K/V ~ N(0, kv_std^2). Slots (one per KV head plus ``pad_slots`` padding,
    -1) come in shuffled order unless ``slot_order`` gives the KV head of each slot. With
    ``fp8_scales`` = (k_scale, v_scale) the caches are fp8 e4m3."""
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    D, bs = head_dim, block_size
    need = sum(cdiv(L, bs) for L in lens)
    pool_blocks = pool_blocks or need + 3
    width = table_width or max([cdiv(L, bs) for L in lens] + [1])
    assert pool_blocks >= need and width >= max(cdiv(L, bs) for L in lens)
    kv_heads = list(range(num_kv_heads)) + [-1] * pad_slots
    rng.shuffle(kv_heads)
    kv_heads = kv_heads if slot_order is None else list(slot_order)
    streaming = [h >= 0 and streaming_heads[h] for h in kv_heads]
    q = torch.randn(len(lens), num_kv_heads * group, D, generator=gen, device=device).to(dtype)
    case = DecodeCase(q=q, caches=[], tables=[], kv_heads=kv_heads, streaming=streaming, lens=lens,
                      seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                      num_kv_heads=num_kv_heads, block_size=bs, sink=sink, window=window,
                      scale=D ** -0.5, slots=None)  # type: ignore[arg-type]
    if fp8_scales is not None:
        case.k_scale, case.v_scale = (torch.tensor(s, device=device) for s in fp8_scales)
    for slot, head in enumerate(kv_heads):
        if head < 0:
            case.caches.append(None)
            case.tables.append(None)
            continue
        perm = torch.randperm(pool_blocks, generator=gen, device=device).to(torch.int32)
        table = torch.tensor(GARBAGE_IDS, dtype=torch.int32, device=device).repeat(
            len(lens), cdiv(width + 3, len(GARBAGE_IDS)))[:, :width + 3]
        used = 0
        for i, L in enumerate(lens):
            pos = attended(L, streaming[slot], sink, window, device)
            blocks = torch.unique(pos // bs)  # only blocks holding an attended key get real ids
            table[i, blocks] = perm[used:used + len(blocks)]
            used += len(blocks)
        case.tables.append(table[:, :width])
        kv = torch.randn(pool_blocks, bs, 2 * D, generator=gen, device=device) * kv_std
        readable = torch.zeros(pool_blocks * bs, dtype=torch.bool, device=device)
        for i in range(len(lens)):
            readable[case.rows(slot, i)] = True
        if fp8_scales is None:
            case.caches.append(kv.to(dtype))
            case.caches[slot].view(-1, 2 * D)[~readable] = float("nan")
        else:
            case.caches.append(quantize_kv(kv, case.k_scale, case.v_scale))
            case.caches[slot].view(torch.uint8).view(-1, 2 * D)[~readable] = FP8_NAN
    case.slots = decode_slots(case.caches, case.tables, kv_heads, streaming, device)
    return case


def reference_decode(case: DecodeCase) -> torch.Tensor:
    """float32 [num_seqs, num_q_heads, D]: gather the attended keys (dequantized), explicit softmax."""
    D, G = case.q.shape[2], case.group
    out = torch.zeros(case.q.shape, dtype=torch.float32, device=case.q.device)
    for slot, head in enumerate(case.kv_heads):
        if head < 0:
            continue
        for i, L in enumerate(case.lens):
            if L == 0:
                continue
            kv = case.cache_rows(slot, case.rows(slot, i))
            qg = case.q[i, head * G:(head + 1) * G].float()
            p = torch.softmax(qg @ kv[:, :D].T * case.scale, dim=-1)
            out[i, head * G:(head + 1) * G] = p @ kv[:, D:]
    return out


REL, ABS = 1e-2, 1e-3
COMPARES = "paged_decode vs float32 PyTorch reference"
METRIC = ("max over (row, head) of max|out - ref| / (1e-2 * max|ref| + 1e-3), float32 reference; "
          "NaN counts as inf; <= 1 passes")


def scaled_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The error of ``out`` in units of its tolerance, per (row, head) vector: <= 1 passes.

    The tolerance follows each output vector's scale, so tiny outputs (long random contexts give
    ~1/sqrt(N)) are not swallowed: an all-zeros output fails wherever max|ref| > ~1e-3. Rounding
    the fp32 result to bf16 moves an element by at most 2^-9 of its magnitude (0.2% of max|ref|),
    well inside 1e-2 * max|ref|.
    """
    out, ref = out.float(), ref.float()
    err = (out - ref).abs().nan_to_num(nan=float("inf")).amax(-1)
    return float((err / (REL * ref.abs().amax(-1) + ABS)).max())


def run_op(case: DecodeCase, max_seq_len: int, partition_size: int | None = None) -> torch.Tensor:
    """The raw op with NaN-poisoned output and workspace, planned as the wrapper plans."""
    num_seqs, num_q_heads, D = case.q.shape
    if partition_size is None:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        partition_size, parts = plan_partitions(max_seq_len, num_seqs, len(case.kv_heads), sms)
    else:
        parts = max(1, cdiv(max_seq_len, partition_size))
    out = torch.full_like(case.q, float("nan"))
    tmp_out = torch.full((num_seqs, num_q_heads, parts, D), float("nan"), device=case.q.device)
    tmp_lse = torch.full((num_seqs, num_q_heads, parts), float("nan"), device=case.q.device)
    torch.ops.vllm_duo.paged_decode(out, case.q, *case.slots, case.seq_lens, case.num_kv_heads,
                                    case.block_size, case.sink, case.window, case.scale,
                                    partition_size, tmp_out, tmp_lse, case.k_scale, case.v_scale)
    return out


def fp8_case(lens: list[int], *, kv_std: float, **kw) -> DecodeCase:
    """:func:`make_case` with fp8 caches (scales ``FP8_SCALES``) of K/V ~ N(0, kv_std^2). The
    softmax scale is divided by kv_std, so scores stay O(1) and a wrong k_scale reshapes the
    softmax instead of leaving its argmax in place."""
    case = make_case(lens, kv_std=kv_std, fp8_scales=FP8_SCALES, **kw)
    return replace(case, scale=case.scale / kv_std)


def wrong_scales(case: DecodeCase) -> dict[str, DecodeCase]:
    """The fp8 case read with a wrong scale, as a kernel with that bug would (each must fail)."""
    return {"2 x k_scale": replace(case, k_scale=case.k_scale * 2),
            "v_scale ignored (1.0)": replace(case, v_scale=torch.ones_like(case.v_scale))}


def check(case: DecodeCase, out: torch.Tensor, evidence=None, label: str = "") -> float:
    """The scaled error of ``out`` (must be <= 1); with ``evidence``, also record it against the
    all-zeros output as control."""
    ref = reference_decode(case)
    gap = scaled_error(out, ref)
    if evidence is not None:
        evidence(COMPARES, METRIC, gap, "all-zeros output",
                 scaled_error(torch.zeros_like(ref), ref), label=label)
    assert gap <= 1, f"paged_decode: scaled error {gap:.3g} > 1 ({METRIC})"
    return gap
