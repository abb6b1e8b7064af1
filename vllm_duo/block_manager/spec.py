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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sink_size < 0 or not 0 < self.recent_size <= self.sliding_window:
            raise ValueError(
                f"DuoStreamingSpec needs sink_size >= 0 and 0 < recent_size <= "
                f"sliding_window (the prefill window), got sink_size={self.sink_size}, "
                f"recent_size={self.recent_size}, sliding_window={self.sliding_window}")

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
        return min(self.num_sink_blocks + window, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(spec, DuoStreamingSpec)
            and (spec.sink_size, spec.recent_size, spec.sliding_window)
            == (self.sink_size, self.recent_size, self.sliding_window)
            for spec in kv_cache_specs.values())
