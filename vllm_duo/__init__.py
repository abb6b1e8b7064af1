"""vllm-duo: DuoAttention (retrieval + streaming heads) as a vLLM attention backend."""

__version__ = "0.1.0"
