"""The impl's decode path reads every kernel input from the builders' persistent tables (CPU).

The CUDA ops are replaced by plain-PyTorch versions that follow the same addresses the kernels
follow (cache and block-table pointers, the slot's group row of the stacked slot mappings), so a
wrong row, a stale pointer or a missing in-place update shows up as a wrong output. Two steps run
on the same buffers with new lengths, tables and mappings, one of them padded (the last request
has seq_len 0), as a replayed CUDA graph would see them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_duo.backend import impl as impl_module
from vllm_duo.backend.builder import DuoMetadataBuilder
from vllm_duo.block_manager import slot_kind_specs
from vllm_duo.options import DuoOptions
from vllm_duo.slot_plan import RETRIEVAL, STREAMING

H, G, D, BS, WIDTH, POOL, MAXR, SINK, WIN = 2, 2, 8, 4, 16, 80, 4, 4, 8


class FakeOps:
    """``write_kv``/``paged_decode`` in PyTorch, resolving raw addresses like the kernels."""

    def __init__(self, tensors):
        self.tensors = tensors  # callable: the live tensors an address may point at

    def at(self, ptr: int) -> torch.Tensor:
        found = [t for t in self.tensors() if t.data_ptr() == ptr]
        assert found, f"address {ptr:#x} is no live cache or block table"
        return found[0]

    def write_kv(self, key, value, kv_ptrs, slot_kv_head, slot_group, slot_mappings, check=True):
        for s in range(kv_ptrs.numel()):
            head = int(slot_kv_head[s])
            if head < 0:
                continue
            rows = self.at(int(kv_ptrs[s])).view(-1, 2 * D)
            for t in range(key.shape[0]):
                row = int(slot_mappings[int(slot_group[s]), t])
                if row >= 0:
                    rows[row] = torch.cat([key[t, head], value[t, head]])

    def paged_decode(self, q, kv_ptrs, bt_ptrs, bt_strides, slot_kv_head, slot_streaming, seq_lens, *,
                     out, sink_size, window, scale, block_size, **_):
        for s in range(kv_ptrs.numel()):
            head = int(slot_kv_head[s])
            rows = self.at(int(kv_ptrs[s])).view(-1, 2 * D).float()
            table = self.at(int(bt_ptrs[s]))
            assert table.stride(0) == int(bt_strides[s])
            for r in range(q.shape[0]):
                L = int(seq_lens[r])
                heads = slice(head * G, (head + 1) * G)
                if L == 0:
                    out[r, heads] = 0
                    continue
                pos = torch.arange(L)
                if int(slot_streaming[s]):
                    pos = pos[(pos < sink_size) | (pos > L - 1 - window)]
                kv = rows[table[r, pos // block_size].long() * block_size + pos % block_size]
                p = torch.softmax(q[r, heads].float() @ kv[:, :D].T * scale, dim=-1)
                out[r, heads] = (p @ kv[:, D:]).to(out.dtype)


def _config_and_specs():
    """A builder's view of the engine config, and the retrieval / streaming slot specs."""
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=MAXR),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=MAXR),
        model_config=SimpleNamespace(max_model_len=WIDTH * BS))
    return config, slot_kind_specs(block_size=BS, head_size=D, dtype=torch.float32, sink_size=SINK,
                                   recent_size=WIN, prefill_window=WIN, tail_only_batches=0)


def _impl(slots: list, kv_heads: int = H, kv_cache_dtype: str = "auto") -> impl_module.DuoAttentionImpl:
    impl = impl_module.DuoAttentionImpl(num_heads=kv_heads * G, head_size=D, scale=D ** -0.5,
                                        num_kv_heads=kv_heads, alibi_slopes=None, sliding_window=None,
                                        kv_cache_dtype=kv_cache_dtype)
    impl.set_slots(slots, DuoOptions(sink_size=SINK, recent_size=WIN, prefill_recent_size=WIN), BS)
    return impl


def _two_slot_layer(caches: list[torch.Tensor], streaming_first: bool = False) -> tuple[list, list, list]:
    """(names, builders, slots) of a layer with a retrieval slot (KV head 0, group "l0") and a
    streaming slot (KV head 1, group "l0.duo_s0") over ``caches``."""
    config, specs = _config_and_specs()
    names = ["l0", "l0.duo_s0"]
    builders = [DuoMetadataBuilder(spec, [name], config, torch.device("cpu")) for spec, name in zip(specs, names)]
    slots = [SimpleNamespace(name=names[0], kind=RETRIEVAL, head=0, layer=SimpleNamespace(kv_cache=caches[0])),
             SimpleNamespace(name=names[1], kind=STREAMING, head=1, layer=SimpleNamespace(kv_cache=caches[1]))]
    return names, builders, slots[::-1] if streaming_first else slots


def test_decode_reads_this_steps_tables(monkeypatch):
    caches = [torch.randn(POOL, 1, BS, 2 * D) for _ in range(2)]
    # slot order differs from group order on purpose: the streaming slot comes first
    names, builders, slots = _two_slot_layer(caches, streaming_first=True)
    impl = _impl(slots)
    context = SimpleNamespace(attn_metadata=None)
    tables = [torch.zeros(MAXR, WIDTH, dtype=torch.int32) for _ in range(2)]  # vLLM's, persistent
    fake = FakeOps(lambda: caches + tables + [b._block_table for b in builders if b._block_table is not None])
    monkeypatch.setattr(impl_module, "get_forward_context", lambda: context)
    monkeypatch.setattr(impl_module.ops, "write_kv", fake.write_kv)
    monkeypatch.setattr(impl_module.ops, "paged_decode", fake.paged_decode)
    monkeypatch.setattr(impl_module.ops, "require_extension", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    seq_lens = torch.zeros(MAXR, dtype=torch.int32)
    qsl = torch.arange(MAXR + 1, dtype=torch.int32)
    mappings = [torch.full((MAXR,), -1, dtype=torch.int64) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)

    for step, lens in enumerate(([30, 7, 50, 12], [61, 3, 44, 0])):  # step 2: last row is padding
        n = sum(1 for L in lens if L)
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        for table, mapping in zip(tables, mappings):
            blocks = torch.randperm(POOL - 1, generator=gen) + 1
            table.copy_(blocks[:MAXR * WIDTH].view(MAXR, WIDTH).to(torch.int32))
            mapping.fill_(-1)
            for r in range(n):
                L = lens[r]
                mapping[r] = int(table[r, (L - 1) // BS]) * BS + (L - 1) % BS
        q = torch.randn(MAXR, H * G, D, generator=gen)
        k, v = torch.randn(MAXR, H, D, generator=gen), torch.randn(MAXR, H, D, generator=gen)
        metas = {}
        for name, builder, table, mapping in zip(names, builders, tables, mappings):
            metas[name] = builder.build(0, CommonAttentionMetadata(
                query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=MAXR,
                num_actual_tokens=MAXR, max_query_len=1, max_seq_len=max(lens), block_table_tensor=table,
                slot_mapping=mapping))
        context.attn_metadata = metas
        out = torch.full((MAXR, H * G, D), float("nan"))
        impl.forward(None, q, k, v, None, metas[names[1]], output=out)
        # expected: this step's K/V at each request's last position, then attention over vLLM's tables
        want = torch.zeros_like(out)
        for s, streaming in ((0, False), (1, True)):
            rows = caches[s].view(-1, 2 * D)
            for r in range(n):
                L = lens[r]
                assert torch.equal(rows[int(mappings[s][r])], torch.cat([k[r, s], v[r, s]]))
                pos = torch.arange(L)
                if streaming:
                    pos = pos[(pos < SINK) | (pos > L - 1 - WIN)]
                kv = rows[tables[s][r, pos // BS].long() * BS + pos % BS]
                p = torch.softmax(q[r, s * G:(s + 1) * G] @ kv[:, :D].T * D ** -0.5, dim=-1)
                want[r, s * G:(s + 1) * G] = p @ kv[:, D:]
        torch.testing.assert_close(out, want, msg=f"step {step}")


def test_missing_build_fails_with_the_hint(monkeypatch):
    from vllm_duo.ops import _ext

    monkeypatch.setattr(_ext, "_ERROR", "no _C*.so in /x")
    with pytest.raises(RuntimeError, match="pip install -e"):
        impl_module.ops.require_extension()


@pytest.mark.parametrize("fp8", [False, True])
def test_prompt_chunks_reach_the_prefill_kernels_with_their_groups_tables(monkeypatch, fp8):
    """A mixed step (one decode, one prompt chunk): FA3 gets the retrieval slot's queries, cache
    views and vLLM's table rows of the chunk; the window kernel gets the streaming slots'
    addresses and the null-gapped table (recorded, not computed). With an fp8 cache every kernel
    gets the layer's scales, and FA3 fp8 views of the cache and the query quantized by q_scale."""
    import vllm.v1.attention.backends.fa_utils as fa_utils

    caches = [torch.randint(0, 255, (POOL, 1, BS, 2 * D), dtype=torch.uint8) if fp8 else
              torch.randn(POOL, 1, BS, 2 * D) for _ in range(2)]
    names, builders, slots = _two_slot_layer(caches)
    impl = _impl(slots, kv_cache_dtype="fp8" if fp8 else "auto")
    layer = SimpleNamespace(_q_scale=torch.tensor(0.5), _k_scale=torch.tensor(0.1), _v_scale=torch.tensor(0.2))
    calls = {}
    monkeypatch.setattr(impl_module.ops, "write_kv", lambda *a, **k: calls.setdefault("write", k))
    monkeypatch.setattr(impl_module.ops, "paged_decode", lambda *a, **k: calls.setdefault("decode", k))
    monkeypatch.setattr(impl_module.ops, "streaming_prefill", lambda *a, **k: calls.setdefault("window", (a, k)))
    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", lambda **k: calls.setdefault("fa", k),
                        raising=False)  # defined only where vllm_flash_attn imports (CUDA)
    monkeypatch.setattr(impl_module.ops, "require_extension", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    qsl = torch.tensor([0, 1, 9], dtype=torch.int32)
    seq_lens = torch.tensor([40, 60], dtype=torch.int32)
    tables = [torch.arange(2 * WIDTH, dtype=torch.int32).view(2, WIDTH) + 1 + 20 * i for i in range(2)]
    metas = {name: b.build(0, CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=2, num_actual_tokens=9,
        max_query_len=8, max_seq_len=60, block_table_tensor=t, slot_mapping=torch.arange(9)))
        for name, b, t in zip(names, builders, tables)}
    monkeypatch.setattr(impl_module, "get_forward_context", lambda: SimpleNamespace(attn_metadata=metas))
    q, out = torch.randn(9, H * G, D), torch.zeros(9, H * G, D)
    k, v = torch.randn(9, H, D), torch.randn(9, H, D)
    impl.forward(layer, q, k, v, None, metas["l0"], output=out)
    fa = calls["fa"]
    if fp8:
        assert fa["q"].dtype == fa["k"].dtype == fa["v"].dtype == torch.float8_e4m3fn
        torch.testing.assert_close(fa["q"].float(), (q[1:9, 0:G] / 0.5).to(torch.float8_e4m3fn).float())
        for x, want in zip("qkv", (0.5, 0.1, 0.2)):  # (sequences of the chunk, KV heads of the slot)
            assert fa[f"{x}_descale"].shape == (1, 1) and fa[f"{x}_descale"].item() == pytest.approx(want)
        scales = (layer._k_scale, layer._v_scale)
        for call in (calls["write"], calls["decode"], calls["window"][1]):
            assert (call["k_scale"], call["v_scale"]) == scales
    else:
        assert fa["q"].data_ptr() == q[1:9, 0:G].data_ptr() and not any("descale" in key for key in fa)
        assert all("k_scale" not in call for call in (calls["write"], calls["decode"], calls["window"][1]))
    assert fa["q"].shape == (8, G, D)
    assert fa["k"].data_ptr() == caches[0].data_ptr() and fa["k"].shape == (POOL, BS, 1, D)
    assert fa["block_table"].data_ptr() == tables[0][1:].data_ptr()
    assert fa["cu_seqlens_q"].tolist() == [0, 8] and fa["seqused_k"].tolist() == [60]
    args, kw = calls["window"]
    assert args[3].tolist() == [caches[1].data_ptr()]  # streaming slot cache
    assert args[4].tolist() == [metas["l0.duo_s0"].block_table.data_ptr()]  # the null-gapped table
    assert kw["block_table_row0"] == 1 and kw["window"] == WIN
    assert calls["decode"]["max_seq_len"] == 60 and calls["decode"]["graph_slots"] is None


def _prefill_stubs(monkeypatch, fa3, window) -> None:
    """CPU stand-ins for a prompt step's GPU ops: ``write_kv`` and ``paged_decode`` do nothing,
    ``streaming_prefill`` is ``window``, FA3's varlen call is ``fa3``."""
    import vllm.v1.attention.backends.fa_utils as fa_utils

    monkeypatch.setattr(impl_module.ops, "write_kv", lambda *a, **k: None)
    monkeypatch.setattr(impl_module.ops, "paged_decode", lambda *a, **k: None)
    monkeypatch.setattr(impl_module.ops, "streaming_prefill", window)
    monkeypatch.setattr(fa_utils, "flash_attn_varlen_func", fa3, raising=False)  # defined only with CUDA
    monkeypatch.setattr(impl_module.ops, "require_extension", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def _causal_varlen(q, k, v, cu, scale):
    """FA3's non-paged varlen causal attention in float32 (GQA: q heads grouped per KV head)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    g = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = k[a:b].repeat_interleave(g, 1).float(), v[a:b].repeat_interleave(g, 1).float()
        s = torch.einsum("thd,shd->hts", q[a:b].float(), kk) * scale
        s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = torch.einsum("hts,shd->thd", s.softmax(-1), vv)
    return out


@pytest.mark.parametrize(("kinds", "runs"), [
    ((RETRIEVAL, STREAMING, RETRIEVAL), [(0, 1), (2, 3)]),
    ((RETRIEVAL, RETRIEVAL, STREAMING), [(0, 2)]),
    ((RETRIEVAL, RETRIEVAL, RETRIEVAL), [(0, 3)]),
    ((STREAMING, STREAMING, STREAMING), []),
], ids=["split", "adjacent", "every", "none"])
@pytest.mark.parametrize("longest", [SINK + WIN + 1, SINK + WIN], ids=["past-window", "within-window"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fresh_prompts_take_one_fa3_call_per_run_of_heads(monkeypatch, kinds, runs, longest, fp8):
    """A step whose prompt chunks all start at position 0 (one decode, prompts of ``short`` and
    ``longest`` tokens, both on one side of sink + prefill window): FA3 varlen calls on views of the step's own Q/K/V and of the output (no
    copies), one per run of adjacent retrieval KV heads, whose rows equal causal attention over each
    prompt, the streaming heads' rows left to the window kernel. When no prompt is longer than
    sink + prefill window, streaming heads see every earlier key too: one call over every head,
    and the window kernel is not launched. With an fp8 cache each call gets e4m3 Q/K/V quantized
    by the layer's scales and their descales, as FLASH_ATTN reads its fp8 cache."""
    from vllm_duo.backend.builder import prefill_parts
    from vllm_duo.backend.metadata import PrefillPart

    whole = longest <= SINK + WIN
    short = 4 if whole else SINK + WIN + 2  # one run also in streaming groups (they split at SINK + WIN)
    Hk, n_tok = 3, 1 + short + longest
    config, specs = _config_and_specs()
    names = ["l0", "l0.duo_s0", "l0.duo_s1"]
    builders = [DuoMetadataBuilder(specs[0 if k == RETRIEVAL else 1], [name], config, torch.device("cpu"))
                for name, k in zip(names, kinds)]
    slots = [SimpleNamespace(name=nm, kind=k, head=h, layer=SimpleNamespace(kv_cache=torch.randn(POOL, 1, BS, 2 * D)))
             for h, (nm, k) in enumerate(zip(names, kinds))]
    impl = _impl(slots, Hk, kv_cache_dtype="fp8" if fp8 else "auto")
    layer = SimpleNamespace(_q_scale=torch.tensor(0.5), _k_scale=torch.tensor(0.1), _v_scale=torch.tensor(0.2))
    calls, window = [], []

    def fa3(**kw):
        calls.append(kw)
        q, k, v = (kw[x].float() * (kw[f"{x}_descale"][0, 0] if fp8 else 1) for x in "qkv")
        return kw["out"].copy_(_causal_varlen(q, k, v, kw["cu_seqlens_q"], kw["softmax_scale"]))

    _prefill_stubs(monkeypatch, fa3, lambda *a, **k: window.append(k))
    qsl = torch.tensor([0, 1, 1 + short, n_tok], dtype=torch.int32)  # one decode, then two prompts
    seq_lens = torch.tensor([40, short, longest], dtype=torch.int32)
    table = torch.arange(3 * WIDTH, dtype=torch.int32).view(3, WIDTH) + 1

    def cm(bound):
        return CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=3, num_actual_tokens=n_tok,
            max_query_len=max(short, longest), max_seq_len=40, block_table_tensor=table, slot_mapping=torch.arange(n_tok),
            seq_lens_cpu_upper_bound=bound)

    top = max(short, longest)
    fresh = PrefillPart(r0=1, r1=3, t0=1, t1=n_tok, fresh=True, max_query_len=top, max_seq_len=top)
    assert prefill_parts(cm(seq_lens), 1) == (fresh,) == prefill_parts(cm(seq_lens), 1, SINK + WIN)
    assert prefill_parts(cm(None), 1) == (PrefillPart(1, 3, 1, n_tok, False, top, 40),)  # no host bound
    assert prefill_parts(cm(torch.tensor([40, short, longest + 3], dtype=torch.int32)), 1) == (  # a cached prefix
        PrefillPart(1, 2, 1, 1 + short, True, short, short),
        PrefillPart(2, 3, 1 + short, n_tok, False, longest, longest + 3))
    assert prefill_parts(cm(seq_lens), 3) == ()  # no prompt chunk at all
    metas = {name: b.build(0, cm(seq_lens)) for name, b in zip(names, builders)}
    assert all(m.prefill_parts == (fresh,) for m in metas.values())
    monkeypatch.setattr(impl_module, "get_forward_context", lambda: SimpleNamespace(attn_metadata=metas))
    q, out = torch.randn(n_tok, Hk * G, D), torch.full((n_tok, Hk * G, D), float("nan"))
    k, v = torch.randn(n_tok, Hk, D), torch.randn(n_tok, Hk, D)
    impl.forward(layer, q, k, v, None, metas["l0"], output=out)
    runs = [(0, Hk)] if whole else runs
    assert len(calls) == len(runs) and len(window) == (0 if whole or STREAMING not in kinds else 1)
    cu = [0, short, short + longest]
    for call, (a, b) in zip(calls, runs):
        assert call.get("block_table") is None and call["cu_seqlens_k"].tolist() == cu  # the step's K/V
        assert call["out"].data_ptr() == out[1:, a * G:b * G].data_ptr()
        for name, t, lo, hi, scale in (("q", q, a * G, b * G, 0.5), ("k", k, a, b, 0.1), ("v", v, a, b, 0.2)):
            if fp8:  # e4m3 copies, as the cache holds K/V; descales (sequences, KV heads of the run)
                want = impl_module.quantize_fp8(t[1:, lo:hi], torch.tensor(scale))
                assert call[name].dtype == torch.float8_e4m3fn and call[name].float().equal(want.float()), name
                assert call[f"{name}_descale"].shape == (2, b - a) and call[f"{name}_descale"][0, 0] == scale
            else:  # views of the step's tensors, no copies
                assert call[name].data_ptr() == t[1:, lo:hi].data_ptr() and call[name].shape == t[1:, lo:hi].shape
                assert f"{name}_descale" not in call
    causal = [h for h in range(Hk) if whole or kinds[h] == RETRIEVAL]
    n = n_tok - 1
    if fp8:  # the values FLASH_ATTN reads: quantized, then descaled
        q, k, v = (impl_module.quantize_fp8(x, torch.tensor(s)).float() * s for x, s in ((q, 0.5), (k, 0.1), (v, 0.2)))
    if causal:
        want = _causal_varlen(q[1:].view(n, Hk, G, D)[:, causal].reshape(n, -1, D), k[1:, causal],
                              v[1:, causal], torch.tensor(cu), D ** -0.5)
        got = out[1:].view(n, Hk, G, D)[:, causal].reshape(n, -1, D)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    streaming = [h for h in range(Hk) if h not in causal]
    assert out[1:].view(n, Hk, G, D)[:, streaming].isnan().all(), "streaming heads' rows belong to the window kernel"


def test_head_runs():
    assert impl_module.head_runs([3, 0, 1, 5, 6, 7]) == [(0, 2), (3, 4), (5, 8)]
    assert impl_module.head_runs([]) == []


def test_profile_run_compiles_the_window_kernel_once(monkeypatch):
    """vLLM's profile run (no metadata) launches the window kernel once on a fresh prompt of
    sink + window + 1 tokens of its own Q/K/V (the serving specialization), over a stand-in slot
    of the configured block size (handed over with the slots: vLLM's config is not current in a
    forward), then returns zeros; later profile runs and layers without
    streaming heads launch nothing."""
    calls = []
    monkeypatch.setattr(impl_module, "_COMPILED", set())
    monkeypatch.setattr(impl_module.ops, "streaming_prefill", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    kinds = (RETRIEVAL, STREAMING)
    slots = [SimpleNamespace(name=f"s{h}", kind=k, head=h, layer=None) for h, k in enumerate(kinds)]
    n_tok, n = 40, SINK + WIN + 1
    q, k, v = torch.randn(n_tok, H * G, D), torch.randn(n_tok, H, D), torch.randn(n_tok, H, D)
    outs = [torch.ones(n_tok, H * G, D) for _ in range(2)]
    for out in outs:
        assert _impl(slots).forward(None, q, k, v, None, None, output=out) is out and not out.any()
    ((args, kw),) = calls
    out = outs[0]
    assert args[0].data_ptr() == q.data_ptr() and args[0].shape[0] == n and kw["max_query_len"] == n
    assert kw["block_size"] == BS and kw["sink_size"] == SINK and kw["window"] == WIN
    assert args[7].tolist() == [0, n] and args[8].tolist() == [n] and kw["out"].data_ptr() == out.data_ptr()
    monkeypatch.setattr(impl_module, "_COMPILED", set())
    retrieval_only = [SimpleNamespace(name="s0", kind=RETRIEVAL, head=h, layer=None) for h in range(H)]
    _impl(retrieval_only).forward(None, q, k, v, None, None, output=torch.ones(n_tok, H * G, D))
    assert len(calls) == 1


def test_profile_run_window_kernel_launch_is_valid_under_the_interpreter():
    """The profile-run launch through the real op (its input checks, and the kernel under
    TRITON_INTERPRET=1 on fp16 CPU tensors, head_dim 64): it runs, and returns zeros."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = """
import torch
from types import SimpleNamespace
from vllm_duo.backend import impl as m
from vllm_duo.options import DuoOptions
from vllm_duo.slot_plan import RETRIEVAL, STREAMING
torch.cuda.is_current_stream_capturing = lambda: False
impl = m.DuoAttentionImpl(num_heads=4, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=None,
                          sliding_window=None, kv_cache_dtype="auto")
impl.set_slots([SimpleNamespace(name="a", kind=RETRIEVAL, head=0, layer=None),
                SimpleNamespace(name="b", kind=STREAMING, head=1, layer=None)], DuoOptions(sink_size=4, recent_size=16, prefill_recent_size=16), 16)
qkv = torch.randn(64, 8, 64, dtype=torch.float16)
out = torch.ones(64, 4, 64, dtype=torch.float16)
impl.forward(None, qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], None, None, output=out)
assert not out.any() and len(m._COMPILED) == 1
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _step_metas(names, builders, tables, qsl, seq_lens, max_seq_len: int) -> dict:
    """Each slot group's metadata for one step with rows at ``qsl`` and lengths ``seq_lens``, the
    lengths also given as vLLM's host bound (as on a step without a cached prefix)."""
    n_tok = int(qsl[-1])
    common = dict(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=seq_lens.numel(),
                  num_actual_tokens=n_tok, max_query_len=int((qsl[1:] - qsl[:-1]).max()),
                  max_seq_len=max_seq_len, slot_mapping=torch.arange(n_tok), seq_lens_cpu_upper_bound=seq_lens)
    return {name: b.build(0, CommonAttentionMetadata(block_table_tensor=t, **common))
            for name, b, t in zip(names, builders, tables)}


def test_mixed_step_sends_fresh_and_continuing_chunks_to_their_own_paths(monkeypatch):
    """One decode, a continuing chunk, two fresh prompts (no longer than sink + prefill window),
    another continuing chunk: the fresh prompts take one FA3 call over every head on the step's
    own K/V (their rows equal causal attention), and each continuing chunk its own per-slot FA3
    call and window-kernel launch with its rows of the query offsets, lengths and tables. Before
    the split, one continuing chunk sent every chunk of the step down the per-slot path."""
    caches = [torch.randn(POOL, 1, BS, 2 * D) for _ in range(2)]
    names, builders, slots = _two_slot_layer(caches)
    impl = _impl(slots)
    fa, window = [], []

    def fa3(**kw):
        fa.append(kw)
        if kw.get("block_table") is None:  # fresh: causal over the call's own K/V
            kw["out"].copy_(_causal_varlen(kw["q"], kw["k"], kw["v"], kw["cu_seqlens_q"], kw["softmax_scale"]))

    _prefill_stubs(monkeypatch, fa3, lambda *a, **k: window.append((a, k)))
    # rows: decode | continuing 3 tokens at 20.. | fresh 5 | fresh SINK + WIN | continuing 2 at 30..
    lens = [1, 3, 5, SINK + WIN, 2]
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([40, 23, 5, SINK + WIN, 32], dtype=torch.int32)
    n_tok = int(qsl[-1])
    tables = [torch.arange(5 * WIDTH, dtype=torch.int32).view(5, WIDTH) + 1 + 20 * i for i in range(2)]
    metas = _step_metas(names, builders, tables, qsl, seq_lens, max_seq_len=40)
    parts = metas["l0"].prefill_parts
    assert [(p.r0, p.r1, p.fresh) for p in parts] == [(1, 2, False), (2, 4, True), (4, 5, False)]
    monkeypatch.setattr(impl_module, "get_forward_context", lambda: SimpleNamespace(attn_metadata=metas))
    q, out = torch.randn(n_tok, H * G, D), torch.full((n_tok, H * G, D), float("nan"))
    k, v = torch.randn(n_tok, H, D), torch.randn(n_tok, H, D)
    impl.forward(None, q, k, v, None, metas["l0"], output=out)

    fresh = [c for c in fa if c.get("block_table") is None]
    paged = [c for c in fa if c.get("block_table") is not None]
    assert len(fresh) == 1 and len(paged) == 2 and len(window) == 2
    a, b = int(qsl[2]), int(qsl[4])  # the fresh prompts' tokens
    assert fresh[0]["q"].data_ptr() == q[a:b].data_ptr() and fresh[0]["cu_seqlens_q"].tolist() == [0, 5, 5 + SINK + WIN]
    want = _causal_varlen(q[a:b], k[a:b], v[a:b], torch.tensor([0, 5, 5 + SINK + WIN]), D ** -0.5)
    torch.testing.assert_close(out[a:b], want.to(out.dtype), atol=1e-5, rtol=1e-5)
    for call, part in zip(paged, (parts[0], parts[2])):  # the retrieval slot over each continuing chunk
        assert call["block_table"].data_ptr() == tables[0][part.r0].data_ptr()
        assert call["block_table"].shape[0] == part.r1 - part.r0
        assert call["q"].shape[0] == part.t1 - part.t0 and call["out"].data_ptr() == out[part.t0:part.t1, 0:G].data_ptr()
        assert call["cu_seqlens_q"].tolist() == [0, part.t1 - part.t0]
        assert call["seqused_k"].tolist() == seq_lens[part.r0:part.r1].tolist()
    for (args, kw), part in zip(window, (parts[0], parts[2])):  # the streaming slots over each continuing chunk
        assert args[0].data_ptr() == q[part.t0:part.t1].data_ptr() and kw["out"].data_ptr() == out[part.t0:part.t1].data_ptr()
        assert args[7].tolist() == qsl[part.r0:part.r1 + 1].tolist() and args[8].tolist() == seq_lens[part.r0:part.r1].tolist()
        assert kw["block_table_row0"] == part.r0 and kw["max_query_len"] == part.max_query_len


def test_prefill_part_path_and_runs() -> None:
    """The path rule the impl acts on and benchmarks/prefill_paths.py counts: parts whose chunks
    all end within sink + prefill window are causal attention (fresh: one call over every head;
    continuing: FA3 over every slot's cache), longer fresh ones take the split path, longer
    continuing ones the slot caches and the streaming path; runs split a step's chunks where
    freshness changes."""
    from vllm_duo.backend.metadata import CAUSAL_SLOTS, FRESH, PER_SLOT, WHOLE, PrefillPart, runs

    def part(fresh: bool, end: int) -> PrefillPart:
        return PrefillPart(r0=0, r1=1, t0=0, t1=1, fresh=fresh, max_query_len=end if fresh else 1, max_seq_len=end)

    assert part(True, SINK + WIN).path(SINK, WIN) == WHOLE
    assert part(True, SINK + WIN + 1).path(SINK, WIN) == FRESH
    assert part(False, SINK + WIN).path(SINK, WIN) == CAUSAL_SLOTS
    assert part(False, SINK + WIN + 1).path(SINK, WIN) == PER_SLOT
    assert runs([]) == [] and runs([False]) == [(0, 1)]
    assert runs([True, True, False, True]) == [(0, 2), (2, 3), (3, 4)]


def _paged_causal(q, k_cache, v_cache, table, cu, seq_lens, scale):
    """float32 FA3 paged varlen, causal, one KV head (caches [blocks, BS, 1, D]): rows of request
    i at positions ending at seq_lens[i] - 1 attend keys p <= t through its block-table row."""
    out = torch.empty_like(q, dtype=torch.float32)
    for i in range(seq_lens.numel()):
        a, b, L = int(cu[i]), int(cu[i + 1]), int(seq_lens[i])
        pos = torch.arange(L)
        rows = table[i, pos // BS].long() * BS + pos % BS
        k, v = (c.reshape(-1, D)[rows].float() for c in (k_cache, v_cache))
        t = torch.arange(L - (b - a), L)
        s = torch.einsum("rhd,pd->rhp", q[a:b].float(), k) * scale
        s = s.masked_fill(pos[None, None, :] > t[:, None, None], float("-inf"))
        out[a:b] = torch.softmax(s, dim=-1) @ v
    return out


def test_continuing_chunks_within_sink_and_window_take_fa3_in_every_slot(monkeypatch):
    """Continuing chunks that all end within sink + prefill window: a streaming query there sees
    every key p <= t, and the block manager nulls no block of that range, so every slot (the
    streaming one too) takes one FA3 paged causal call over its own cache and table, and the
    window kernel is not launched; the rows equal causal attention over each cache. With the
    second chunk one token past sink + window (the control), the streaming group's runs split
    there: that chunk alone goes back to the window kernel."""
    caches = [torch.randn(POOL, 1, BS, 2 * D) for _ in range(2)]
    names, builders, slots = _two_slot_layer(caches)
    impl = _impl(slots)
    fa, window = [], []

    def fa3(**kw):
        fa.append(kw)
        kw["out"].copy_(_paged_causal(kw["q"], kw["k"], kw["v"], kw["block_table"], kw["cu_seqlens_q"],
                                      kw["seqused_k"], kw["softmax_scale"]))

    _prefill_stubs(monkeypatch, fa3, lambda *a, **k: window.append(k))
    monkeypatch.setattr(impl_module, "get_forward_context", lambda: SimpleNamespace(attn_metadata=metas))
    tables = [torch.randperm(POOL)[:3 * WIDTH].to(torch.int32).view(3, WIDTH) for _ in range(2)]
    for extra, causal in ((0, True), (1, False)):
        fa.clear(), window.clear()
        # a decode, then continuing chunks of 3 and 5 ending at SINK + WIN - 2 and SINK + WIN (+ extra)
        seq_lens = torch.tensor([20, SINK + WIN - 2, SINK + WIN + extra], dtype=torch.int32)
        qsl = torch.tensor([0, 1, 4, 9], dtype=torch.int32)
        metas = _step_metas(names, builders, tables, qsl, seq_lens, max_seq_len=20)
        (part,) = metas["l0"].prefill_parts
        assert (part.r0, part.r1, part.fresh, part.max_seq_len) == (1, 3, False, SINK + WIN + extra)
        q, out = torch.randn(9, H * G, D), torch.full((9, H * G, D), float("nan"))
        impl.forward(None, q, torch.randn(9, H, D), torch.randn(9, H, D), None, metas["l0"], output=out)
        if not causal:  # the streaming group's runs split at SINK + WIN: the first chunk stays causal
            from vllm_duo.backend.metadata import CAUSAL_SLOTS, PER_SLOT

            assert [p.path(SINK, WIN) for p in metas[names[1]].prefill_parts] == [CAUSAL_SLOTS, PER_SLOT]
            assert len(fa) == 3 and len(window) == 1 and window[0]["block_table_row0"] == 2
            continue
        assert len(fa) == 2 and not window
        for call, h in zip(fa, (0, 1)):  # slot order: retrieval (KV head 0), streaming (KV head 1)
            # the slot's group's table; the streaming group's null-gapped copy has no gap here
            assert call["block_table"].data_ptr() == metas[names[h]].block_table[1].data_ptr() and call["causal"]
            assert call["block_table"].tolist() == tables[h][1:].tolist()
            assert call["out"].data_ptr() == out[1:, h * G:(h + 1) * G].data_ptr()
            k_cache, v_cache = caches[h][..., :D].transpose(1, 2), caches[h][..., D:].transpose(1, 2)
            want = _paged_causal(q[1:, h * G:(h + 1) * G], k_cache, v_cache, tables[h][1:], torch.tensor([0, 3, 8]),
                                 seq_lens[1:], D ** -0.5)
            torch.testing.assert_close(out[1:, h * G:(h + 1) * G], want, atol=1e-5, rtol=1e-5)
