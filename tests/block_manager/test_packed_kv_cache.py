"""vLLM 0.33 allocates the whole KV cache as one packed buffer and hands each layer a view;
duo's kernels address every slot cache by its data pointer and a fixed block stride.

Here vLLM's own allocator (``allocate_kv_cache``, on CPU) builds the views for duo's slot
layers with the layout vLLM resolves for the duo backend, and duo's per-layer pointer tables
(``StepTables.layer_tensors``) accept them: contiguous ``[num_blocks, 1, block_size, 2 * head_size]`` views,
one region per slot. A block-outer layout is the control: the same check refuses it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.block_manager.conftest import BLOCK, HEAD_DIM, duo_specs, kv_cache_config, make_vllm_config, random_mask
from vllm_duo import compat
from vllm_duo.backend.step_tables import StepTables
from vllm_duo.slot_plan import RETRIEVAL, STREAMING

pytestmark = pytest.mark.skipif(not compat.V033, reason="the packed KV-cache allocation is vLLM 0.33's")

NUM_BLOCKS = 400


def slot_views(model_config, layout: str | None = None) -> tuple[dict[str, torch.Tensor], object]:
    """Every slot's cache view, planned and allocated by vLLM; ``layout`` None = what vLLM
    resolves for the duo backend."""
    from vllm.v1.worker.utils import allocate_kv_cache

    config = make_vllm_config(model_config, max_model_len=4096, max_num_batched_tokens=512)
    config.cache_config.kv_cache_layout = layout
    cfg = kv_cache_config(config, duo_specs(random_mask(0)), num_blocks=NUM_BLOCKS)
    resolved = config.cache_config.get_resolved_kv_cache_layout()
    return allocate_kv_cache(cfg, torch.device("cpu"), resolved, [BLOCK] * len(cfg.kv_cache_groups)), cfg


def check_layer(caches: dict[str, torch.Tensor], cfg, layer: int):
    """``layer_tensors`` on one decoder layer's slots, as the impl builds it on its first step."""
    names = sorted(n for n in caches if n.startswith(f"model.layers.{layer}.self_attn.attn"))
    tables = StepTables(max_tokens=16, device="cpu")
    rows = {n: tables.add_group(g.layer_names) for g in cfg.kv_cache_groups for n in g.layer_names}
    for row in set(rows.values()):
        tables.set_block_table(row, torch.zeros(1, 1, dtype=torch.int32))
    slots = [SimpleNamespace(name=n, layer=SimpleNamespace(kv_cache=caches[n]), head=i,
                             kind=RETRIEVAL if ".duo_s" not in n else STREAMING)
             for i, n in enumerate(names)]
    return tables.layer_tensors(slots, [rows[n] for n in names])


def test_duo_slot_views_fit_the_pointer_tables(model_config) -> None:
    caches, cfg = slot_views(model_config)
    row = 2 * HEAD_DIM
    for name, c in caches.items():
        assert tuple(c.shape) == (NUM_BLOCKS, 1, BLOCK, row) and c.stride() == (BLOCK * row, row, row, 1), name
    for layer in range(32):
        tables = check_layer(caches, cfg, layer)
        # One region per slot within a group (the two groups overlay one buffer, as the hybrid
        # allocator does; their block ids come from one pool, so they never share a block).
        for group in set(tables.slot_group.tolist()):
            ptrs = tables.kv_ptrs[tables.slot_group == group].tolist()
            assert len(set(ptrs)) == len(ptrs)
    # Block b of a slot is where the kernels look: data_ptr + b * block_size * row elements.
    c = next(iter(caches.values()))
    c[7, 0, 3, 5] = 1.5
    flat = torch.empty(0, dtype=c.dtype).set_(c.untyped_storage(), c.storage_offset(), (NUM_BLOCKS * BLOCK * row,))
    assert flat[7 * BLOCK * row + 3 * row + 5].item() == 1.5


def test_block_outer_layout_is_refused(model_config) -> None:
    caches, cfg = slot_views(model_config, "BLNHC")
    with pytest.raises(RuntimeError, match="expected contiguous"):
        check_layer(caches, cfg, 0)
