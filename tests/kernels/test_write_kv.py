"""``write_kv`` (GPU): exact cells, untouched rest, skipped slots/rows, and a round trip through
``paged_decode``."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.reference import attended, check, make_case, run_op
from vllm_duo.ops import write_kv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cells(dtype: torch.dtype, head_dim: int) -> None:
    """K/V sliced from a fused QKV buffer; two mapping groups, -1 rows, a padding slot (ptr 0)."""
    T, H, HQ, bs, pool, D = 50, 4, 16, 16, 20, head_dim
    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    qkv = torch.randn(T, HQ + 2 * H, D, generator=gen, device="cuda").to(dtype)
    key, value = qkv[:, HQ:HQ + H], qkv[:, HQ + H:]
    heads = [2, -1, 0, 3, 1]
    groups = [0, 1, 1, 0, 1]
    caches = [torch.full((pool, bs, 2 * D), float("nan"), dtype=dtype, device="cuda") for _ in heads]
    mappings = torch.stack([torch.randperm(pool * bs, generator=gen, device="cuda")[:T + 5]
                            for _ in range(2)])
    mappings[:, ::7] = -1
    write_kv(key, value, torch.tensor([0 if h < 0 else c.data_ptr() for h, c in zip(heads, caches)],
                                      device="cuda"),
             torch.tensor(heads, dtype=torch.int32, device="cuda"),
             torch.tensor(groups, dtype=torch.int32, device="cuda"), mappings)
    for slot, (head, group) in enumerate(zip(heads, groups)):
        rows = caches[slot].view(-1, 2 * D)
        if head < 0:
            assert rows.isnan().all()
            continue
        m = mappings[group, :T]
        keep = m >= 0
        assert torch.equal(rows[m[keep], :D], key[keep, head])
        assert torch.equal(rows[m[keep], D:], value[keep, head])
        assert int((~rows.isnan().all(dim=1)).sum()) == int(keep.sum())


def test_round_trip_through_decode() -> None:
    """Write every attended key of a case into NaN caches, then decode against the reference."""
    case = make_case([500, 1200, 0, 37, 300], num_kv_heads=4, group=4, head_dim=128,
                     dtype=torch.bfloat16, block_size=16, streaming_heads=[True, False, True, False],
                     pad_slots=1, seed=21)
    D, num_slots = 128, len(case.kv_heads)
    starts = torch.tensor([0] + case.lens).cumsum(0).tolist()
    T = starts[-1]
    key = torch.randn(T, case.num_kv_heads, D, device="cuda").to(torch.bfloat16)
    value = torch.randn_like(key)
    mappings = torch.full((num_slots, T), -1, dtype=torch.int64, device="cuda")
    original = [None if c is None else c.clone() for c in case.caches]
    for slot, head in enumerate(case.kv_heads):
        if head < 0:
            continue
        for i, L in enumerate(case.lens):
            tokens = starts[i] + attended(L, case.streaming[slot], case.sink, case.window, "cuda")
            rows = case.rows(slot, i)
            key[tokens, head] = original[slot].view(-1, 2 * D)[rows, :D]
            value[tokens, head] = original[slot].view(-1, 2 * D)[rows, D:]
            mappings[slot, tokens] = rows
        case.caches[slot].fill_(float("nan"))
    write_kv(key, value, case.slots.kv_ptrs, case.slots.slot_kv_head,
             torch.arange(num_slots, dtype=torch.int32, device="cuda"), mappings)
    for cache, orig in zip(case.caches, original):
        if cache is not None:
            torch.testing.assert_close(cache, orig, rtol=0, atol=0, equal_nan=True)
    check(case, run_op(case, max(case.lens)))


def test_opcheck() -> None:
    T, H, D = 8, 2, 128
    key = torch.randn(T, H, D, dtype=torch.bfloat16, device="cuda")
    caches = [torch.zeros(4, 16, 2 * D, dtype=torch.bfloat16, device="cuda") for _ in range(H)]
    args = (key, torch.randn_like(key), torch.tensor([c.data_ptr() for c in caches], device="cuda"),
            torch.tensor([1, 0], dtype=torch.int32, device="cuda"),
            torch.zeros(2, dtype=torch.int32, device="cuda"),
            torch.arange(T, device="cuda")[None])
    torch.library.opcheck(torch.ops.vllm_duo.write_kv.default, args)
