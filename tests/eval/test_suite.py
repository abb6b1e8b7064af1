"""The retrieval suite's prompts and scorers (CPU, a stand-in tokenizer; SmolLM2's own when present)."""

from __future__ import annotations

import os
import random
import re

import pytest

from tests.eval.codec import WordCodec
from vllm_duo.errors import DuoConfigError
from vllm_duo.eval import suite
from vllm_duo.eval.niah import INTRO

CHAT = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
SMOLLM2 = "/tmp/models/smollm2-135m-instruct"


def oracle(p: suite.SuitePrompt) -> str:
    """What a model that retrieved every asked needle would generate after the answer's beginning."""
    if len(p.values) == 1:
        return f" {p.values[0]}.\n"
    first, *rest = p.values
    return f" {first}.\n" + "".join(f"The {p.shape} for {k} is: {v}.\n" for k, v in zip(p.keys[1:], rest))


def test_default_suite_covers_every_axis():
    tasks = suite.DEFAULT_SUITE
    assert {t.needle for t in tasks} == set(suite.NEEDLE_SHAPES)
    assert {t.filler for t in tasks} == set(suite.FILLER_KINDS)
    assert {t.variant for t in tasks} == set(suite.VARIANTS)
    assert {t.chat for t in tasks} == {True, False}
    assert len({t.name for t in tasks}) == len(tasks)


@pytest.mark.parametrize("task", suite.DEFAULT_SUITE, ids=lambda t: t.name)
@pytest.mark.parametrize("length", [400, 1500])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needles_are_in_their_prompt_and_retrievable(task, length, depth):
    codec = WordCodec()
    b = suite.SuiteBuilder(codec, task, chat=CHAT if task.chat else None, prefix=codec.encode("<s>"))
    p = b.build(length, depth, sample=1)
    assert length - 40 <= len(p.ids) <= length  # a budget, filled to within a sentence or line
    text = codec.decode(p.ids)
    assert text.startswith((CHAT[0] if task.chat else "<s>") + INTRO + "\n")
    assert "\n\n" not in text  # a blank line derails small models
    assert len(p.spans) == task.needles and len(p.values) == len(p.keys) == task.queries
    needle_texts = [codec.decode(p.ids[s:e]).strip("\n") for s, e in p.spans]
    for key, value, needle in zip(p.keys, p.values, needle_texts):  # the asked needles come first
        assert key in needle and value in needle and text.count(value) == 1
    assert all(codec.decode(p.ids[s - 1:s]).endswith("\n") or codec.decode(p.ids[s:e]).startswith("\n")
               for s, e in p.spans)  # each needle opens a line
    tail = codec.decode(_tail(codec, task, p))
    assert text.endswith(tail) and all(k in tail for k in p.keys)  # the question names every asked key
    assert suite.score(p.shape, p.values, oracle(p)) == 1.0
    # the asked needle sits at the requested depth, to within one filler unit
    head = len(b.prefix) + len(codec.encode(INTRO + "\n")) if not task.chat else \
        len(codec.encode(CHAT[0])) + len(codec.encode(INTRO + "\n"))
    others = sum(e - s for s, e in p.spans[1:] if s < p.spans[0][0])
    before = p.spans[0][0] - head - others
    filler = len(p.ids) - head - sum(e - s for s, e in p.spans) - len(_tail(codec, task, p))
    assert abs(before - depth * filler) <= 40


def _tail(codec, task, p):
    q, a = suite.question_answer(task.needle, [suite.Needle(k, v, "") for k, v in zip(p.keys, p.values)])
    if task.chat:
        return codec.encode("\n" + q) + codec.encode(CHAT[1]) + codec.encode(a)
    return codec.encode("\nQuestion: " + q + "\nAnswer: " + a)


def test_prompts_are_seeded():
    codec = WordCodec()
    b = suite.SuiteBuilder(codec, suite.Task("uuid", "code", "multikey", needles=4))
    assert b.build(800, 0.5, 0).ids == b.build(800, 0.5, 0).ids
    assert b.build(800, 0.5, 0).values != b.build(800, 0.5, 1).values
    assert b.build(800, 0.5, 0, seed=1).ids != b.build(800, 0.5, 0).ids


def test_distractors_differ_from_the_asked_needle():
    rng, used = random.Random(3), set()
    needles = [suite.make_needle("word", rng, used) for _ in range(8)]
    assert len({n.key for n in needles}) == len({n.value for n in needles}) == 8


@pytest.mark.parametrize("shape,values,right,wrong", [
    ("number", ["4189197"], " 4189197.\n", [" 4189196.", " 2147483, 4189197", " none"]),
    ("word", ["walrus"], " walrus.", [" cactus.", " cactus or walrus", ""]),
    ("word", ["walrus"], " the special magic word for amber-falcon is walrus", [" amber falcon cactus"]),
    ("uuid", ["94c7-fd09-b747"], " 94C7-FD09-B747.", [" 94c7-fd09-b748", " 94c7-fd09", " 0000-0000-0000 94c7-fd09-b747"]),
    ("sentence", ["swim in the cold lake before breakfast"], " swim in the cold lake, before breakfast.",
     [" swim in the cold lake", " eat a warm pastry by the river."]),
])
def test_scorers_accept_right_and_reject_wrong(shape, values, right, wrong):
    assert suite.score(shape, values, right) == 1.0
    for w in wrong:
        assert suite.score(shape, values, w) == 0.0, w


def test_multi_query_scores_each_value():
    values = ["2147936", "3729285", "5212345"]
    assert suite.score("number", values, " 2147936.\nThe number for b is: 3729285.\nand 5212345") == 1.0
    assert suite.score("number", values, " 2147936.\nThe number for b is: 1111111.") == pytest.approx(1 / 3)
    assert suite.score("word", ["tornado", "avocado"], " tornado. tornado.") == 0.5


def test_bad_input_is_one_clear_error():
    codec = WordCodec()
    with pytest.raises(DuoConfigError, match="too short"):
        suite.SuiteBuilder(codec, suite.Task("number", "repeat", "multikey", needles=4)).build(60, 0.5, 0)
    with pytest.raises(DuoConfigError, match="fraction"):
        suite.SuiteBuilder(codec, suite.Task("number", "repeat")).build(500, 50, 0)
    with pytest.raises(DuoConfigError, match="chat template"):
        suite.SuiteBuilder(codec, suite.Task("number", "repeat", chat=True))
    with pytest.raises(DuoConfigError, match="choose from"):
        suite.parse_formats(["single_number_essay"])
    with pytest.raises(DuoConfigError, match="unknown suite format"):
        suite.Task("phone", "repeat")
    with pytest.raises(DuoConfigError, match="asks for"):
        suite.Task("word", "prose", "multiquery", needles=2, queries=3)


def test_build_suite_interleave_and_summary(tmp_path):
    codec = WordCodec()
    tasks = suite.parse_formats(["single_number_repeat", "multikey_number_prose", "single_sentence_repeat_chat"])
    prompts = suite.build_suite(codec, tasks, [300, 500], [0.0, 1.0], 2, chat=CHAT)
    assert len(prompts) == 3 * 2 * 2 * 2
    mixed = suite.interleave(prompts)
    assert [p.format for p in mixed[:3]] == [t.name for t in tasks] and sorted(map(id, mixed)) == sorted(map(id, prompts))
    cells = {"full": [suite.cell(p, oracle(p)) for p in prompts],
             "streaming": [suite.cell(p, " 1234567" if p.format != tasks[0].name else oracle(p)) for p in prompts]}
    results = {m: suite.summarize(c) for m, c in cells.items()}
    assert results["full"]["accuracy"] == 1.0 and results["full"]["total"] == 24
    table = suite.accuracy_table(results)
    assert table["streaming"] == {tasks[0].name: 1.0, tasks[1].name: 0.0, tasks[2].name: 0.0}
    png = tmp_path / "suite.png"
    suite.plot_table(table, {t.name: 8 for t in tasks}, str(png), "test")
    assert png.stat().st_size > 1000


@pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason=f"no SmolLM2 tokenizer at {SMOLLM2}")
def test_real_tokenizer_keeps_needles_whole():
    from vllm_duo.eval.niah import HFCodec

    codec = HFCodec(SMOLLM2)
    chat, prefix = suite.codec_chat(codec, suite.DEFAULT_SUITE)
    for p in suite.build_suite(codec, suite.DEFAULT_SUITE, [1500], [0.0, 0.5, 1.0], 1, chat=chat, prefix=prefix):
        assert len(p.ids) <= 1500
        for (s, e), value in zip(p.spans, p.values):
            assert value in codec.decode(p.ids[s:e])
        assert suite.score(p.shape, p.values, oracle(p)) == 1.0


def test_engine_runner_batches_each_method_and_scores_its_own_tokens(monkeypatch):
    """One job per method with every prompt; tokens past a format's max_tokens are not scored;
    a failed engine is recorded, not raised (stand-in engine, CPU)."""
    from vllm_duo.eval import engine_proc
    from vllm_duo.eval.engine_proc import EngineJobError
    from vllm_duo.eval.methods import expand_methods

    codec = WordCodec()
    tasks = suite.parse_formats(["single_number_repeat", "multikey_uuid_repeat"])
    prompts = suite.build_suite(codec, tasks, [400], [0.5], 2)
    by_ids = {tuple(p.ids): p for p in prompts}
    jobs = []

    def run_job(job, spec, **kw):
        jobs.append(spec)
        duo = spec["engine"].get("additional_config", {}).get("duo_attention", {})
        if duo.get("sparsity") == 0.75:
            raise EngineJobError("engine job exited with 1")
        late = " filler" * 40  # past every max_tokens: the right answer after it must not count
        outs = [oracle(by_ids[tuple(ids)]) if duo.get("pattern") != "streaming"
                else late + oracle(by_ids[tuple(ids)]) for ids in spec["prompts"]]
        return {"tokens": [codec.encode(o) for o in outs], "generate_seconds": 0.1}

    monkeypatch.setattr(engine_proc, "run_job", run_job)
    methods = expand_methods(["full", "duo", "streaming"], pattern="/p", sparsities=[0.5, 0.75], sink=4, recent=8)
    out = suite.run_engine("/m", methods, prompts, codec.decode, engine={"max_model_len": 500}, log_path="/dev/null")
    assert len(jobs) == 4 and all(len(j["prompts"]) == len(prompts) for j in jobs)
    assert jobs[0]["max_tokens"] == max(t.max_tokens for t in tasks)
    assert jobs[0]["engine"] == {"max_model_len": 500, "attention_backend": "FLASH_ATTN"}
    assert suite.summarize(out["full"]["cells"])["accuracy"] == 1.0
    assert suite.summarize(out["duo_s050"]["cells"])["accuracy"] == 1.0
    assert suite.summarize(out["streaming"]["cells"])["accuracy"] == 0.0
    assert "exited with 1" in out["duo_s075"]["error"]


@pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason=f"no SmolLM2 tokenizer at {SMOLLM2}")
def test_measure_through_the_engine_runner(monkeypatch, tmp_path):
    """suite.measure's engine path: engine options merged, per-format results (stand-in engine)."""
    from vllm_duo.eval import engine_proc
    from vllm_duo.eval.methods import expand_methods
    from vllm_duo.eval.niah import HFCodec

    codec, specs = HFCodec(SMOLLM2), []

    def run_job(job, spec, **kw):
        specs.append(spec)
        streaming = spec["engine"].get("additional_config", {}).get("duo_attention", {}).get("pattern") == "streaming"
        answer = lambda ids: re.search(r"is: (\d+)\.\n", codec.decode(ids)).group(1)  # noqa: E731
        return {"tokens": [codec.encode(" 1." if streaming else f" {answer(ids)}.") for ids in spec["prompts"]]}

    monkeypatch.setattr(engine_proc, "run_job", run_job)
    methods = expand_methods(["full", "streaming"], pattern=None, sparsities=[], sink=64, recent=256)
    payload = suite.measure(SMOLLM2, methods, suite.parse_formats(["single_number_repeat"]), lengths=[1500, 3000],
                            depths=[0.5], samples=2, seed=0, sink=64, recent=256, runner="engine",
                            engine={"gpu_memory_utilization": 0.3}, log_path=str(tmp_path / "e.log"), log=lambda s: None)
    assert specs[0]["engine"]["gpu_memory_utilization"] == 0.3 and specs[0]["engine"]["max_model_len"] == 3010
    assert payload["per_format"] == {"full": {"single_number_repeat": 1.0}, "streaming": {"single_number_repeat": 0.0}}
    assert payload["prompts_per_format"] == {"single_number_repeat": 4}


def test_niah_suite_engine_kwargs_share_a_gpu_with_a_fixed_kv_cache() -> None:
    from benchmarks import niah_suite

    assert niah_suite.engine_kwargs(niah_suite.parse_args([]))["gpu_memory_utilization"] == 0.5
    shared = niah_suite.engine_kwargs(niah_suite.parse_args(["--kv-cache-gib", "8"]))
    assert shared["kv_cache_memory_bytes"] == 8 << 30 and shared["gpu_memory_utilization"] < 0.1


def test_niah_suite_prefill_recent_reaches_the_duo_engines_and_needs_the_engine_runner(monkeypatch, tmp_path):
    """--prefill-recent: in every duo method's options (not FLASH_ATTN's); refused, in one line, for hf."""
    from benchmarks import niah_suite

    seen = []

    def measure(model, methods, tasks, **kw):
        seen.extend(methods)
        raise SystemExit(0)

    monkeypatch.setattr(niah_suite.suite, "measure", measure)
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit):
        niah_suite.main(["--runner", "engine", "--model", str(tmp_path / "m"), "--prefill-recent", "8192",
                         "--sparsity", "0.5"])
    duo = {m.name: m.duo for m in seen}
    assert duo["full"] == {} and duo["duo_s050"]["prefill_recent_size"] == 8192
    assert duo["streaming"]["prefill_recent_size"] == 8192
    with pytest.raises(SystemExit) as e:
        niah_suite.main(["--runner", "hf", "--model", str(tmp_path / "m"), "--prefill-recent", "8192"])
    assert "--prefill-recent needs --runner engine" in str(e.value.code)
