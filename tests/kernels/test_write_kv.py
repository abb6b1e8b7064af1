"""``write_kv`` (GPU): exact cells, untouched rest, skipped slots/rows, and a round trip through
``paged_decode``; the same for fp8 e4m3 caches (bytes equal to torch's saturating cast)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import pytest
import torch

from tests.kernels.needles import needle_case
from tests.kernels.reference import (FP8_NAN, FP8_SCALES, METRIC, attended, quantize_fp8,
                                     reference_decode, run_op, scaled_error)
from vllm_duo.ops import write_kv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


HEADS, GROUPS = [2, -1, 0, 3, 1], [0, 1, 1, 0, 1]  # per slot: its KV head (-1: a padding slot) and group


def _write_slots(key: torch.Tensor, value: torch.Tensor, caches: list[torch.Tensor], gen: torch.Generator,
                 rows: int, **scales) -> torch.Tensor:
    """write_kv into ``caches`` (one per HEADS entry, ptr 0 for the padding slot) with two groups'
    random slot mappings over ``rows`` cache rows, every 7th token unmapped (-1); returns them."""
    mappings = torch.stack([torch.randperm(rows, generator=gen, device="cuda")[:key.shape[0] + 5]
                            for _ in range(2)])
    mappings[:, ::7] = -1
    write_kv(key, value, torch.tensor([0 if h < 0 else c.data_ptr() for h, c in zip(HEADS, caches)],
                                      device="cuda"),
             torch.tensor(HEADS, dtype=torch.int32, device="cuda"),
             torch.tensor(GROUPS, dtype=torch.int32, device="cuda"), mappings, **scales)
    return mappings


def _moved_and_skipped(written: list[torch.Tensor], mappings: torch.Tensor, tokens: int, rows: int, d: int,
                       blank: float | int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two wrong kernel results for the controls: slot 0's first written row moved to a free row,
    and that row skipped (left ``blank``)."""
    m = mappings[GROUPS[0], :tokens]
    row, free = int(m[m >= 0][0]), sorted(set(range(rows)) - set(m[m >= 0].tolist()))[0]
    moved, skipped = [c.clone() for c in written], [c.clone() for c in written]
    moved[0].view(-1, 2 * d)[free] = moved[0].view(-1, 2 * d)[row]
    moved[0].view(-1, 2 * d)[row] = blank
    skipped[0].view(-1, 2 * d)[row] = blank
    return moved, skipped


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cells(dtype: torch.dtype, head_dim: int, evidence) -> None:
    """K/V sliced from a fused QKV buffer; two mapping groups, -1 rows, a padding slot (ptr 0)."""
    T, H, HQ, bs, pool, D = 50, 4, 16, 16, 20, head_dim
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    qkv = torch.randn(T, HQ + 2 * H, D, generator=gen, device="cuda").to(dtype)
    key, value = qkv[:, HQ:HQ + H], qkv[:, HQ + H:]
    caches = [torch.full((pool, bs, 2 * D), float("nan"), dtype=dtype, device="cuda") for _ in HEADS]
    mappings = _write_slots(key, value, caches, gen, pool * bs)
    written = [c.clone() for c in caches]
    expect = [torch.full_like(c, float("nan")) for c in caches]
    for slot, (head, group) in enumerate(zip(HEADS, GROUPS)):
        if head >= 0:
            m = mappings[group, :T]
            keep = m >= 0
            expect[slot].view(-1, 2 * D)[m[keep]] = torch.cat([key[keep, head], value[keep, head]], -1)
    moved, skipped = _moved_and_skipped(written, mappings, T, pool * bs, D, float("nan"))
    metric = "cache rows not bit-equal to the expected cache (NaN = never written), all slots"
    compares = "write_kv cells vs the K/V it was given"
    gap = wrong_rows(written, expect)
    evidence(compares, metric, gap, "a token written to a wrong row", wrong_rows(moved, expect),
             tolerance=0, label=f"{dtype} D{head_dim}")
    evidence(compares, metric, gap, "a row skipped", wrong_rows(skipped, expect), tolerance=0,
             label=f"{dtype} D{head_dim}")


def wrong_rows(caches: list[torch.Tensor], expect: list[torch.Tensor]) -> int:
    """Rows of any slot that differ from the expected cache, bit for bit (NaN matches NaN; fp8
    caches are compared as uint8 bytes)."""
    bad = 0
    for got, want in zip(caches, expect):
        got, want = got.view(-1, got.shape[-1]), want.view(-1, want.shape[-1])
        same = (got == want) | (got.isnan() & want.isnan())
        bad += int((~same.all(-1)).sum())
    return bad


def _attended_writes(case, kv_of: Callable[[int, torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """K/V rows for every key the needle case's decode attends, taken from its cache rows
    (``kv_of(slot, rows)``: [rows, 2 * head_dim]), with the slot mappings that write them back to
    those rows (-1 elsewhere); returns key, value, mappings and the sequences' first token rows."""
    D, num_slots = case.q.shape[2], len(case.kv_heads)
    starts = torch.tensor([0] + case.lens).cumsum(0).tolist()
    key = torch.randn(starts[-1], case.num_kv_heads, D, device="cuda").to(torch.bfloat16)
    value = torch.randn_like(key)
    mappings = torch.full((num_slots, starts[-1]), -1, dtype=torch.int64, device="cuda")
    readable = replace(case, sink=case.sink + 1, window=case.window + 1)  # as needle_case built it
    for slot, head in enumerate(case.kv_heads):
        for i, L in enumerate(case.lens):
            tokens = starts[i] + attended(L, case.streaming[slot], readable.sink, readable.window, "cuda")
            rows = readable.rows(slot, i)
            kv = kv_of(slot, rows)
            key[tokens, head] = kv[:, :D].to(key.dtype)
            value[tokens, head] = kv[:, D:].to(key.dtype)
            mappings[slot, tokens] = rows
    return key, value, mappings, starts


def test_round_trip_through_decode(evidence) -> None:
    """Write every attended key of a planted-needle case (tests/kernels/needles.py, 4K keys) into
    NaN caches, then decode against the reference; a write to a wrong row (the other sequence's)
    or a skipped row (stale contents) on a needle must fail the same decode check."""
    case = needle_case(4096, "cuda")
    D, num_slots = case.q.shape[2], len(case.kv_heads)
    original = [c.clone() for c in case.caches]
    ref = reference_decode(case)
    key, value, mappings, starts = _attended_writes(case, lambda slot, rows: original[slot].view(-1, 2 * D)[rows])
    for cache in case.caches:
        cache.fill_(float("nan"))

    def write(maps: torch.Tensor) -> torch.Tensor:
        write_kv(key, value, case.slots.kv_ptrs, case.slots.slot_kv_head,
                 torch.arange(num_slots, dtype=torch.int32, device="cuda"), maps)
        return run_op(case, max(case.lens))

    gap = scaled_error(write(mappings), ref)
    for cache, orig in zip(case.caches, original):
        torch.testing.assert_close(cache, orig, rtol=0, atol=0, equal_nan=True)
    # Wrong writes of the newest token (a needle, slot 1 = retrieval): swapped with the other
    # sequence's newest row, or skipped (its row keeps the stale contents another write left).
    newest, other = starts[1] - 1, starts[2] - 1
    swapped = mappings.clone()
    swapped[1, [newest, other]] = mappings[1, [other, newest]]
    compares = "write_kv then paged_decode vs float32 reference, planted needles"
    evidence(compares, METRIC, gap, "newest token's row swapped with another sequence's",
             scaled_error(write(swapped), ref))
    for cache, orig in zip(case.caches, original):
        cache.copy_(orig)
    stale = int(mappings[1, newest - 1])
    case.caches[1].view(-1, 2 * D)[int(mappings[1, newest])] = case.caches[1].view(-1, 2 * D)[stale]
    skipped = mappings.clone()
    skipped[1, newest] = -1
    evidence(compares, METRIC, gap, "newest token's row skipped (stale contents)",
             scaled_error(write(skipped), ref))


@pytest.mark.parametrize("fp8", [False, True])
def test_opcheck(fp8: bool) -> None:
    T, H, D = 8, 2, 128
    key = torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda")
    caches = [torch.zeros(4, 16, 2 * D, dtype=torch.uint8 if fp8 else torch.bfloat16, device="cuda")
              for _ in range(H)]
    scales = (torch.tensor(0.05, device="cuda"), torch.tensor(0.03, device="cuda")) if fp8 else ()
    args = (key, torch.randn_like(key), torch.tensor([c.data_ptr() for c in caches], device="cuda"),
            torch.tensor([1, 0], dtype=torch.int32, device="cuda"),
            torch.zeros(2, dtype=torch.int32, device="cuda"),
            torch.arange(T, device="cuda")[None], *scales)
    torch.library.opcheck(torch.ops.vllm_duo.write_kv.default, args)


FP8_STD = {"in_range": 3.0, "saturated": 30.0}  # K/V std; 30 puts most V past 448 * v_scale


def unsaturated_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A writer without saturation: e4m3fn has no infinity, so what rounds past 448 (|x| >= 464)
    becomes NaN. Built explicitly: torch 2.11's cast gives NaN there, torch 2.14's saturates."""
    y = x.float() / scale
    return torch.where(y.abs() >= 464, torch.full_like(y, float("nan")), y).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("values", list(FP8_STD))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp8_cells(dtype: torch.dtype, head_dim: int, values: str, evidence) -> None:
    """fp8 e4m3 caches (k_scale 0.05, v_scale 0.03): every written row's bytes equal torch's
    (x / scale).clamp(-448, 448).to(float8_e4m3fn), rows mapped -1 and the padding slot keep
    their NaN bytes. Controls: a row moved or skipped, K quantized with 2 x k_scale, V with
    v_scale ignored, and ("saturated") values past 448 * scale cast without saturation."""
    T, H, HQ, bs, pool, D = 50, 4, 16, 16, 20, head_dim
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    qkv = (torch.randn(T, HQ + 2 * H, D, generator=gen, device="cuda") * FP8_STD[values]).to(dtype)
    key, value = qkv[:, HQ:HQ + H], qkv[:, HQ + H:]
    k_scale, v_scale = (torch.tensor([s], device="cuda") for s in FP8_SCALES)
    caches = [torch.full((pool, bs, 2 * D), FP8_NAN, dtype=torch.uint8, device="cuda")
              .view(torch.float8_e4m3fn) for _ in HEADS]
    mappings = _write_slots(key, value, caches, gen, pool * bs, k_scale=k_scale, v_scale=v_scale)
    written = [c.view(torch.uint8).clone() for c in caches]

    def expected(ks: torch.Tensor, vs: torch.Tensor,
                 quantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = quantize_fp8
                 ) -> list[torch.Tensor]:
        out = [torch.full_like(c, FP8_NAN) for c in written]
        for slot, (head, group) in enumerate(zip(HEADS, GROUPS)):
            if head >= 0:
                m = mappings[group, :T]
                keep = m >= 0
                out[slot].view(-1, 2 * D)[m[keep]] = torch.cat(
                    [quantize(key[keep, head], ks).view(torch.uint8),
                     quantize(value[keep, head], vs).view(torch.uint8)], -1)
        return out

    expect = expected(k_scale, v_scale)
    moved, skipped = _moved_and_skipped(written, mappings, T, pool * bs, D, FP8_NAN)
    controls = {"a token written to a wrong row": moved, "a row skipped": skipped,
                "K quantized with 2 x k_scale": expected(2 * k_scale, v_scale),
                "V quantized with v_scale ignored (1.0)": expected(k_scale, torch.ones_like(v_scale))}
    if values == "saturated":
        controls["values past 448 * scale cast without saturation"] = expected(
            k_scale, v_scale, unsaturated_fp8)
    metric = "cache rows not byte-equal to torch's saturating e4m3 cast (0x7f = never written), all slots"
    compares = "write_kv fp8 cells vs (x / scale).clamp(-448, 448).to(float8_e4m3fn)"
    gap = wrong_rows(written, expect)
    for what, wrong in controls.items():
        evidence(compares, metric, gap, what, wrong_rows(wrong, expect), tolerance=0,
                 label=f"{dtype} D{head_dim} {values}")


def test_fp8_round_trip_through_decode(evidence) -> None:
    """test_round_trip_through_decode on fp8 caches: K/V are the dequantized cache rows (bf16),
    write_kv re-quantizes them to the same bytes, and paged_decode reads them back. Controls: the
    newest needle's row swapped or skipped, and K written with 2 x k_scale."""
    case = needle_case(4096, "cuda", fp8_scales=FP8_SCALES)
    D, num_slots = case.q.shape[2], len(case.kv_heads)
    original = [c.view(torch.uint8).clone() for c in case.caches]
    ref = reference_decode(case)
    # dequantized cache rows: write_kv gives back the same bytes
    key, value, mappings, starts = _attended_writes(case, case.cache_rows)
    for cache in case.caches:
        cache.view(torch.uint8).fill_(FP8_NAN)
    groups = torch.arange(num_slots, dtype=torch.int32, device="cuda")

    def write(maps: torch.Tensor, k_scale: torch.Tensor = case.k_scale) -> torch.Tensor:
        write_kv(key, value, case.slots.kv_ptrs, case.slots.slot_kv_head, groups, maps,
                 k_scale=k_scale, v_scale=case.v_scale)
        return run_op(case, max(case.lens))

    gap = scaled_error(write(mappings), ref)
    for cache, orig in zip(case.caches, original):
        assert torch.equal(cache.view(torch.uint8), orig)
    compares = "write_kv then paged_decode on fp8 e4m3 caches vs float32 reference, planted needles"
    newest, other = starts[1] - 1, starts[2] - 1
    swapped = mappings.clone()
    swapped[1, [newest, other]] = mappings[1, [other, newest]]
    evidence(compares, METRIC, gap, "newest token's row swapped with another sequence's",
             scaled_error(write(swapped), ref))
    evidence(compares, METRIC, gap, "K written with 2 x k_scale",
             scaled_error(write(mappings, 2 * case.k_scale), ref))
    for cache, orig in zip(case.caches, original):
        cache.view(torch.uint8).copy_(orig)
    rows = case.caches[1].view(torch.uint8).view(-1, 2 * D)
    rows[int(mappings[1, newest])] = rows[int(mappings[1, newest - 1])]
    skipped = mappings.clone()
    skipped[1, newest] = -1
    evidence(compares, METRIC, gap, "newest token's row skipped (stale contents)",
             scaled_error(write(skipped), ref))
