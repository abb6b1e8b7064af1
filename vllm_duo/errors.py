"""The one exception type vllm-duo raises for bad user input.

It subclasses ValueError so vLLM's own config validation paths report it like
their own errors; every message names the problem and the fix.
"""


class DuoConfigError(ValueError):
    """Bad DuoAttention options, pattern file or model/parallel combination."""
