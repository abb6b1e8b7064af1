"""Decode cases with planted needles, and the wrong kernel inputs (mutations) a check must reject.

A needle is a key aligned with the row's queries (logit about ln(keys) + 1, so it holds a large
share of the softmax) with its own random value. They sit where a mutation bites: the last sink
position, the first position past the sink, the oldest window position and the one just before
it (streaming slot); a position in the last quarter and the newest key (retrieval slot). The case
is built with sink + 1 and window + 1 readable, so a kernel that reads one key too many reads a
needle, not a NaN. A mutation is the same case with one kernel input changed; the reference of
the mutated case is what a kernel with that bug would return.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from tests.kernels.reference import DecodeCase, attended, cdiv, make_case, quantize_fp8
from vllm_duo.ops import decode_slots

SINK, WINDOW, BLOCK = 64, 256, 16
COMPANION = 600  # a second row whose blocks a redirected table entry can point at
NEEDLE_LENS = {"1": 1, "small": 400, "4k": 4096, "64k": 65536, "128k": 131072}


def needle_positions(L: int, streaming: bool) -> list[int]:
    if not streaming:
        return sorted({L - 1, 3 * L // 4})
    if L > SINK + WINDOW + 1:
        return [SINK - 1, SINK, L - WINDOW, L - 1 - WINDOW]
    return [L - 1]


def needle_case(L: int, device: str, seed: int = 0,
                fp8_scales: tuple[float, float] | None = None) -> DecodeCase:
    """Row 0 (``L`` keys) carries the needles, row 1 is the companion; slot 0 streaming (KV head
    0), slot 1 retrieval (KV head 1); GQA 4, head_dim 128, bf16 (caches fp8 e4m3 with
    ``fp8_scales``, the needles quantized like any key)."""
    case = make_case([L, COMPANION], num_kv_heads=2, group=4, head_dim=128, dtype=torch.bfloat16,
                     block_size=BLOCK, streaming_heads=[True, False], sink=SINK + 1,
                     window=WINDOW + 1, slot_order=[0, 1], seed=seed, fp8_scales=fp8_scales,
                     device=device)
    case = replace(case, sink=SINK, window=WINDOW)
    D, G = case.q.shape[2], case.group
    for slot, head in enumerate(case.kv_heads):
        qg = case.q[0, head * G:(head + 1) * G].float()
        u = qg.sum(0)
        u = u / u.norm()
        target = math.log(len(attended(L, case.streaming[slot], SINK, WINDOW, device))) + 1.0
        key = (target / float((qg @ u).mean() * case.scale) * u).to(case.q.dtype)
        pos = torch.tensor(needle_positions(L, case.streaming[slot]), device=device)
        rows = case.tables[slot][0, pos // BLOCK].long() * BLOCK + pos % BLOCK
        if case.k_scale is None:
            case.caches[slot].view(-1, 2 * D)[rows, :D] = key
        else:
            case.caches[slot].view(torch.uint8).view(-1, 2 * D)[rows, :D] = \
                quantize_fp8(key, case.k_scale).view(torch.uint8)
    return case


def _redirect(case: DecodeCase, moves: dict[int, list[tuple[int, int]]], seq: int = 0) -> DecodeCase:
    """The case with row ``seq``'s table entries redirected: ``moves[slot]`` = [(block, source
    entry as (row, block))]; the source block is fully readable, so the kernel reads wrong keys,
    not NaN."""
    tables = [None if t is None else t.clone() for t in case.tables]
    for slot, pairs in moves.items():
        for block, (row, src) in pairs:
            tables[slot][seq, block] = case.tables[slot][row, src]
    slots = decode_slots(case.caches, tables, case.kv_heads, case.streaming, case.q.device)
    return replace(case, tables=tables, slots=slots)


def mutations(case: DecodeCase) -> dict[str, DecodeCase]:
    """Each wrong kernel input that changes what row 0 attends (so each must be rejected)."""
    L = case.lens[0]
    out: dict[str, DecodeCase] = {}
    if L > SINK + WINDOW + 1:
        out.update({"sink dropped (sink=0)": replace(case, sink=0),
                    "sink - 1": replace(case, sink=SINK - 1),
                    "window - 1": replace(case, window=WINDOW - 1),
                    "window + 1": replace(case, window=WINDOW + 1)})
    skip = {slot: [(max(needle_positions(L, case.streaming[slot])[:3]) // BLOCK, (1, 0))]
            for slot in range(len(case.kv_heads))}
    out["one block skipped (entry -> another row's block)"] = _redirect(case, skip)
    if cdiv(L, BLOCK) >= 2:
        out["half the keys skipped (retrieval)"] = half_keys_skipped(case, 0)
    return out


def half_keys_skipped(case: DecodeCase, seq: int) -> DecodeCase:
    """Row ``seq`` of every retrieval slot reads its first half of blocks twice, its second never."""
    blocks = cdiv(case.lens[seq], case.block_size)
    half = blocks - blocks // 2
    moves = {slot: [(j, (seq, j - half)) for j in range(half, blocks)]
             for slot, head in enumerate(case.kv_heads) if head >= 0 and not case.streaming[slot]}
    return _redirect(case, moves, seq)
