"""vllm_duo.compat on the installed vLLM: each entry reaches the real internal of that series.

Run under both supported series (CI runs the suite in a 0.26 and a 0.33 venv); each test
fails on a series whose internal moved or changed without an entry here.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import vllm

from tests.conftest import CPU_PLATFORM_SNIPPET
from vllm_duo import compat


@pytest.mark.parametrize(("version", "series"), [
    ("0.26.0", "0.26"), ("0.26.3", "0.26"), ("0.33.0", "0.33"), ("0.33.1rc1", "0.33"),
    ("0.27.0", None), ("0.34.0", None), ("0.3.3", None), ("0.260.0", None), ("0.330.0", None),
])
def test_series_of(version: str, series: str | None) -> None:
    assert compat.series_of(version) == series


def test_installed_vllm_is_a_supported_series() -> None:
    assert compat.SERIES == compat.series_of(vllm.__version__)


def test_make_arg_parser_is_the_serve_parser() -> None:
    code = CPU_PLATFORM_SNIPPET + (
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm_duo.compat import make_arg_parser\n"
        "print(make_arg_parser(FlexibleArgumentParser()).parse_args(['--max-model-len', '77']).max_model_len)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "77"


def test_backend_block_sizes_with_and_without_a_spec() -> None:
    """0.26 asks without a spec; 0.33's worker passes the layer's spec."""
    from vllm.v1.attention.backend import MultipleOf

    from vllm_duo.backend.backend import DuoAttentionBackend

    for args in ((), (object(),)):
        (size,) = DuoAttentionBackend.get_supported_kernel_block_sizes(*args)
        assert isinstance(size, MultipleOf) and size.base == 16


def test_soak_preemption_counter_passes_every_argument() -> None:
    """0.33's ``Scheduler._preempt_request`` takes ``drop_stale_output`` as well."""
    from vllm_duo.eval.admission import count_preemptions

    calls = []
    sched = SimpleNamespace(_preempt_request=lambda request, timestamp, drop_stale_output=False:
                            calls.append((request, timestamp, drop_stale_output)))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(
        engine_core=SimpleNamespace(scheduler=sched))))
    counter = count_preemptions(llm)
    sched._preempt_request("r", 1.0)
    sched._preempt_request("r", 2.0, drop_stale_output=True)
    assert counter == [2] and calls == [("r", 1.0, False), ("r", 2.0, True)]
