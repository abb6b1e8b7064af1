"""``DuoMetadataBuilder``: every per-step kernel input is written in place into buffers that keep
their address across steps, which is what lets a full CUDA graph captured at one step replay
later ones (CPU: vLLM's metadata classes, CPU tensors)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata

from vllm_duo.backend.builder import DuoMetadataBuilder
from vllm_duo.block_manager import slot_kind_specs

BS, SINK, RECENT, PREFILL_WINDOW, WIDTH = 16, 16, 32, 64, 32


def _config(max_seqs: int = 4, max_tokens: int = 32):
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=8),
        model_config=SimpleNamespace(max_model_len=WIDTH * BS))


def _builders():
    retrieval, streaming = slot_kind_specs(block_size=BS, head_size=64, dtype=torch.bfloat16,
                                           sink_size=SINK, recent_size=RECENT,
                                           prefill_window=PREFILL_WINDOW, tail_only_batches=0)
    config, cpu = _config(), torch.device("cpu")
    return (DuoMetadataBuilder(retrieval, ["l0", "l1"], config, cpu),
            DuoMetadataBuilder(streaming, ["l0.duo_s0", "l1.duo_s0"], config, cpu))


def _step(q_lens: list[int], seq_lens: list[int], first_slot: int, block_table: torch.Tensor):
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    n = int(qsl[-1])
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        num_reqs=len(q_lens), num_actual_tokens=n, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        block_table_tensor=block_table, slot_mapping=torch.arange(n, dtype=torch.int64) + first_slot)


def _table(rows: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 1000, (rows, WIDTH), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.int32)


def test_declares_full_graphs_for_decode():
    assert DuoMetadataBuilder.get_cudagraph_support(None, None) == \
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


def test_two_groups_share_one_set_of_tables():
    retrieval, streaming = _builders()
    assert retrieval.tables is streaming.tables and (retrieval.row, streaming.row) == (0, 1)


def test_steps_write_in_place():
    retrieval, streaming = _builders()
    vllm_table = _table(4, seed=0)  # vLLM's persistent block table (one per group)
    # step 1: three decodes; step 2: one decode, one prompt chunk of 4 tokens
    steps = [([1, 1, 1], [100, 200, 300]), ([1, 4], [250, 40])]
    seen = []
    for i, (q_lens, seq_lens) in enumerate(steps):
        r = retrieval.build(0, _step(q_lens, seq_lens, 1000 * (i + 1), vllm_table))
        s = streaming.build(0, _step(q_lens, seq_lens, 5000 * (i + 1), vllm_table))
        tables = r.tables
        seen.append((tables.slot_mappings.data_ptr(), s.block_table.data_ptr(), s.sink_lens.data_ptr(),
                     tables.bt_ptrs[:], tables.bt_strides[:]))
        n = sum(q_lens)
        assert tables.slot_mappings[0, :n].tolist() == list(range(1000 * (i + 1), 1000 * (i + 1) + n))
        assert tables.slot_mappings[1, :n].tolist() == list(range(5000 * (i + 1), 5000 * (i + 1) + n))
        # tokens past this step's end (a padded graph batch) write nowhere
        assert (tables.slot_mappings[:, n:] == -1).all()
        assert r.block_table.data_ptr() == vllm_table.data_ptr()  # retrieval reads vLLM's table
        assert s.sink_lens.tolist() == [SINK] * len(q_lens)
    assert seen[0] == seen[1]  # same addresses at every step
    ptrs, strides = seen[0][3], seen[0][4]
    assert ptrs[0] == vllm_table.data_ptr() and ptrs[1] == seen[0][1] and strides == [WIDTH, WIDTH]


def test_streaming_table_points_the_gap_at_the_null_block():
    """Entries between the sink and the window the row's kernel reads point at block 0: the
    decode kernel's recent window for one-query rows (a prompt's last token too: it is decoded),
    the prefill window for prompt chunks."""
    _, streaming = _builders()
    vllm_table = _table(4, seed=1)
    cm = _step([1, 1, 8], [300, 350, 408], 0, vllm_table)
    cm.is_prefilling = torch.tensor([False, True, True])  # row 1: a one-token prompt chunk
    s = streaming.build(0, cm)
    for row, first_q, window in ((0, 299, RECENT), (1, 349, RECENT), (2, 400, PREFILL_WINDOW)):
        first_needed = (first_q - window + 1) // BS
        want = [0 if 1 <= c < first_needed else int(vllm_table[row, c]) for c in range(WIDTH)]
        assert s.block_table[row].tolist() == want, row
    assert (vllm_table > 0).all()  # vLLM's own table is left as it was


def test_a_larger_batch_than_planned_moves_the_table_once():
    _, streaming = _builders()  # sized for 8 rows (max_num_seqs 4, capture size 8)
    first = streaming.build(0, _step([1] * 3, [40] * 3, 0, _table(3, seed=2)))
    big = streaming.build(0, _step([1] * 10, [40] * 10, 0, _table(10, seed=3)))
    assert big.block_table.data_ptr() != first.block_table.data_ptr() and big.sink_lens.shape == (10,)
    assert streaming.tables.bt_ptrs[streaming.row] == big.block_table.data_ptr()
    again = streaming.build(0, _step([1] * 3, [40] * 3, 0, _table(3, seed=4)))
    assert again.block_table.data_ptr() == big.block_table.data_ptr()  # no move back
