"""KV-cache spec of one DuoAttention streaming head (a 1-head "slot layer")."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class DuoStreamingSpec(SlidingWindowSpec):
    """A streaming head: attention sink plus a recent window.

    A query at absolute position t reads keys p < ``sink_size`` and
    t - W < p <= t, where W = ``sliding_window`` (the prefill window) for prompt
    positions and W = ``recent_size`` once decoding. A request therefore keeps its
    first ceil(sink/bs) blocks for its whole life plus the blocks of the current
    window and of the tokens in flight; the middle is freed by
    ``DuoStreamingManager``.

    Subclassing ``SlidingWindowSpec`` gives the runner token-to-slot mapping and
    gives the scheduler a per-request admission cap. ``is_uniform_with_collection``
    keeps these slots out of any KV-cache group holding another spec (full
    attention, plain sliding window, other duo settings): a group shares one
    block table.
    """

    sink_size: int
    recent_size: int
    # 0: every prompt token is stored (the prefill kernel reads the chunk from the cache).
    # n > 0: the prefill kernel reads a chunk's own keys from the step's K/V, so only the sink
    # and each chunk's last window are stored, and n = vLLM's concurrent batches bounds how
    # many chunks of one request are in flight.
    tail_only_batches: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_size < 0 or self.tail_only_batches < 0 or \
                not 0 < self.recent_size <= self.sliding_window:
            raise ValueError(
                f"DuoStreamingSpec needs sink_size >= 0, tail_only_batches >= 0 and 0 < "
                f"recent_size <= sliding_window (the prefill window), got sink_size="
                f"{self.sink_size}, tail_only_batches={self.tail_only_batches}, recent_size="
                f"{self.recent_size}, sliding_window={self.sliding_window}")

    @property
    def num_sink_blocks(self) -> int:
        return cdiv(self.sink_size, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        """Peak blocks one request holds: the sink blocks plus sliding window's peak.

        The window part (last W-1 processed tokens + in-flight tokens, +1 for an
        unaligned start) is ``SlidingWindowSpec``'s bound with W = the prefill
        window, the widest window ever used. Nothing is freed before the sink
        blocks, so the two parts never exceed their sum; and no request holds
        more blocks than ``max_model_len`` covers. ``max_memory_usage_bytes``
        (the startup pool check) is derived from this, as in the parent.
        """
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        if self.tail_only_batches:
            # Real blocks: the window behind the processed tokens, plus the last window of
            # each chunk in flight (the rest of a chunk is the null block).
            window = min(window, (1 + self.tail_only_batches) * self.window_blocks)
        return min(self.num_sink_blocks + window, cdiv(max_model_len, self.block_size))

    @property
    def num_retained_tokens(self) -> int:
        """0: the worker must not null any of this group's block-table entries.

        vLLM 0.33's V2 model runner nulls, per step, the entries wholly below (first scheduled
        position - ``num_retained_tokens``) of sliding-window groups; with the parent's value
        (W - 1) that would null the sink blocks, which every streaming query reads. 0 turns
        that masking off for the group (``BlockTables``); freed middle blocks are never read,
        as duo's kernels address only sink and window blocks. 0.26 does not read it.
        """
        return 0

    @property
    def window_blocks(self) -> int:
        """Most blocks W - 1 consecutive tokens can touch (an unaligned start adds one)."""
        return cdiv(self.sliding_window - 1, self.block_size) + 1

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(spec, DuoStreamingSpec)
            and (spec.sink_size, spec.recent_size, spec.sliding_window, spec.tail_only_batches)
            == (self.sink_size, self.recent_size, self.sliding_window, self.tail_only_batches)
            for spec in kv_cache_specs.values())
