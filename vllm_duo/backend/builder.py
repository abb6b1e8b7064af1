"""``DuoMetadataBuilder``: turns vLLM's per-group view of a step into :class:`DuoMetadata`.

One builder per KV-cache group. Streaming groups get a block table whose freed middle entries
point at the null block, so no kernel ever reads a freed block. Everything a kernel reads is
written here, in place, into buffers that never move (or whose moves the kernels follow through
address tables): a pure-decode step can then replay a full CUDA graph, and ``forward()`` only
launches kernels.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionMetadataBuilder,
                                       CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_duo.backend.metadata import DuoMetadata, PrefillPart, runs
from vllm_duo.backend.step_tables import StepTables
from vllm_duo.block_manager import DuoStreamingSpec

NULL_BLOCK_ID = 0  # vLLM's BlockPool reserves block 0 as the null block


def prefill_parts(cm: CommonAttentionMetadata, num_decodes: int,
                  causal_end: int | None = None) -> tuple[PrefillPart, ...]:
    """The step's prompt chunks (requests ``num_decodes..``) as maximal runs of fresh chunks
    (starting at position 0: nothing cached before them) and continuing ones, from host values
    vLLM already holds (no device sync): its CPU upper bound on ``seq_lens`` is exact for prefill
    rows. Without that bound every chunk counts as continuing (the path that is right for both),
    ending at the step's ``max_seq_len``. With ``causal_end`` (sink + prefill window, known to
    streaming groups) runs also split where chunks start or stop ending within it, so one long
    prompt does not take the others off the causal paths."""
    num_reqs = cm.num_reqs
    if num_decodes >= num_reqs:
        return ()
    qsl = cm.query_start_loc_cpu[num_decodes:num_reqs + 1].tolist()
    lens = [b - a for a, b in zip(qsl[:-1], qsl[1:])]
    bound = getattr(cm, "seq_lens_cpu_upper_bound", None)
    ends = [cm.max_seq_len] * len(lens) if bound is None else bound[num_decodes:num_reqs].tolist()
    fresh = [False] * len(lens) if bound is None else [int(s) == n for s, n in zip(ends, lens)]
    keys = [(f, causal_end is not None and e <= causal_end) for f, e in zip(fresh, ends)]
    return tuple(PrefillPart(r0=num_decodes + a, r1=num_decodes + b, t0=qsl[a], t1=qsl[b], fresh=fresh[a],
                             max_query_len=max(lens[a:b]), max_seq_len=int(max(ends[a:b])))
                 for a, b in runs(keys))


class DuoMetadataBuilder(AttentionMetadataBuilder[DuoMetadata]):
    # Pure-decode batches run as full CUDA graphs (the csrc decode kernel's grid depends only on
    # the batch size); prompt chunks run eagerly between piecewise graphs (FA3 per slot, Triton).
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int = 1
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.streaming = isinstance(kv_cache_spec, DuoStreamingSpec)
        # Streaming groups split prompt runs at sink + prefill window (impl.py reads their parts).
        self.causal_end = kv_cache_spec.sink_size + kv_cache_spec.sliding_window if self.streaming else None
        self.tables = StepTables.for_runner(vllm_config, device)
        self.row = self.tables.add_group(layer_names)
        self.max_model_len = vllm_config.model_config.max_model_len
        sched = vllm_config.scheduler_config
        capture = getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
        self.max_rows = max(sched.max_num_seqs, capture)
        self._block_table: torch.Tensor | None = None  # streaming: the null-gapped copy
        self._cols: torch.Tensor | None = None  # its column indices
        self._sink_lens: torch.Tensor | None = None

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DuoMetadata:
        cm = common_attn_metadata
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        num_reqs = cm.num_reqs
        self.tables.write_slot_mapping(self.row, cm.slot_mapping)
        meta = DuoMetadata(
            num_actual_tokens=cm.num_actual_tokens, num_reqs=num_reqs,
            max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            max_model_len=self.max_model_len,
            query_start_loc=cm.query_start_loc[:num_reqs + 1], seq_lens=cm.seq_lens[:num_reqs],
            block_table=cm.block_table_tensor[:num_reqs], slot_mapping=cm.slot_mapping,
            num_decodes=num_decodes, num_decode_tokens=num_decode_tokens,
            tables=self.tables, group_row=self.row,
            prefill_parts=prefill_parts(cm, num_decodes, self.causal_end))
        if not self.streaming:
            self.tables.set_block_table(self.row, cm.block_table_tensor)
            return meta
        spec = self.kv_cache_spec
        meta.decode_window, meta.prefill_window = spec.recent_size, spec.sliding_window
        if self._sink_lens is None or self._sink_lens.shape[0] < num_reqs:
            self._sink_lens = torch.full((max(self.max_rows, num_reqs),), spec.sink_size,
                                         dtype=torch.int32, device=self.device)
        meta.sink_lens = self._sink_lens[:num_reqs]
        meta.block_table = self._null_gap(meta, cm.block_table_tensor, spec.sink_size, spec.block_size)
        return meta

    def _null_gap(self, meta: DuoMetadata, table: torch.Tensor, sink: int,
                  block_size: int) -> torch.Tensor:
        """This step's block table, with entries no query of the step may read pointing at the
        null block, written into the builder's own persistent table.

        The scheduler frees the middle blocks but the worker's table keeps their stale ids;
        a query at t needs keys < sink or > t - window, and t >= seq_len - query_len.
        """
        width = table.shape[1]
        if self._block_table is None or self._block_table.shape[1] != width or \
                self._block_table.shape[0] < meta.num_reqs:
            # A new table moves: the kernels follow it through the pointer tables.
            self._block_table = torch.zeros(max(self.max_rows, meta.num_reqs), width,
                                            dtype=table.dtype, device=self.device)
            self._cols = torch.arange(width, device=self.device, dtype=torch.int32)
            self.tables.set_block_table(self.row, self._block_table)
        bt = meta.block_table
        q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        first_q = meta.seq_lens - q_lens
        # Rows of more than one query go through the prefill kernels (sink + prefill window);
        # one-query rows, prompt tokens included, through the decode kernel (sink + recent
        # window, never longer: prefill_window >= recent_size). Decided on the device: vLLM's
        # is_prefilling is a host tensor, and copying it each step would stall the host.
        window = torch.where(q_lens > 1, meta.prefill_window, meta.decode_window).to(first_q.dtype)
        sink_blocks = -(-sink // block_size)
        first_needed = torch.clamp(first_q - window + 1, min=0) // block_size
        cols = self._cols[None, :]
        gap = (cols >= sink_blocks) & (cols < first_needed[:, None])
        out = self._block_table[:meta.num_reqs]
        out.copy_(bt)
        return out.masked_fill_(gap, NULL_BLOCK_ID)
