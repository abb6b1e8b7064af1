"""vLLM 0.33's V2 model runner must never null a streaming slot's sink blocks.

Per step, ``BlockTables.gather_block_tables`` replaces the block-table entries of a
sliding-window group that lie wholly below (first scheduled position - ``num_retained_tokens``)
with the null block; ``GPUModelRunner.initialize_kv_cache`` reads that reach from each group's
``SlidingWindowSpec``. ``DuoStreamingSpec`` derives from it, and every streaming query reads
the sink blocks, so their reach must be 0. Here vLLM's own Triton kernel runs on CPU tensors
(Triton's interpreter) on the groups vLLM builds for duo slots; a plain sliding-window group
of the same window is the control that shows the kernel does null when asked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import SlidingWindowSpec, UniformTypeKVCacheSpecs

from tests.block_manager.conftest import (
    BLOCK,
    DTYPE,
    HEAD_DIM,
    RECENT,
    SINK,
    duo_specs,
    kv_cache_config,
    make_vllm_config,
    random_mask,
)
from vllm_duo import compat
from vllm_duo.block_manager import DuoStreamingSpec

pytestmark = pytest.mark.skipif(not compat.V033, reason="the V2 runner's sliding-window nulling is vLLM 0.33's")

# Runs vLLM's kernel in a fresh process: the interpreter must be on before Triton is imported,
# and an empty CUDA_VISIBLE_DEVICES keeps vLLM from swapping Triton for its no-GPU placeholder.
KERNEL_RUN = """
import json, sys, torch
from vllm.v1.worker.gpu.block_table import _gather_block_tables_kernel
a = json.loads(sys.argv[1])
rows = [torch.tensor(r, dtype=torch.int32)[None] for r in a["rows"]]
out = [torch.full_like(r, -1) for r in rows]
ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.uint64)
i32 = lambda x: torch.tensor(x, dtype=torch.int32)
num_blocks = i32([[len(r)] for r in a["rows"]])
_gather_block_tables_kernel[(len(rows), 1)](
    i32([0]), ptrs(rows), ptrs(out), torch.tensor([r.shape[1] for r in rows]), num_blocks,
    num_blocks.stride(0), 1, i32([a["first_pos"]]), i32(a["reach"]), i32(a["block_sizes"]),
    MASK_SLIDING_WINDOW=True, BLOCK_SIZE=1024)
print(json.dumps([o[0].tolist() for o in out]))
"""


def layer_spec(group_spec):
    return group_spec.first_spec if isinstance(group_spec, UniformTypeKVCacheSpecs) else group_spec


def runner_reach(group_spec) -> int:
    """``GPUModelRunner.initialize_kv_cache``'s ``sliding_window_reach`` of one group."""
    spec = layer_spec(group_spec)
    return spec.num_retained_tokens if isinstance(spec, SlidingWindowSpec) else 0


def gather(rows: list[list[int]], reach: list[int], first_pos: int) -> list[list[int]]:
    """The forward-pass block-table rows vLLM's gather kernel writes for one request."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    arg = json.dumps({"rows": rows, "reach": reach, "first_pos": first_pos,
                      "block_sizes": [BLOCK] * len(rows)})
    out = subprocess.run([sys.executable, "-c", KERNEL_RUN, arg], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runner_takes_the_reach_from_num_retained_tokens():
    """The hook this relies on: the runner reads the reach from the spec, nowhere else."""
    path = importlib.util.find_spec("vllm.v1.worker.gpu.model_runner").origin
    source = open(path).read()
    assert "layer_spec.num_retained_tokens" in source and "sliding_window_reach=sliding_window_reach" in source


def test_streaming_groups_keep_sink_blocks_in_the_forward_block_table(model_config):
    config = make_vllm_config(model_config, max_model_len=4096, max_num_batched_tokens=512)
    cfg = kv_cache_config(config, duo_specs(random_mask(0)), num_blocks=4096)
    group_specs = [g.kv_cache_spec for g in cfg.kv_cache_groups]
    streaming = [isinstance(layer_spec(s), DuoStreamingSpec) for s in group_specs]
    assert any(streaming) and not all(streaming)

    first_pos = 1500  # decoding far past sink + window: every middle block is out of the window
    num_sink_blocks = cdiv(SINK, BLOCK)
    row = list(range(1, cdiv(first_pos + 1, BLOCK) + 1))
    control = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=1, head_size=HEAD_DIM, dtype=DTYPE,
                                sliding_window=RECENT)
    reach = [runner_reach(s) for s in group_specs] + [runner_reach(control)]
    out = gather([row] * len(reach), reach, first_pos)

    for spec, got in zip(group_specs, out, strict=False):
        assert got == row, (spec, got[:num_sink_blocks + 2])  # nothing nulled, sink blocks included
    # Control: the same kernel nulls a plain sliding-window group's sink-position blocks, and
    # would null duo's with the parent's reach (W - 1).
    assert out[-1][:num_sink_blocks] == [0] * num_sink_blocks
    assert out[-1][-1] == row[-1]
    duo = next(layer_spec(s) for s, st in zip(group_specs, streaming, strict=True) if st)
    parent_reach = SlidingWindowSpec.num_retained_tokens.fget(duo)
    assert parent_reach == RECENT - 1 == runner_reach(control)
