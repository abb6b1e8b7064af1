"""``DuoAttentionImpl``: DuoAttention's math over one layer's slot caches.

Per step and layer:
- one ``write_kv`` launch stores the step's K/V into every slot cache;
- one ``paged_decode`` launch (csrc split-head kernel) attends every decode token over every
  slot: retrieval slots over all their blocks, streaming slots over sink + recent blocks only;
- prompt chunks, in runs of adjacent fresh (starting at position 0) and continuing ones: for a
  continuing run, retrieval slots one FA3 paged varlen call each (as FLASH_ATTN), and streaming
  slots too when every chunk ends within sink + prefill window (causal attention is then exact
  for them, and their caches hold every key); for a fresh
  run, one FA3 varlen call per run of adjacent retrieval KV heads on views of the step's own
  Q/K/V/output (no copies), or, when none of its prompts is longer than sink + prefill window,
  one FA3 call over every head (causal attention is then exact for all); streaming slots
  by the ``streaming_prefill`` option: ``"window"`` (default) one vllm-duo Triton launch for all
  streaming slots that visits only the sink and window tiles, O(sink + window); ``"rswa"``
  vLLM's Triton unified attention per slot with its exact sink + window mask, O(context).

Pure-decode steps run inside vLLM's full CUDA graphs: ``forward()`` reads no host values and
allocates only inside the captured region; the builder fills every persistent input per step.

An fp8 KV cache (``--kv-cache-dtype fp8``) holds e4m3 K / k_scale and V / v_scale with the layer's
per-tensor scales, as FLASH_ATTN's: ``write_kv`` quantizes, ``paged_decode`` and the window kernel
dequantize on load (the scales are read on the device), retrieval chunks with cached context go
through FA3's fp8 path with the query quantized by q_scale as FLASH_ATTN does, and so do fresh
prompts: FA3 on their own Q/K/V quantized as the cache holds them (FLASH_ATTN reads them from the
cache), so pattern='full' computes what FLASH_ATTN computes. The window kernel reads a chunk's
own keys in the model's dtype and earlier ones from the fp8 cache.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
from vllm.v1.attention.backend import AttentionImpl, AttentionType
from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

from vllm_duo import ops
from vllm_duo.backend.metadata import CAUSAL_SLOTS, FRESH, PER_SLOT, WHOLE, DuoMetadata, PrefillPart
from vllm_duo.backend.step_tables import SlotTensors, StepTables
from vllm_duo.errors import DuoConfigError
from vllm_duo.model_check import is_fp8
from vllm_duo.options import DuoOptions
from vllm_duo.slot_plan import RETRIEVAL


FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to e4m3, as vLLM's static query quantization for FA3 does."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fa3_descales(layer, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """FA3's q/k/v descale arguments for an fp8 call: the layer's per-tensor scales, expanded to
    ``shape`` = (sequences, KV heads of the call), as FLASH_ATTN passes them."""
    return {f"{x}_descale": getattr(layer, f"_{x}_scale").expand(shape) for x in "qkv"}


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
        self.fp8 = is_fp8(kv_cache_dtype)  # e4m3 caches with the layer's per-tensor scales
        self.fa_version = get_flash_attn_version()
        self.slots: list = []
        self.opts: DuoOptions | None = None
        self.block_size = 0  # the slot caches', read when they are bound
        self._tables: tuple | None = None  # ((tables, cache address), SlotTensors)
        self._views: list = []  # (slot, its query heads, K view, V view) of each real slot
        # (KV heads, query heads) of each run of adjacent retrieval KV heads
        self._retrieval_runs: list[tuple[slice, slice]] = []
        self._streaming_name: str | None = None

    def set_slots(self, slots: list, opts: DuoOptions, cache_block_size: int) -> None:
        """``cache_block_size`` is the configured one, for the profile run's warm-up: vLLM's config
        is not current while the model runs."""
        self.slots, self.opts, self.cache_block_size = slots, opts, cache_block_size
        # A streaming slot's group: its metadata's prompt runs split at sink + prefill window.
        self._streaming_name = next((s.name for s in slots if s.kind != RETRIEVAL), None)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: DuoMetadata, output: torch.Tensor | None = None,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        """Launches only: every per-step input lives in persistent buffers the builder filled, so
        a pure-decode step captured in a full CUDA graph replays with later steps' values."""
        assert output is not None, "duo writes into vLLM's preallocated output"
        if attn_metadata is None:  # profiling run: no caches bound yet
            self._compile_window_kernel(layer, query, key, value, output)
            return output.fill_(0)
        t = self._slot_tensors(attn_metadata.tables)
        n = attn_metadata.num_actual_tokens
        scales = dict(k_scale=layer._k_scale, v_scale=layer._v_scale) if self.fp8 else {}
        ops.write_kv(key[:n], value[:n], t.kv_ptrs, t.slot_kv_head, t.slot_group,
                     attn_metadata.tables.slot_mappings, check=False, **scales)
        nd, ndt = attn_metadata.num_decodes, attn_metadata.num_decode_tokens
        if nd:
            # A captured launch replays for any later length: plan it for the longest row
            # (a layer without retrieval heads never reads more than sink + window keys).
            graph = torch.cuda.is_current_stream_capturing()
            longest = attn_metadata.max_model_len if t.num_long_slots else \
                min(attn_metadata.max_model_len, self.opts.sink_size + self.opts.recent_size)
            ops.paged_decode(query[:ndt], t.kv_ptrs, t.bt_ptrs, t.bt_strides, t.slot_kv_head,
                             t.slot_streaming, attn_metadata.seq_lens[:nd],
                             max_seq_len=longest if graph else attn_metadata.max_seq_len,
                             num_kv_heads=self.num_kv_heads, block_size=self.block_size,
                             sink_size=self.opts.sink_size, window=self.opts.recent_size,
                             scale=self.scale, out=output[:ndt],
                             graph_slots=max(1, t.num_long_slots) if graph else None, check=False,
                             **scales)
        if attn_metadata.prefill_parts:
            metas = get_forward_context().attn_metadata
            if isinstance(metas, list):
                metas = metas[0]
            # A streaming group's parts also split at sink + prefill window (the same chunks).
            parts = metas[self._streaming_name].prefill_parts if self._streaming_name else \
                attn_metadata.prefill_parts
            for part in parts:
                self._prefill_part(layer, query, key, value, output, metas, attn_metadata, t, part, scales)
        return output

    def _compile_window_kernel(self, layer, query, key, value, output) -> None:
        """Compile the window kernel in vLLM's profile run: a first prompt longer than sink +
        window otherwise waits seconds for Triton (a chat's first turn: 4.40 s against
        FLASH_ATTN's 2.53 s on the H200). One fresh prompt of sink + window + 1 tokens over a
        stand-in slot, with the specialization of serving (this step's Q/K/V and output, the
        cache's block size and dtype); a fresh prompt's keys all come from the step's K/V, so the
        stand-in cache is never read. Once per process and kernel variant."""
        opts = self.opts
        if opts is None or opts.streaming_prefill != "window" or all(s.kind == RETRIEVAL for s in self.slots) \
                or torch.cuda.is_current_stream_capturing():
            return
        n = opts.sink_size + opts.prefill_window + 1
        block_size = self.cache_block_size
        variant = (self.head_size, self.group, self.fp8, block_size, opts.sink_size, opts.prefill_window)
        if variant in _COMPILED or query.shape[0] < n:
            return
        dev = query.device
        cache = torch.zeros(1, block_size, 2 * self.head_size, dtype=torch.uint8 if self.fp8 else query.dtype,
                            device=dev)
        table = torch.zeros(1, 1, dtype=torch.int32, device=dev)
        scales = dict(k_scale=layer._k_scale, v_scale=layer._v_scale) if self.fp8 else {}
        ops.streaming_prefill(
            query[:n], key[:n], value[:n], torch.tensor([cache.data_ptr()], dtype=torch.int64, device=dev),
            torch.tensor([table.data_ptr()], dtype=torch.int64, device=dev),
            torch.ones(1, dtype=torch.int64, device=dev), torch.zeros(1, dtype=torch.int32, device=dev),
            torch.tensor([0, n], dtype=torch.int32, device=dev), torch.tensor([n], dtype=torch.int32, device=dev),
            max_query_len=n, num_kv_heads=self.num_kv_heads, block_size=block_size, sink_size=opts.sink_size,
            window=opts.prefill_window, scale=self.scale, out=output[:n], **scales)
        _COMPILED.add(variant)

    def _slot_tensors(self, tables: StepTables) -> SlotTensors:
        """This layer's per-slot tables, built on the first step after vLLM binds the caches."""
        key = (id(tables), self.slots[0].layer.kv_cache.data_ptr())
        if self._tables is None or self._tables[0] != key:
            ops.require_extension()  # the launches below skip the wrappers' checks
            metas = get_forward_context().attn_metadata
            if isinstance(metas, list):
                metas = metas[0]
            rows = [metas[s.name].group_row for s in self.slots]
            self.block_size = self.slots[0].layer.kv_cache.shape[2]
            self._tables = (key, tables.layer_tensors(self.slots, rows))
            self._views = [(s, slice(s.head * self.group, (s.head + 1) * self.group),
                            *self._kv_views(s)) for s in self.slots if s.head >= 0]
            heads = [s.head for s in self.slots if s.head >= 0 and s.kind == RETRIEVAL]
            self._retrieval_runs = [(slice(a, b), slice(a * self.group, b * self.group))
                                    for a, b in head_runs(heads)]
        return self._tables[1]

    def _kv_views(self, slot) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of a slot cache for the prefill kernels (FA3: TMA-friendly strides; every
        slot, as streaming slots take FA3 too when a part is causal)."""
        k_cache, v_cache = slot.layer.kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        if self.fp8:  # vLLM allocates fp8 caches as uint8
            k_cache, v_cache = k_cache.view(FP8_DTYPE), v_cache.view(FP8_DTYPE)
        return canonicalize_singleton_dim_strides(k_cache), canonicalize_singleton_dim_strides(v_cache)

    def _prefill_part(self, layer, query, key, value, output, metas, meta: DuoMetadata, t: SlotTensors,
                      part: PrefillPart, scales: dict) -> None:
        """One run of adjacent prompt chunks, by ``PrefillPart.path``. Fresh chunks attend their
        own K/V through FA3 (one call per run of retrieval heads, or over every head when none is
        longer than sink + prefill window: a streaming query at t < sink + W sees every key
        p <= t, so the part is plain causal attention); continuing chunks read the caches per
        slot, streaming slots through FA3 too when every chunk ends within sink + W. A step
        mixing both kinds sends each to its own path, rather than every chunk down the per-slot
        one."""
        path = part.path(self.opts.sink_size, self.opts.prefill_window)
        if path == WHOLE:
            self._prefill_fresh(layer, query, key, value, output, meta, part,
                                [(slice(0, self.num_kv_heads), slice(0, self.num_heads))])
            return
        if path == CAUSAL_SLOTS:
            self._prefill_per_slot(layer, query, output, metas, meta, part, retrieval=True, streaming=True,
                                   streaming_causal=True)
            return
        if path == FRESH and self._retrieval_runs:
            self._prefill_fresh(layer, query, key, value, output, meta, part, self._retrieval_runs)
        window_kernel = self.opts.streaming_prefill == "window"
        self._prefill_per_slot(layer, query, output, metas, meta, part, retrieval=path == PER_SLOT,
                               streaming=not window_kernel)
        if window_kernel:
            self._prefill_streaming(query, key, value, output, t, meta, part, scales)

    def _prefill_fresh(self, layer, query, key, value, output, meta: DuoMetadata, part: PrefillPart,
                       runs: list[tuple[slice, slice]]) -> None:
        """Prompt chunks that all start at position 0 see only their own keys: FA3 varlen calls on
        this step's K/V, one per run of adjacent KV heads (the retrieval heads, or every head when
        causal attention is exact for all), instead of one paged call per retrieval slot. Each call
        reads and writes head-slice views: gathering the heads into one call instead copied the
        step's Q/K/V and output (22 of 133 ms of prompt attention for 64 x 1K-token prompts on the
        H200, torch profiler, 2026-11-30). With an fp8 cache each call gets e4m3 copies and the
        layer's scales, as FLASH_ATTN computes over its fp8 cache and quantized queries."""
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

        cu = self._cu_seqlens(meta, part)
        rows = slice(part.t0, part.t1)
        for kv, heads in runs:
            q, k, v, descales = query[rows, heads], key[rows, kv], value[rows, kv], {}
            if self.fp8:  # FLASH_ATTN's fp8 attention: e4m3 Q/K/V (as the cache holds K/V), descaled
                q, k, v = (quantize_fp8(x, getattr(layer, f"_{name}_scale"))
                           for x, name in ((q, "q"), (k, "k"), (v, "v")))
                descales = fa3_descales(layer, (cu.numel() - 1, k.shape[1]))  # (sequences, KV heads of the run)
            flash_attn_varlen_func(
                q=q, k=k, v=v, out=output[rows, heads],
                max_seqlen_q=part.max_query_len, cu_seqlens_q=cu, max_seqlen_k=part.max_query_len,
                cu_seqlens_k=cu, softmax_scale=self.scale, causal=True, fa_version=self.fa_version, **descales)

    @staticmethod
    def _cu_seqlens(meta: DuoMetadata, part: PrefillPart) -> torch.Tensor:
        """The part's query offsets from 0: its rows of vLLM's ``query_start_loc``, rebased."""
        qsl = meta.query_start_loc[part.r0:part.r1 + 1]
        return qsl - qsl[:1]

    def _prefill_per_slot(self, layer, query, output, metas, meta: DuoMetadata, part: PrefillPart,
                          retrieval: bool, streaming: bool, streaming_causal: bool = False) -> None:
        """The part's prompt chunks one slot at a time: when ``retrieval``, retrieval slots
        through FA3, and, when ``streaming``, streaming slots through vLLM's Triton R-SWA, or
        (``streaming_causal``: every chunk ends within sink + prefill window) through FA3's
        causal attention like retrieval slots. Every group shares the step's query offsets and
        lengths; only the block table is the slot's group's."""
        if not (retrieval or streaming):
            return
        cu_seqlens_q, seq_lens = self._cu_seqlens(meta, part), meta.seq_lens[part.r0:part.r1]
        rows = slice(part.t0, part.t1)
        q = query[rows]
        descales = {}
        if self.fp8 and retrieval:  # FA3 reads an fp8 cache with fp8 queries, as FLASH_ATTN does
            q = quantize_fp8(q, layer._q_scale)
            descales = fa3_descales(layer, (seq_lens.numel(), 1))  # (sequences, KV heads of one slot)
        for slot, heads, k_cache, v_cache in self._views:
            is_retrieval = slot.kind == RETRIEVAL
            if not (retrieval if is_retrieval else streaming):
                continue
            if is_retrieval or streaming_causal:
                self._fa3_paged(q[:, heads], k_cache, v_cache, output[rows, heads], metas[slot.name], part,
                                cu_seqlens_q, seq_lens, descales)
            else:
                self._streaming(query[rows, heads], k_cache, v_cache, output[rows, heads], metas[slot.name],
                                part, cu_seqlens_q, seq_lens)

    def _prefill_streaming(self, query, key, value, output, t: SlotTensors, meta: DuoMetadata,
                           part: PrefillPart, scales: dict) -> None:
        """The part's prompt chunks in every streaming slot: one launch, sink + prefill window
        only; keys of a chunk itself come from this step's K/V (the cache may hold only the
        chunk's tail)."""
        if t.stream_kv_ptrs.numel() == 0:
            return
        rows = slice(part.t0, part.t1)
        ops.streaming_prefill(
            query[rows], key[rows], value[rows], t.stream_kv_ptrs, t.stream_bt_ptrs,
            t.stream_bt_strides, t.stream_kv_head,
            meta.query_start_loc[part.r0:part.r1 + 1], meta.seq_lens[part.r0:part.r1],
            max_query_len=part.max_query_len, num_kv_heads=self.num_kv_heads, block_size=self.block_size,
            sink_size=self.opts.sink_size, window=self.opts.prefill_window, scale=self.scale,
            block_table_row0=part.r0, out=output[rows], **scales)

    def _fa3_paged(self, q, k_cache, v_cache, out, meta: DuoMetadata, part: PrefillPart, cu_seqlens_q,
                   seq_lens, descales: dict) -> None:
        """FA3 causal over one slot's cache (a retrieval slot, or any slot on a causal part)."""
        from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

        flash_attn_varlen_func(
            q=q, k=k_cache, v=v_cache, out=out,
            cu_seqlens_q=cu_seqlens_q, max_seqlen_q=part.max_query_len,
            seqused_k=seq_lens, max_seqlen_k=meta.max_seq_len, softmax_scale=self.scale,
            causal=True, block_table=meta.block_table[part.r0:part.r1], fa_version=self.fa_version,
            **descales)

    def _streaming(self, q, k_cache, v_cache, out, meta: DuoMetadata, part: PrefillPart, cu_seqlens_q,
                   seq_lens) -> None:
        """Exact sink + window mask with the prefill window (decodes went through the kernel)."""
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        unified_attention(
            q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=part.max_query_len, seqused_k=seq_lens,
            max_seqlen_k=meta.max_seq_len, softmax_scale=self.scale, causal=True,
            window_size=(-1, -1), block_table=meta.block_table[part.r0:part.r1], softcap=0,
            q_descale=None, k_descale=None, v_descale=None,
            rswa_prefix_lens=meta.sink_lens[part.r0:part.r1], rswa_window=meta.prefill_window)


# Window-kernel variants compiled in this process by a profile run (see _compile_window_kernel).
_COMPILED: set[tuple] = set()


def head_runs(heads: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of consecutive values in ``heads``: [0, 1, 3] -> [(0, 2), (3, 4)]."""
    runs: list[tuple[int, int]] = []
    for h in sorted(heads):
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs
