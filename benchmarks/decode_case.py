"""One decode-kernel case of ``benchmarks/decode_kernel.py``, called a few times, for a profiler (GPU).

Nsight Compute wraps it (``benchmarks/decode_ncu.sh`` runs the cases of the decode-kernel figures):

    ncu --clock-control none -k regex:paged_decode --launch-skip 2 --launch-count 1 --set full \\
        python benchmarks/decode_case.py --context 65536 --batch 16 --streaming 0.5

Each call is preceded by an L2 flush, as in the timed benchmark. ``--backend fa3`` runs vLLM's FA3
paged decode on the same shape instead (needs vLLM).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.decode_kernel import DTYPE, HQ, D, duo_decode, fa3_decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--streaming", type=float, default=0.5, help="fraction of KV heads that stream")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--backend", choices=["duo", "fa3"], default="duo")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_case: needs a CUDA GPU")
    fp8 = args.kv_cache_dtype == "fp8"
    q = torch.randn(args.batch, HQ, D, dtype=DTYPE, device="cuda")
    seq_lens = torch.full((args.batch,), args.context, dtype=torch.int32, device="cuda")
    if args.backend == "fa3":
        call = fa3_decode(args.context, args.batch, q, seq_lens, fp8)
        if call is None:
            sys.exit("decode_case: --backend fa3 needs vLLM (its FA3 build)")
    else:
        call, _ = duo_decode(args.context, args.batch, args.streaming, q, seq_lens, args.sink, args.window,
                             fp8=fp8)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(args.calls):
        flush.zero_()
        call()
    torch.cuda.synchronize()
    print(f"decode_case: {args.backend} context {args.context} batch {args.batch} streaming {args.streaming}: "
          f"{args.calls} calls done")


if __name__ == "__main__":
    main()
