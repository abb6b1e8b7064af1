"""One small case of each op, for compute-sanitizer (GPU). From the repository root:

    for tool in memcheck racecheck initcheck synccheck; do
      compute-sanitizer --tool $tool --error-exitcode 1 python -m tests.kernels.sanitize_case || break
    done

Covers garbage gap ids (a stray read is an invalid address), padding slots (null pointers),
padding rows, multi-partition rows (combine kernel) and a KV write with skipped rows.
"""

from __future__ import annotations

import torch

from tests.kernels.reference import check, make_case, run_op
from vllm_duo.ops import write_kv


def main() -> None:
    case = make_case([1, 0, 700, 2100], num_kv_heads=2, group=4, head_dim=128, dtype=torch.bfloat16,
                     block_size=16, streaming_heads=[True, False], pad_slots=1, seed=7)
    check(case, run_op(case, 2100, partition_size=256))
    key = torch.randn(4, 2, 128, dtype=torch.bfloat16, device="cuda")
    rows = torch.tensor([[3, -1, 70, 5]], device="cuda")
    write_kv(key, key, case.slots.kv_ptrs, case.slots.slot_kv_head,
             torch.zeros(len(case.kv_heads), dtype=torch.int32, device="cuda"), rows)
    torch.cuda.synchronize()
    print("sanitize_case: ok")


if __name__ == "__main__":
    main()
