"""Block manager of DuoAttention streaming slots."""

from __future__ import annotations

from collections.abc import Sequence

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHashList, KVCacheBlock, resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec

from vllm_duo.block_manager.spec import DuoStreamingSpec


class DuoStreamingManager(SlidingWindowManager):
    """Keeps a streaming slot's sink blocks for the request's life, frees the middle.

    Blocks [0, ceil(sink/bs)) are never freed. Before each allocation vLLM reports
    ``processed`` tokens (computed and no longer in flight); every future query sits
    at t >= processed and, as t - W(t) grows with t, needs no key before
    processed - W + 1, where W is the prefill window while processed < prompt
    length and the recent window after. Whole blocks between the sink and that
    point are freed (replaced by the null block, as sliding window does), so a
    request holds sink + window + in-flight blocks.

    No prefix is ever skipped (the sink is at the front), so
    ``get_num_skipped_tokens`` is 0. Prefix-cache hits need the sink blocks
    cached as well as the sliding-window tail; a missing sink block bounds the
    hit to the plain prefix before it, so a hit never installs the null block
    where a sink is read.
    """

    def __init__(self, kv_cache_spec: DuoStreamingSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.recent_size = kv_cache_spec.recent_size
        self.num_sink_blocks = kv_cache_spec.num_sink_blocks

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        decoding = num_prompt_tokens is not None and processed_computed_tokens >= num_prompt_tokens
        window = self.recent_size if decoding else self.sliding_window
        first_needed_block = (processed_computed_tokens - window + 1) // self.block_size
        self._remove_blocks_in_range(request_id, self.num_sink_blocks, first_needed_block)

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
    ) -> list[bool] | None:
        """Sliding window's sparse caching, but every hit needs the sink blocks."""
        mask = super().reachable_block_mask(start_block, end_block, alignment_tokens, kv_cache_spec,
                                            use_eagle, retention_interval, reachable_boundaries)
        if mask is not None:
            assert isinstance(kv_cache_spec, DuoStreamingSpec)
            for i in range(start_block, min(end_block, kv_cache_spec.num_sink_blocks)):
                mask[i - start_block] = True
        return mask
