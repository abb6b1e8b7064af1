"""Result bookkeeping for the benchmark scripts: a re-export of :mod:`vllm_duo.eval.results`."""

from vllm_duo.eval.results import RESULTS, beside, command_line, device_name, save_result  # noqa: F401
