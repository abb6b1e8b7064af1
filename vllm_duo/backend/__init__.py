"""The duo attention backend: backend, metadata, builder and impl, one file each (as vLLM's flash_attn)."""
