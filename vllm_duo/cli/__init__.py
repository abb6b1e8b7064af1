"""The ``vllm-duo`` command line."""
