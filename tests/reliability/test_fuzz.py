"""Fuzz: malformed duo options and pattern files are refused with DuoConfigError, nothing else.

Every generated case goes through each real entry point: ``parse_options`` + ``resolve_options``,
the front process's ``resolve_duo_config``, the worker's ``options_from_vllm_config`` and the
whole ``EngineArgs(...).create_engine_config()`` that ``LLM``/``vllm serve`` run before any
GPU work. The message must be short, name what is wrong (the option, the file or both
shapes) and not be raised while handling another exception; a hang fails via an alarm.

``VLLM_DUO_FUZZ_EXAMPLES`` sets the examples per test (default 150); ``CASES`` counts the
cases run (``benchmarks/fuzz_count.py`` records it). Nothing is written into the repository
(no hypothesis database; its caches go to the temp folder).
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.reliability.front import create_engine_config, load_plugins
from tests.reliability.sim import write_model_dir
from vllm_duo.engine_config import options_from_vllm_config, resolve_duo_config
from vllm_duo.errors import DuoConfigError
from vllm_duo.options import parse_options, resolve_options
from vllm_duo.patterns import MAX_FILE_BYTES, PATTERN_FILE, load_gates

LAYERS, KV_HEADS = 32, 8  # the model every case is resolved against (Llama-3-8B shape)
FIELDS = ("pattern", "sparsity", "threshold", "sink_size", "recent_size", "prefill_recent_size",
          "seed", "streaming_prefill", "retrieval_mask")
CASES: Counter[str] = Counter()
SETTINGS = settings(max_examples=int(os.environ.get("VLLM_DUO_FUZZ_EXAMPLES", "150")),
                    deadline=timedelta(seconds=5), database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HANG_S = 20  # one case through all entry points takes milliseconds
# Hypothesis caches (unicode tables, constants) even without a database: keep them out of the repo.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "vllm-duo-hypothesis"))


class Front:
    """A Llama-3-8B-shaped model folder and a real VllmConfig to swap duo options into."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.config = create_engine_config(model, {"pattern": "full"})

    def __repr__(self) -> str:  # hypothesis prints fixtures with a failing example
        return f"Front({self.model!r})"


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Front:
    load_plugins()
    return Front(write_model_dir(str(tmp_path_factory.mktemp("model"))))


@contextmanager
def no_hang(seconds: int = HANG_S) -> Iterator[None]:
    """Hypothesis' deadline only measures finished calls; an alarm also ends a blocked one."""
    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_refused(call: Callable[[], Any], hints: tuple[str, ...]) -> str:
    """``call`` raises DuoConfigError (any other exception propagates and fails the test)
    with a clear message: short, naming one of ``hints``, not chained to another error."""
    with no_hang():
        try:
            call()
        except DuoConfigError as e:
            msg = str(e)
            assert 0 < len(msg) <= 500, f"message of {len(msg)} chars: {msg[:200]}..."
            assert any(h in msg for h in hints), f"message names none of {hints}: {msg}"
            assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), \
                f"raised while handling {e.__context__!r}"
            assert not torch.cuda.is_initialized()
            return msg
    pytest.fail(f"accepted; expected a DuoConfigError naming one of {hints}")


def refused_everywhere(front: Front, raw: Any, hints: tuple[str, ...]) -> None:
    model, config = front.model, front.config

    def set_raw() -> Any:
        config.additional_config = {"duo_attention": raw}
        return config

    assert_refused(lambda: resolve_options(parse_options(raw), LAYERS, KV_HEADS, model="the model"), hints)
    assert_refused(lambda: resolve_duo_config(set_raw()), hints)
    assert_refused(lambda: options_from_vllm_config(set_raw()), hints)
    assert_refused(lambda: create_engine_config(model, raw), hints)


# ----------------------------------------------------------------------------- option dicts

NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
HUGE_INTS = st.sampled_from([2**63, 10**30, 10**400, 10**5000, -(10**5000)])  # 10**5000: past str()'s limit
WRONG_TYPE = st.one_of(
    st.text(max_size=12), st.binary(max_size=8), st.booleans(),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.tuples(st.integers()), st.frozensets(st.integers(), max_size=2), st.just(object()),
)
FRACTION_BAD = st.one_of(
    WRONG_TYPE, NON_FINITE, HUGE_INTS,
    st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
    st.floats(max_value=0.0, exclude_max=True, allow_infinity=False),
    st.integers(min_value=2), st.integers(max_value=-1))
SIZE_BAD = st.one_of(  # no None: it means "default" for prefill_recent_size
    WRONG_TYPE, NON_FINITE, HUGE_INTS,
    st.integers(max_value=-1), st.integers(min_value=(1 << 24) + 1),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()))
SEED_BAD = st.one_of(WRONG_TYPE, NON_FINITE, HUGE_INTS, st.none(), st.floats(allow_nan=False),
                     st.integers(max_value=-1), st.integers(min_value=2**32))
PATTERN_BAD = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.binary(max_size=8), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    st.text(alphabet=" \t\n\r", max_size=4),  # empty or blank
    st.sampled_from(["FULL", " full", "Streaming", "~/no/such/duo/pattern", "\x00", "/" + "x" * 5000]),
    st.text(min_size=1, max_size=40).map(lambda t: os.path.join("/nonexistent-duo", t)),
)
MASK_ENTRY_BAD = st.one_of(st.sampled_from([2, -1, 0.5, 1.0, 0.0, "1", None, math.nan, [1], b"\x01"]),
                           st.integers().filter(lambda v: v not in (0, 1)), st.text(max_size=2))


@st.composite
def mask_bad(draw: st.DrawFn) -> tuple[Any, bool]:
    """(a malformed retrieval_mask, whether it is well formed but for another model)."""
    kind = draw(st.sampled_from(["type", "empty", "ragged", "entry", "shape", "deep"]))
    if kind == "type":
        return draw(st.one_of(st.text(max_size=8), st.integers(), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                  max_size=2), NON_FINITE)), False
    if kind == "empty":
        return draw(st.sampled_from([[], [[]], [[]] * LAYERS, [1] * KV_HEADS])), False
    if kind == "deep":
        return [[[1] * 2] * KV_HEADS] * LAYERS, False
    rows = [[draw(st.integers(0, 1)) for _ in range(KV_HEADS)] for _ in range(LAYERS)]
    if kind == "ragged":
        rows[draw(st.integers(0, LAYERS - 1))] = [1] * draw(st.integers(0, KV_HEADS - 1))
    elif kind == "entry":
        rows[draw(st.integers(0, LAYERS - 1))][draw(st.integers(0, KV_HEADS - 1))] = draw(MASK_ENTRY_BAD)
    else:
        layers, heads = draw(st.tuples(st.integers(1, 40), st.integers(1, 12)).filter(lambda s: s != (LAYERS, KV_HEADS)))
        return [[draw(st.integers(0, 1))] * heads for _ in range(layers)], True
    return rows, False


@st.composite
def valid_base(draw: st.DrawFn) -> dict[str, Any]:
    raw: dict[str, Any] = {"pattern": draw(st.sampled_from(["full", "streaming"]))}
    if draw(st.booleans()):
        raw[draw(st.sampled_from(["sparsity", "threshold"]))] = draw(st.floats(0, 1))
    if draw(st.booleans()):
        raw["sink_size"] = draw(st.integers(0, 4096))
    if draw(st.booleans()):
        raw["recent_size"] = draw(st.integers(1, 4096))
    if draw(st.booleans()):
        raw["seed"] = draw(st.integers(0, 2**32 - 1))
    return raw


@st.composite
def bad_options(draw: st.DrawFn) -> tuple[Any, tuple[str, ...]]:
    """A malformed ``duo_attention`` value and the words its refusal must contain (any one)."""
    if draw(st.integers(0, 9)) == 0:  # not a dict at all, or no pattern
        raw = draw(st.one_of(st.none(), st.text(max_size=10), st.integers(), st.lists(st.integers(), max_size=2),
                             st.just({}), st.just({"sparsity": 0.5}), st.just({"pattern": None})))
        return raw, ("JSON object", "head pattern")
    raw = draw(valid_base())
    hints: list[str] = []
    for what in draw(st.lists(st.sampled_from(
            ["sparsity", "threshold", "sink_size", "recent_size", "prefill_recent_size", "prefill_lt_recent",
             "seed", "streaming_prefill", "pattern", "retrieval_mask", "both", "unknown"]),
            min_size=1, max_size=3)):
        if what in ("sparsity", "threshold"):
            raw[what] = draw(FRACTION_BAD)
        elif what in ("sink_size", "recent_size", "prefill_recent_size"):
            extra = {"sink_size": st.none(), "recent_size": st.sampled_from([None, 0])}.get(what, st.nothing())
            raw[what] = draw(st.one_of(SIZE_BAD, extra))
        elif what == "prefill_lt_recent":
            raw["recent_size"] = draw(st.integers(2, 4096))
            raw["prefill_recent_size"] = draw(st.integers(1, raw["recent_size"] - 1))
            what = "prefill_recent_size"
        elif what == "seed":
            raw[what] = draw(SEED_BAD)
        elif what == "streaming_prefill":
            raw[what] = draw(st.one_of(st.text(max_size=10).filter(lambda k: k not in ("rswa", "window")),
                                       st.none(), st.integers(), st.lists(st.just("window"), max_size=1)))
        elif what == "pattern":
            raw[what] = draw(PATTERN_BAD)
            hints += ["pattern", "does not exist"]
        elif what == "retrieval_mask":
            raw[what], for_other_model = draw(mask_bad())
            if for_other_model:  # only refused once resolved without a pattern
                raw.pop("pattern", None)
                hints += [f"({LAYERS}, {KV_HEADS})"]
        elif what == "both":
            raw["sparsity"], raw["threshold"] = draw(st.floats(0, 1)), draw(st.floats(0, 1))
            hints += ["not both"]
        else:
            key = draw(st.one_of(st.text(min_size=1, max_size=30).filter(lambda k: k not in FIELDS),
                                 st.integers(), st.just(10**5000)))
            raw[key] = draw(st.integers())
            what = "unknown duo_attention option"
        hints.append(what)
    return raw, tuple(hints)


@SETTINGS
@given(case=bad_options())
def test_malformed_options_refused(front: Front, case: tuple[Any, tuple[str, ...]]) -> None:
    CASES["options"] += 1
    raw, hints = case
    refused_everywhere(front, raw, hints)


# ----------------------------------------------------------------------------- pattern files

def _valid_table(rng: np.random.Generator, layers: int = LAYERS, heads: int = KV_HEADS, sep: str = "\t") -> str:
    return "".join(sep.join(f"{v:.6f}" for v in row) + "\n" for row in rng.uniform(0, 1, (layers, heads)))


@dataclass(frozen=True)
class FileCase:
    """How to lay out one malformed pattern on disk (made fresh in a temp folder per case)."""

    kind: str
    tsv: bytes | None = None  # content of full_attention_heads.tsv, if any
    config: bytes | None = None  # content of config.json, if any
    point_at_file: bool = False  # pattern = the TSV itself rather than its folder
    loader_refuses: bool = True  # malformed whatever the model (else: only its shape is wrong)
    options: tuple[tuple[str, Any], ...] = ()


@st.composite
def bad_files(draw: st.DrawFn) -> FileCase:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    table = _valid_table(rng)
    kind = draw(st.sampled_from([
        "empty", "blank", "truncated", "nan", "delimiter", "latin1", "utf16", "binary", "text", "shape",
        "no_columns", "huge", "config_json", "config_deep", "config_type", "config_binary",
        "no_tsv", "tsv_is_dir", "missing", "fifo", "dev_null", "symlink_loop"]))
    tsv: bytes | None = table.encode()
    config, loader_refuses = None, True
    if kind == "empty":
        tsv = b""
    elif kind == "blank":
        tsv = draw(st.text(alphabet=" \t\r\n\x0b\x0c", min_size=1, max_size=20)).encode()
    elif kind == "truncated":  # cut before the last gate: ragged, or whole rows but too few layers
        tsv = table.encode()[:draw(st.integers(1, table.rindex("\t")))]
        loader_refuses = False
    elif kind == "nan":
        cells = [ln.split("\t") for ln in table.splitlines()]
        cells[draw(st.integers(0, LAYERS - 1))][draw(st.integers(0, KV_HEADS - 1))] = \
            draw(st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e400"]))
        tsv = "\n".join("\t".join(r) for r in cells).encode()
    elif kind == "delimiter":
        tsv = table.replace("\t", draw(st.sampled_from([";", "|", ":", "\t;", "/"]))).encode()
    elif kind == "latin1":
        tsv = ("# gates for Llama-3 (café)\n" + table).encode("latin-1")
    elif kind == "utf16":
        tsv = table.encode("utf-16")
    elif kind == "binary":
        tsv = draw(st.binary(min_size=1, max_size=300))
        loader_refuses = False  # a few bytes may read as a 1x1 table: refused for its shape
    elif kind == "text":
        tsv = draw(st.text(min_size=1, max_size=200)).encode("utf-8", "surrogatepass")
        loader_refuses = False
    elif kind == "shape":
        layers, heads = draw(st.tuples(st.integers(1, 40), st.integers(1, 40)).filter(lambda s: s != (LAYERS, KV_HEADS)))
        tsv = _valid_table(rng, layers, heads, sep=draw(st.sampled_from(["\t", " ", ","]))).encode()
        loader_refuses = False
    elif kind == "no_columns":
        tsv = (table + draw(st.sampled_from([",", ",,,", "\t,\t"])) + "\n").encode()
    elif kind == "huge":
        tsv = None  # made sparse on disk: MAX_FILE_BYTES + 1 bytes of zeros
    elif kind == "config_json":
        config = draw(st.sampled_from([b"{", b"{'sink_size': 64}", b"sink_size=64", b"{\"a\": }"]))
    elif kind == "config_deep":
        config = b"[" * 100_000
    elif kind == "config_type":
        config = draw(st.sampled_from([b"[]", b"1", b"\"x\"", b"null"]))
    elif kind == "config_binary":
        config = b"\xff\xfe\xfa" + draw(st.binary(max_size=20))
    return FileCase(kind, tsv, config, point_at_file=draw(st.booleans()) and kind not in ("no_tsv", "tsv_is_dir"),
                    loader_refuses=loader_refuses,
                    options=tuple(draw(st.sampled_from([(), (("sparsity", 0.5),), (("threshold", 0.3),),
                                                        (("sparsity", 1.0), ("seed", 7))]))))


def materialize(case: FileCase, root: str) -> tuple[str, tuple[str, ...]]:
    """Write the case under ``root``; return the pattern path and words its refusal must contain."""
    folder = os.path.join(root, "pattern")
    os.makedirs(folder)
    tsv = os.path.join(folder, PATTERN_FILE)
    pattern = tsv if case.point_at_file else folder
    if case.kind == "missing":
        return os.path.join(root, "no-such-pattern"), ("does not exist",)
    if case.kind == "no_tsv":
        with open(os.path.join(folder, "full_attention_heads.csv"), "w") as f:
            f.write("0.5\n")
        return folder, (PATTERN_FILE,)
    if case.kind == "tsv_is_dir":
        os.makedirs(tsv)
        return folder, (PATTERN_FILE,)
    if case.kind == "fifo":
        os.mkfifo(tsv)
        return tsv, ("not a regular file",)
    if case.kind == "dev_null":
        return os.devnull, ("not a regular file",)
    if case.kind == "symlink_loop":
        os.symlink(tsv, tsv)
        return tsv, ("does not exist",)
    if case.kind == "huge":
        with open(tsv, "wb") as f:
            f.truncate(MAX_FILE_BYTES + 1)
        return pattern, ("bytes",)
    with open(tsv, "wb") as f:
        f.write(case.tsv or b"")
    if case.config is not None:
        with open(os.path.join(folder, "config.json"), "wb") as f:
            f.write(case.config)
        return pattern, ("config.json",)
    return pattern, (PATTERN_FILE, f"({LAYERS}, {KV_HEADS})")


@SETTINGS
@given(case=bad_files())
def test_malformed_pattern_files_refused(front: Front, case: FileCase) -> None:
    CASES["pattern_files"] += 1
    with tempfile.TemporaryDirectory() as root:
        pattern, hints = materialize(case, root)
        if case.loader_refuses:
            assert_refused(lambda: load_gates(pattern), hints)
        refused_everywhere(front, dict(case.options, pattern=pattern), hints)


# ----------------------------------------------------------------------------- found by the fuzz

@pytest.mark.parametrize("raw,hint", [
    ({"pattern": "full", "sparsity": 10**400}, "sparsity"),  # was OverflowError (math.isfinite)
    ({"pattern": "full", "sink_size": 10**5000}, "sink_size"),  # was ValueError (int str limit)
    ({"pattern": "full", 10**5000: 1}, "unknown duo_attention option"),  # same, in the key list
    ({"retrieval_mask": [[np.array([1, 0])] * KV_HEADS] * LAYERS}, "retrieval_mask"),  # was ambiguous truth
    ({"pattern": "full", "seed": "x" * 10_000}, "seed"),  # was a 10 KB message
])
def test_fuzz_regressions_options(raw: Any, hint: str) -> None:
    msg = assert_refused(lambda: parse_options(raw), (hint,))
    assert len(msg) < 300


def test_fuzz_regressions_files(tmp_path: Any) -> None:
    table = _valid_table(np.random.default_rng(0))
    (tmp_path / PATTERN_FILE).write_text(table)
    (tmp_path / "config.json").write_text("[" * 100_000)  # was RecursionError
    assert_refused(lambda: load_gates(str(tmp_path)), ("config.json",))
    (tmp_path / "config.json").unlink()
    (tmp_path / PATTERN_FILE).write_text(table + ",,\n")  # was accepted as a zero-width row
    assert_refused(lambda: load_gates(str(tmp_path)), ("no gate values",))
    os.truncate(tmp_path / PATTERN_FILE, MAX_FILE_BYTES + 1)  # was read whole
    assert_refused(lambda: load_gates(str(tmp_path)), ("bytes",))
    assert_refused(lambda: load_gates(os.devnull), ("not a regular file",))  # was "does not exist"
    (tmp_path / PATTERN_FILE).write_bytes(b"\xef\xbb\xbf" + table.encode())  # a BOM is fine
    assert load_gates(str(tmp_path)).shape == (LAYERS, KV_HEADS)


def test_fuzz_regression_worker_checks_embedded_mask(front: Front) -> None:
    """Was accepted: a worker trusted any embedded mask (wrong shapes reached the slot plan)."""
    front.config.additional_config = {"duo_attention": {"retrieval_mask": [[0]]}}
    assert_refused(lambda: options_from_vllm_config(front.config), (f"({LAYERS}, {KV_HEADS})",))
