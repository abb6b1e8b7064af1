"""The decode launch captured in a CUDA graph: its partition plan must serve every later step (CPU).

The grid is fixed at capture; the kernel lengthens a row's partitions when the row holds more keys
than planned (psize = max(partition_size, ceil(n / num_partitions))), so the plan decides only
speed. These checks pin what makes it fast for both short and long rows.
"""

from __future__ import annotations

import pytest

from vllm_duo.ops.decode import MAX_PARTITIONS, PARTITION_SIZE, plan_graph_partitions

SMS = 132  # H100/H200


def _row_partitions(n: int, size: int, parts: int) -> int:
    """The kernel's row_partitions (csrc/paged_decode.cu)."""
    psize = max(size, -(-n // parts))
    return max(1, -(-n // psize))


@pytest.mark.parametrize("batch,long_slots", [(1, 4), (16, 4), (64, 4), (64, 8), (256, 8), (1, 1)])
def test_long_rows_fill_the_gpu_short_rows_take_one_partition(batch, long_slots):
    size, parts = plan_graph_partitions(131072, batch, long_slots, SMS)
    assert size == PARTITION_SIZE and 1 <= parts <= MAX_PARTITIONS
    assert _row_partitions(300, size, parts) == 1  # a short row: one CTA works, no combine
    # a 64K row spreads over every partition, and together the long rows fill the GPU
    assert _row_partitions(65536, size, parts) == parts
    assert batch * long_slots * parts >= min(16 * SMS, batch * long_slots * MAX_PARTITIONS)


def test_never_more_partitions_than_the_longest_row_needs():
    assert plan_graph_partitions(1000, 1, 1, SMS) == (PARTITION_SIZE, 2)
    assert plan_graph_partitions(320, 1, 1, SMS) == (PARTITION_SIZE, 1)
