"""Evaluations run through vLLM: needle-in-a-haystack accuracy and end-to-end throughput.

The CLI (``vllm-duo niah`` / ``vllm-duo bench``) starts each engine in its own process
(:mod:`vllm_duo.eval.engine_proc`); vLLM is imported only there.
"""
