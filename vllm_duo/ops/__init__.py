"""vllm-duo's CUDA ops, as plain-tensor functions (no vLLM types), each with its fake impl.

Importing works without the compiled extension; calling an op then raises a RuntimeError that
says how to build it. ``extension_available()`` tells which case this is.
"""

from vllm_duo.ops._ext import available as extension_available
from vllm_duo.ops.decode import paged_decode, plan_partitions
from vllm_duo.ops.slots import DecodeSlots, decode_slots
from vllm_duo.ops.write import write_kv

__all__ = ["DecodeSlots", "decode_slots", "extension_available", "paged_decode", "plan_partitions",
           "write_kv"]
