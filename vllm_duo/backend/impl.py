"""``DuoAttentionImpl``: DuoAttention's math over one layer's slot caches.

Per slot (one local KV head and its query-head group): write the step's K/V, then
- retrieval slot: FA3 paged varlen attention, causal over every key (as FLASH_ATTN);
- streaming slot: keys p < sink or t - W < p <= t (exact per-token Lambda mask, vLLM's Triton
  unified attention with its R-SWA prefix/window mask), W = decode or prefill window.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
from vllm.v1.attention.backend import AttentionImpl, AttentionType
from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

from vllm_duo.backend.metadata import DuoMetadata
from vllm_duo.errors import DuoConfigError
from vllm_duo.options import DuoOptions
from vllm_duo.slot_plan import RETRIEVAL


class DuoAttentionImpl(AttentionImpl[DuoMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 **extra) -> None:
        unsupported = {"ALiBi": alibi_slopes is not None, "sliding window": sliding_window is not None,
                       "logits soft-cap": bool(logits_soft_cap),
                       "KV sharing": kv_sharing_target_layer_name is not None,
                       f"attention type {attn_type}": attn_type != AttentionType.DECODER}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise DuoConfigError(f"the duo attention backend does not support {', '.join(bad)} "
                                 f"in this model; use another --attention-backend")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.fa_version = get_flash_attn_version()
        self.slots: list = []
        self.opts: DuoOptions | None = None

    def set_slots(self, slots: list, opts: DuoOptions) -> None:
        self.slots, self.opts = slots, opts

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: DuoMetadata, output: torch.Tensor | None = None,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        assert output is not None, "duo writes into vLLM's preallocated output"
        if attn_metadata is None:  # profiling run: no caches bound yet
            return output.fill_(0)
        metas = get_forward_context().attn_metadata
        if isinstance(metas, list):
            metas = metas[0]
        n = attn_metadata.num_actual_tokens
        for slot in self.slots:
            if slot.head < 0:
                continue
            meta: DuoMetadata = metas[slot.name]
            cache = slot.layer.kv_cache
            k_cache, v_cache = cache.transpose(1, 2).split(self.head_size, dim=-1)
            h = slot.head
            ops.reshape_and_cache_flash(key[:, h:h + 1], value[:, h:h + 1], k_cache, v_cache,
                                        meta.slot_mapping, self.kv_cache_dtype,
                                        layer._k_scale, layer._v_scale)
            q = query[:n, h * self.group:(h + 1) * self.group]
            out = output[:n, h * self.group:(h + 1) * self.group]
            if slot.kind == RETRIEVAL:
                self._retrieval(q, k_cache, v_cache, out, meta)
            else:
                self._streaming(q, k_cache, v_cache, out, meta)
        return output

    def _retrieval(self, q, k_cache, v_cache, out, meta: DuoMetadata) -> None:
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

        fa = meta.fa
        flash_attn_varlen_func(
            q=q, k=canonicalize_singleton_dim_strides(k_cache),
            v=canonicalize_singleton_dim_strides(v_cache), out=out,
            cu_seqlens_q=fa.query_start_loc, max_seqlen_q=fa.max_query_len,
            seqused_k=fa.seq_lens, max_seqlen_k=fa.max_seq_len, softmax_scale=self.scale,
            causal=True, block_table=fa.block_table, scheduler_metadata=fa.scheduler_metadata,
            fa_version=self.fa_version, num_splits=fa.max_num_splits)

    def _streaming(self, q, k_cache, v_cache, out, meta: DuoMetadata) -> None:
        """Exact Lambda mask; decodes (leading requests) and prompt chunks may use different windows."""
        nd, ndt = meta.num_decodes, meta.num_decode_tokens
        if meta.decode_window == meta.prefill_window or nd == 0 or nd == meta.num_reqs:
            window = meta.decode_window if nd == meta.num_reqs else meta.prefill_window
            self._rswa(q, k_cache, v_cache, out, meta, 0, meta.num_reqs, window)
            return
        self._rswa(q[:ndt], k_cache, v_cache, out[:ndt], meta, 0, nd, meta.decode_window)
        self._rswa(q[ndt:], k_cache, v_cache, out[ndt:], meta, nd, meta.num_reqs, meta.prefill_window)

    def _rswa(self, q, k_cache, v_cache, out, meta: DuoMetadata, r0: int, r1: int, window: int) -> None:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        qsl = meta.query_start_loc[r0:r1 + 1]
        unified_attention(
            q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=qsl - qsl[:1],
            max_seqlen_q=meta.max_query_len, seqused_k=meta.seq_lens[r0:r1],
            max_seqlen_k=meta.max_seq_len, softmax_scale=self.scale, causal=True,
            window_size=(-1, -1), block_table=meta.block_table[r0:r1], softcap=0,
            q_descale=None, k_descale=None, v_descale=None,
            rswa_prefix_lens=meta.sink_lens[r0:r1], rswa_window=window)
