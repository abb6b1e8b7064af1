"""vllm-duo's kernels (csrc CUDA ops, one Triton kernel) as plain-tensor functions with fake impls.

No vLLM types. Importing works without the compiled extension; calling a CUDA op then raises a RuntimeError that
says how to build it. ``extension_available()`` tells which case this is.
"""

from vllm_duo.ops._ext import available as extension_available
from vllm_duo.ops._ext import require as require_extension
from vllm_duo.ops.decode import paged_decode, plan_graph_partitions, plan_partitions
from vllm_duo.ops.prefill import streaming_prefill
from vllm_duo.ops.slots import DecodeSlots, decode_slots
from vllm_duo.ops.write import write_kv

__all__ = ["DecodeSlots", "decode_slots", "extension_available", "paged_decode",
           "plan_graph_partitions", "plan_partitions", "require_extension", "streaming_prefill",
           "write_kv"]
