"""Decode-kernel speed: duo ``paged_decode`` vs vLLM's FA3 paged decode, side by side (GPU).

One Llama-3-8B attention layer (32 query heads, 8 KV heads, head_dim 128, bf16, block 16) for
every context x batch x streaming fraction. FA3 reads the full cache of all 8 heads; duo reads
retrieval heads fully and streaming heads' sink + window only. Each call is timed alone with CUDA
events after an L2 flush (a layer's KV is cold in a real step); the median over repeats is kept.
Bandwidth = bytes each kernel must read (KV + q + out) / time, next to the copy bandwidth of a
large device-to-device copy measured in the same run.

    python benchmarks/decode_kernel.py [--contexts 4096 16384 65536 131072] [--batches 1 4 16 64]
                                       [--streaming 0.5 0.75 0] [--repeats 30] [--kv-cache-dtype fp8]

Writes results/decode_kernel_<device>_<date>.json and the summary entries
decode_kernel_ratio_64k_b16_s050 / _s075 / _s000 (duo time / FA3 time, the wrapper's own plan).
``--kernels tensor_core scalar`` times duo's two decode kernels side by side (``VLLM_DUO_DECODE_KERNEL``;
the figures come from the first listed, default the tensor-core one).
``--partition-sizes 0 1024 2048`` also times fixed partition sizes (rows only); ``--hybrid`` also
times FA3 per retrieval slot with duo's kernel for the streaming slots (rows only). ``--kv-cache-dtype
fp8``: both read e4m3 caches (FA3 with fp8 queries and descales, as vLLM's FLASH_ATTN; duo with
per-tensor scales), the file is decode_kernel_fp8_<device>_<date>.json and the keys end in _fp8.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import warnings
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.summary import device_name, save_result  # noqa: E402

HQ, HKV, D, BS, DTYPE = 32, 8, 128, 16, torch.bfloat16
FP8 = torch.float8_e4m3fn


def token_bytes(fp8: bool) -> int:
    """K + V of one token of one KV head."""
    return 2 * D * (1 if fp8 else 2)


def random_cache(shape: tuple, fp8: bool) -> torch.Tensor:
    """Values in [-1, 1] (fp8: cast to e4m3, so no byte is a NaN pattern)."""
    x = torch.empty(shape, dtype=DTYPE, device="cuda").uniform_(-1, 1)
    return x.to(FP8) if fp8 else x


def streaming_table(ctx: int, batch: int, sink: int, window: int) -> tuple[torch.Tensor, int]:
    """A streaming slot's block table (sink and window blocks on their own blocks, the gap on
    the null block 0) and the number of blocks its cache needs."""
    width = ctx // BS
    keep = sorted(set(range(-(-sink // BS))) | set(range(max(0, ctx - window) // BS, width)))
    table = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    table[:, keep] = 1 + torch.randperm(batch * len(keep), device="cuda", dtype=torch.int32).view(batch, -1)
    return table, 1 + batch * len(keep)


def kv_scales(fp8: bool) -> dict[str, torch.Tensor]:
    """duo's per-tensor K/V scales for an fp8 cache (1.0), none for bf16."""
    one = torch.ones(1, dtype=torch.float32, device="cuda")
    return dict(k_scale=one, v_scale=one) if fp8 else {}


def time_us(fn: Callable[[], object], repeats: int, warmup: int, flush: torch.Tensor | None) -> float:
    """Median GPU time of one call; the flush runs before each call, outside the events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int, repeats: int) -> float:
    """Read + write bytes per second of a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_us(lambda: dst.copy_(src), repeats, warmup=3, flush=None)
    return 2 * nbytes / t / 1e3


def fa3_varlen(q: torch.Tensor, seq_lens: torch.Tensor, ctx: int, heads_q: int, heads_kv: int,
               fp8: bool) -> tuple[Callable[..., object], torch.Tensor, dict] | None:
    """vLLM's FA3 varlen call, the query it reads (``q`` in e4m3 for an fp8 cache) and the keyword
    arguments of one decode step of ``heads_q`` query heads over ``heads_kv`` KV heads (one
    scheduler plan, unit descales for fp8); None without vLLM."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm.vllm_flash_attn.flash_attn_interface import get_scheduler_metadata
    except ImportError as e:  # shown once (warnings dedupe): the ratio columns read n/a
        warnings.warn(f"decode_kernel: FA3 not timed, vLLM's flash-attention did not import: {e}", stacklevel=1)
        return None
    batch = q.shape[0]
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    sched = get_scheduler_metadata(batch_size=batch, max_seqlen_q=1, max_seqlen_k=ctx, num_heads_q=heads_q,
                                   num_heads_kv=heads_kv, headdim=D, cache_seqlens=seq_lens,
                                   qkv_dtype=FP8 if fp8 else DTYPE, cu_seqlens_q=cu_q, page_size=BS, causal=True)
    one = torch.ones(batch, heads_kv, dtype=torch.float32, device="cuda")
    descales = dict(q_descale=one, k_descale=one, v_descale=one) if fp8 else {}
    kwargs = dict(max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=ctx, seqused_k=seq_lens, softmax_scale=D ** -0.5,
                  causal=True, scheduler_metadata=sched, fa_version=3, **descales)
    return flash_attn_varlen_func, q.to(FP8) if fp8 else q, kwargs


def fa3_decode(ctx: int, batch: int, q: torch.Tensor, seq_lens: torch.Tensor,
               fp8: bool = False) -> Callable[[], object] | None:
    """A timed FA3 decode call over a full [num_blocks, 16, 8, 128] K/V cache; None without vLLM."""
    fa3 = fa3_varlen(q, seq_lens, ctx, HQ, HKV, fp8)
    if fa3 is None:
        return None
    varlen, qq, kwargs = fa3
    num_blocks = batch * ctx // BS
    kv = random_cache((2, num_blocks, BS, HKV, D), fp8)
    table = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    out = torch.empty_like(q)
    return lambda: varlen(q=qq, k=kv[0], v=kv[1], block_table=table, out=out, **kwargs)


def duo_decode(ctx: int, batch: int, streaming: float, q: torch.Tensor, seq_lens: torch.Tensor,
               sink: int, window: int, partition_size: int | None = None,
               fp8: bool = False) -> tuple[Callable[[], object], int]:
    """A timed duo call (one slot cache per KV head) and the KV bytes it must read."""
    from vllm_duo.ops import decode_slots, paged_decode

    n_str = round(streaming * HKV)
    is_str = [h < n_str for h in range(HKV)]
    width = ctx // BS
    full = torch.randperm(batch * width, device="cuda", dtype=torch.int32).view(batch, width)
    part, part_blocks = streaming_table(ctx, batch, sink, window)
    caches = [random_cache((part_blocks if s else batch * width, BS, 2 * D), fp8) for s in is_str]
    scales = kv_scales(fp8)
    slots = decode_slots(caches, [part if s else full for s in is_str], list(range(HKV)), is_str, "cuda")
    kv_tokens = sum(min(ctx, sink + window) if s else ctx for s in is_str)

    # The slot tables hold raw addresses: the closure keeps the caches and block tables alive.
    def call(_keep: tuple = (caches, full, part)) -> torch.Tensor:
        return paged_decode(q, *slots, seq_lens, max_seq_len=ctx, num_kv_heads=HKV, block_size=BS,
                            sink_size=sink, window=window, partition_size=partition_size, **scales)
    return call, batch * kv_tokens * token_bytes(fp8)


def hybrid_decode(ctx: int, batch: int, streaming: float, q: torch.Tensor, seq_lens: torch.Tensor,
                  sink: int, window: int, fp8: bool = False) -> Callable[[], object] | None:
    """The same layer with FA3 per retrieval slot (one paged call per slot cache, its own block
    table, G query heads; one scheduler plan shared by all) and duo's kernel over the streaming
    slots only: whether FA3's bandwidth beats one launch for every slot. None without vLLM."""
    group = HQ // HKV
    fa3 = fa3_varlen(q, seq_lens, ctx, group, 1, fp8)
    if fa3 is None:
        return None
    varlen, qq, kwargs = fa3
    from vllm.utils.torch_utils import canonicalize_singleton_dim_strides

    from vllm_duo.ops import decode_slots, paged_decode

    n_str = round(streaming * HKV)
    width = ctx // BS
    part, part_blocks = streaming_table(ctx, batch, sink, window)
    str_caches = [random_cache((part_blocks, BS, 2 * D), fp8) for _ in range(n_str)]
    ret = [(random_cache((batch * width, BS, 2 * D), fp8),
            torch.randperm(batch * width, device="cuda", dtype=torch.int32).view(batch, width))
           for _ in range(HKV - n_str)]
    scales = kv_scales(fp8)
    slots = decode_slots(str_caches, [part] * n_str, list(range(n_str)), [True] * n_str, "cuda") if n_str else None
    out = torch.empty_like(q)
    views = [(canonicalize_singleton_dim_strides(cache[..., :D].unsqueeze(2)),
              canonicalize_singleton_dim_strides(cache[..., D:].unsqueeze(2)), table) for cache, table in ret]

    def call(_keep: tuple = (str_caches, ret, part)) -> torch.Tensor:
        if slots is not None:
            paged_decode(q, *slots, seq_lens, max_seq_len=ctx, num_kv_heads=HKV, block_size=BS,
                         sink_size=sink, window=window, out=out, **scales)
        for i, (k, v, table) in enumerate(views):
            heads = slice((n_str + i) * group, (n_str + i + 1) * group)
            varlen(q=qq[:, heads], k=k, v=v, block_table=table, out=out[:, heads], **kwargs)
        return out
    return call


def fits(ctx: int, batch: int) -> bool:
    """FA3's full cache is the larger one; it is freed before duo's caches are made. Counted in
    bf16 for fp8 too: an fp8 cache is cast from bf16 values."""
    return batch * ctx * token_bytes(False) * HKV < 0.85 * torch.cuda.mem_get_info()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--streaming", type=float, nargs="+", default=[0.5, 0.75, 0.0],
                    help="fraction of KV heads that are streaming heads")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-flush", action="store_true", help="keep L2 warm between calls")
    ap.add_argument("--kernels", nargs="+", choices=["tensor_core", "scalar"], default=["tensor_core"],
                    help="duo decode kernels to time (the tensor-core one covers head_dim 64 and 128)")
    ap.add_argument("--partition-sizes", type=int, nargs="+", default=[0],
                    help="duo partition sizes to time (0 = the wrapper's own plan, which the figures use)")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="fp8: e4m3 caches for both (default: bf16)")
    ap.add_argument("--hybrid", action="store_true",
                    help="also time FA3 per retrieval slot + duo's kernel over streaming slots (rows only)")
    args = ap.parse_args()
    fp8 = args.kv_cache_dtype == "fp8"
    if not torch.cuda.is_available():
        sys.exit("decode_kernel: needs a CUDA GPU")

    copy_gbps = copy_bandwidth_gbps(1 << 30, args.repeats)
    flush = None if args.no_flush else torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print(f"device: {device_name()}   copy bandwidth (read+write): {copy_gbps:.0f} GB/s")
    print(f"{'ctx':>7} {'batch':>5} {'strm':>5} {'duo us':>9} {'fa3 us':>9} {'duo/fa3':>8} "
          f"{'duo GB/s':>9} {'%copy':>6} {'fa3 GB/s':>9} {'%copy':>6} {'part':>5} kernel")
    rows, figures = [], {}
    for ctx in args.contexts:
        for batch in args.batches:
            if not fits(ctx, batch):
                print(f"{ctx:>7} {batch:>5}   skipped: does not fit in GPU memory")
                continue
            q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            qo_bytes = 2 * q.numel() * q.element_size()
            fa3 = fa3_decode(ctx, batch, q, seq_lens, fp8)
            fa3_us = time_us(fa3, args.repeats, args.warmup, flush) if fa3 else None
            fa3_gbps = (batch * ctx * HKV * token_bytes(fp8) + qo_bytes) / fa3_us / 1e3 if fa3_us else None
            del fa3  # free its cache before duo's
            for s, part, kernel in [(s, p, k) for s in args.streaming for p in args.partition_sizes
                                    for k in args.kernels]:
                os.environ["VLLM_DUO_DECODE_KERNEL"] = kernel  # read by the op at each launch
                duo, kv_bytes = duo_decode(ctx, batch, s, q, seq_lens, args.sink, args.window, part or None, fp8)
                duo_us = time_us(duo, args.repeats, args.warmup, flush)
                del duo
                duo_gbps = (kv_bytes + qo_bytes) / duo_us / 1e3
                ratio = duo_us / fa3_us if fa3_us else None
                hybrid = hybrid_decode(ctx, batch, s, q, seq_lens, args.sink, args.window, fp8) \
                    if args.hybrid and not part else None
                hybrid_us = time_us(hybrid, args.repeats, args.warmup, flush) if hybrid else None
                del hybrid
                rows.append(dict(context=ctx, batch=batch, streaming=s, partition_size=part or "planned",
                                 kernel=kernel, duo_us=duo_us, fa3_us=fa3_us,
                                 ratio_duo_over_fa3=ratio, duo_gbps=duo_gbps, fa3_gbps=fa3_gbps,
                                 duo_frac_of_copy=duo_gbps / copy_gbps, hybrid_us=hybrid_us,
                                 ratio_hybrid_over_fa3=hybrid_us / fa3_us if hybrid_us and fa3_us else None,
                                 fa3_frac_of_copy=fa3_gbps / copy_gbps if fa3_gbps else None))
                print(f"{ctx:>7} {batch:>5} {s:>5.2f} {duo_us:>9.1f} {_fmt(fa3_us, '9.1f')} "
                      f"{_fmt(ratio, '8.3f')} {duo_gbps:>9.0f} {duo_gbps / copy_gbps:>6.0%} "
                      f"{_fmt(fa3_gbps, '9.0f')} {_fmt(fa3_gbps and fa3_gbps / copy_gbps, '6.0%')} {part or '-':>5}"
                      f" {kernel}"
                      + (f"   hybrid {hybrid_us:.1f} us = {hybrid_us / fa3_us:.3f} of fa3" if hybrid_us and fa3_us else ""))
                if ctx == 65536 and batch == 16 and not part and kernel == args.kernels[0] and ratio is not None:
                    figures[f"decode_kernel_ratio_64k_b16_s{round(s * 100):03d}{'_fp8' if fp8 else ''}"] = ratio
            torch.cuda.empty_cache()
    slug = re.sub(r"[^a-z0-9]+", "_", device_name().lower()).strip("_")
    payload = dict(layer=dict(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype="bf16",
                              kv_cache_dtype="fp8_e4m3" if fp8 else "bf16"),
                   sink=args.sink, window=args.window, repeats=args.repeats, l2_flush=not args.no_flush,
                   copy_bandwidth_gbps=copy_gbps, rows=rows)
    fname = save_result(f"decode_kernel_{'fp8_' if fp8 else ''}{slug}", payload, figures)
    print(f"wrote benchmarks/results/{fname}" + (f" and summary keys {sorted(figures)}" if figures else ""))


def _fmt(x: float | None, spec: str) -> str:
    width = int(re.match(r"\d+", spec).group())
    return f"{x:{spec}}" if x is not None else f"{'n/a':>{width}}"


if __name__ == "__main__":
    main()
