"""Block manager of DuoAttention streaming slots."""

from __future__ import annotations

from collections.abc import Sequence

from vllm.utils.math_utils import cdiv
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHashList, KVCacheBlock, resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec
from vllm.v1.request import Request

from vllm_duo.block_manager.spec import DuoStreamingSpec
from vllm_duo.compat import admission_cap


class DuoStreamingManager(SlidingWindowManager):
    """Keeps a streaming slot's sink blocks for the request's life, frees the middle.

    Blocks [0, ceil(sink/bs)) are never freed. Before each allocation vLLM reports
    ``processed`` tokens (computed and no longer in flight); every future query sits
    at t >= processed and, as t - W(t) grows with t, needs no key before
    processed - W + 1, where W is the prefill window while processed < prompt
    length and the recent window after. Whole blocks between the sink and that
    point are freed (replaced by the null block, as sliding window does), so a
    request holds sink + window + in-flight blocks.

    With ``tail_only_batches`` (the prefill kernel reads a chunk's own keys from the step's
    K/V), a chunk's blocks that no later query reads (past the sink, before the chunk's last
    window) are the null block from the start: a long chunk never occupies the pool.

    No prefix is ever skipped (the sink is at the front), so
    ``get_num_skipped_tokens`` is 0.

    Prefix caching: a hit at h (block-aligned) is served only if the sink blocks and the
    prefill window's blocks before h are cached: sliding window's search finds the longest
    such h, a missing sink block bounds the hit to the plain prefix before it, and the
    hybrid coordinator takes the minimum over all groups. Every chunk's last window is a
    real block (tail-only or not) and so is every decode block, and all are cached whatever
    vLLM's sliding-window retention interval (see ``reachable_block_mask``), so each finished
    turn leaves its end resumable. When the prefill window differs from the recent window, a
    decoded token's K/V (recent window) is not what a cold prompt computes (prefill window), so
    only prompt blocks are cached.
    """

    def __init__(self, kv_cache_spec: DuoStreamingSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.recent_size = kv_cache_spec.recent_size
        self.num_sink_blocks = kv_cache_spec.num_sink_blocks
        self.tail_only = kv_cache_spec.tail_only_batches > 0
        # Per request: every entry in [num_sink_blocks, freed_upto) is the null block.
        self._freed_upto: dict[str, int] = {}

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        decoding = num_prompt_tokens is not None and processed_computed_tokens >= num_prompt_tokens
        window = self.recent_size if decoding else self.sliding_window
        first_needed_block = (processed_computed_tokens - window + 1) // self.block_size
        self._free_range(request_id, first_needed_block)

    def _free_range(self, request_id: str, end: int) -> None:
        """Free the real blocks in [sink, end) and null them. Unlike sliding window's backward
        walk, this does not stop at a null entry: null chunk middles sit between real tails."""
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        start = self._freed_upto.get(request_id, self.num_sink_blocks)
        end = min(end, len(blocks))
        if end <= start:
            return
        freed = [b for b in blocks[start:end] if not b.is_null]
        blocks[start:end] = [self._null_block] * (end - start)
        self._freed_upto[request_id] = end
        if freed:
            self.block_pool.free_blocks(reversed(freed))

    def pop_blocks_for_free(self, request_id: str) -> list[KVCacheBlock]:
        self._freed_upto.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)

    def _null_entries(self, start: int, end: int, num_tokens: int) -> range:
        """New entries [start, end) that stay null: past the sink and wholly before the window
        that queries after this chunk need (t >= num_tokens reads p > t - W)."""
        first_needed = (num_tokens - self.sliding_window + 1) // self.block_size
        return range(max(start, self.num_sink_blocks), min(end, first_needed))

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int,
                                   new_computed_blocks: Sequence[KVCacheBlock],
                                   total_computed_tokens: int, num_local_computed_tokens: int,
                                   num_tokens_main_model: int, apply_admission_cap: bool = False,
                                   **kwargs) -> int:
        # kwargs: what newer vLLM adds (0.33: prefill_end), passed through.
        if not self.tail_only:
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                num_local_computed_tokens, num_tokens_main_model, apply_admission_cap, **kwargs)
        # A prefix hit arrives before the request holds any block: its entries come first,
        # and only those in the free queue (ref_cnt 0) take blocks from it when touched.
        blocks = self.req_to_blocks.get(request_id, [])
        start, end = len(blocks) + len(new_computed_blocks), cdiv(num_tokens, self.block_size)
        evictable = self._get_num_evictable_blocks(new_computed_blocks)
        if apply_admission_cap:
            # The full-sequence gate: what the request may still take, up to its peak.
            held = sum(not b.is_null for b in blocks) + \
                sum(not b.is_null and b.ref_cnt > 0 for b in new_computed_blocks)
            return max(min(end, admission_cap(self)) - held, 0)
        return max(end - start, 0) - len(self._null_entries(start, end, num_tokens)) + evictable

    def allocate_new_blocks(self, request_id: str, num_tokens: int,
                            num_tokens_main_model: int) -> list[KVCacheBlock]:
        if not self.tail_only:
            return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)
        # Sliding window's hits are block-aligned: no partial-block copy-on-write to apply.
        assert request_id not in self._partial_hit_reqs
        blocks = self.req_to_blocks[request_id]
        start, end = len(blocks), cdiv(num_tokens, self.block_size)
        if end <= start:
            return []
        nulls = self._null_entries(start, end, num_tokens)
        real = self.block_pool.get_new_blocks(end - start - len(nulls))
        if self._record_new_block_ids:
            self.new_block_ids.extend(b.block_id for b in real)
        head = max(0, nulls.start - start) if nulls else end - start
        new = real[:head] + [self._null_block] * len(nulls) + real[head:]
        blocks.extend(new)
        return new

    def cache_blocks(self, request: Request, num_tokens: int, retention_interval: int | None = None,
                     **kwargs) -> None:
        """Cache as sliding window does, but never a decoded token's block when the prefill
        window differs from the recent window (see the class docstring). kwargs: what newer
        vLLM adds (0.33: replay_boundaries), passed through."""
        if self.sliding_window != self.recent_size:
            num_tokens = min(num_tokens, request.num_prompt_tokens)
        super().cache_blocks(request, num_tokens, retention_interval, **kwargs)

    def get_num_skipped_tokens(self, num_computed_tokens: int) -> int:
        return 0

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes: BlockHashList,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool: BlockPool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ) -> tuple[tuple[list[KVCacheBlock], ...], int]:
        assert isinstance(kv_cache_spec, DuoStreamingSpec)
        hit, _ = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
            drop_eagle_block, alignment_tokens, dcp_world_size, pcp_world_size)
        bs = kv_cache_spec.block_size
        hashes = resolve_block_hashes(block_hashes, block_pool.hash_block_size, bs,
                                      alignment_tokens=alignment_tokens)
        for i in range(min(kv_cache_spec.num_sink_blocks, len(hit[0]))):
            if not hit[0][i].is_null:
                continue
            cached = block_pool.get_cached_block(hashes[i], kv_cache_group_ids)
            if cached is None:
                # Blocks [0, i) are cached sink blocks: a plain prefix hit.
                keep = i - 1 if drop_eagle_block and i > 0 else i
                keep = keep * bs // alignment_tokens * alignment_tokens // bs
                for blocks in hit:
                    del blocks[keep:]
                break
            for blocks, block in zip(hit, cached, strict=True):
                blocks[i] = block
        return hit, len(hit[0]) * bs

    @classmethod
    def reachable_block_mask(
        cls,
        start_block: int,
        end_block: int,
        alignment_tokens: int | None,
        kv_cache_spec: KVCacheSpec,
        use_eagle: bool,
        retention_interval: int | None = None,
        reachable_boundaries: Sequence[int] = (),
        **kwargs,
    ) -> list[bool] | None:
        """Sliding window's dense caching (a window's tail at every aligned boundary), and every
        hit needs the sink blocks.

        ``retention_interval`` (vLLM's sparse retention of sliding-window blocks; default None,
        dense, on 0.26; 0, only each prompt's replay tail, on 0.33) is ignored, as vLLM's
        full-attention groups ignore it: the model is full attention, so a later request may
        resume wherever full attention would, the end of a turn's output included. This mask
        serves local caching and the KV connectors' stores alike.
        kwargs: what newer vLLM adds (0.33: dcp_world_size, final_segment_end_block), passed through."""
        mask = super().reachable_block_mask(start_block, end_block, alignment_tokens, kv_cache_spec,
                                            use_eagle, None, reachable_boundaries, **kwargs)
        if mask is not None:
            assert isinstance(kv_cache_spec, DuoStreamingSpec)
            for i in range(start_block, min(end_block, kv_cache_spec.num_sink_blocks)):
                mask[i - start_block] = True
        return mask
