"""A retrieval suite (RULER-style, all synthetic and seeded): task formats, prompts, scoring.

Why: one passkey prompt with one filler cannot show whether a head pattern generalizes, and the
pattern was identified on story filler with word passkeys (vllm_duo/identify/data.py), so the
suite's fillers and needles are written apart from it. A format is one combination of

- needle shape: ``number`` (7 digits), ``word``, ``uuid`` (``9f3a-c41e-07bd``), ``sentence``
  (``The best thing to do in Lisbon is ...``);
- filler: ``repeat`` (the Landmark "The grass is green." lines), ``prose`` (varied field-guide
  sentences from a seeded generator), ``code`` (Python-like lines from a seeded generator);
- variant: ``single`` (one needle), ``multikey`` (several needles under different keys, one asked
  for), ``multiquery`` (several needles, all asked for);
- with or without the chat template.

Layout (the NIAH lessons of vllm_duo/eval/niah.py): one line each, [prefix] INTRO / filler / needle
/ filler / ``Question: ...`` / ``Answer:`` with the answer begun; no blank line anywhere (a blank
line before the question makes SmolLM2-135M start a new document). With a chat template the
question closes the user turn and the assistant turn begins with the answer.

Prompts are token ids from any :class:`~vllm_duo.eval.niah.Codec`, at most ``length`` tokens (a
budget: filler comes in whole sentences or lines), the asked-for needle at the requested depth.
Pure Python (matplotlib for the heatmap); the runners import torch or vLLM only when called.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_duo.errors import DuoConfigError
from vllm_duo.eval.niah import FILLER as REPEAT_FILLER
from vllm_duo.eval.niah import INTRO, Codec

NEEDLE_SHAPES = ("number", "word", "uuid", "sentence")
FILLER_KINDS = ("repeat", "prose", "code")
VARIANTS = ("single", "multikey", "multiquery")


@dataclass(frozen=True)
class Task:
    """One suite format. ``needles`` in the haystack; ``queries`` of them asked for."""

    needle: str
    filler: str
    variant: str = "single"
    chat: bool = False
    needles: int = 1
    queries: int = 1

    def __post_init__(self) -> None:
        if self.needle not in NEEDLE_SHAPES or self.filler not in FILLER_KINDS or self.variant not in VARIANTS:
            raise DuoConfigError(f"unknown suite format {self.needle}/{self.filler}/{self.variant}; needle shapes "
                                 f"{NEEDLE_SHAPES}, fillers {FILLER_KINDS}, variants {VARIANTS}")
        if not 1 <= self.queries <= self.needles:
            raise DuoConfigError(f"a format asks for 1..needles of its needles, got {self.queries} of {self.needles}")

    @property
    def name(self) -> str:
        return f"{self.variant}_{self.needle}_{self.filler}{'_chat' if self.chat else ''}"

    @property
    def max_tokens(self) -> int:
        """Tokens to generate: room for every asked-for value, and for a needle-like line before each
        value after the first (multi-query answers restate each key)."""
        per = {"number": 10, "word": 8, "uuid": 16, "sentence": 24}[self.needle]
        return per * self.queries + 18 * (self.queries - 1)


# Every shape, filler, variant and both prompt styles appear at least once (10 formats).
DEFAULT_SUITE: tuple[Task, ...] = (
    Task("number", "repeat"),
    Task("word", "prose"),
    Task("uuid", "code"),
    Task("sentence", "prose"),
    Task("number", "prose", "multikey", needles=4),
    Task("uuid", "repeat", "multikey", needles=4),
    Task("word", "code", "multiquery", needles=3, queries=3),
    Task("number", "code", "multiquery", needles=2, queries=2),
    Task("sentence", "repeat", chat=True),
    Task("word", "prose", "multikey", chat=True, needles=4),
)


def parse_formats(names: Sequence[str] | None) -> list[Task]:
    """Suite format names (``Task.name``) -> tasks; None or empty: the default suite."""
    if not names:
        return list(DEFAULT_SUITE)
    known = {t.name: t for t in DEFAULT_SUITE}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DuoConfigError(f"unknown suite format(s) {unknown}; choose from {sorted(known)}")
    return [known[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------- needles: keys, values, text

_KEY_A = ("amber", "silent", "crimson", "hollow", "brisk", "velvet", "frozen", "lucky", "rusty", "noble",
          "tidal", "dusty", "humble", "scarlet", "polar", "mellow", "sturdy", "vivid", "wary", "gilded")
_KEY_B = ("falcon", "harbor", "meadow", "compass", "orchid", "beacon", "glacier", "canyon", "thistle",
          "anvil", "willow", "comet", "badger", "pebble", "lagoon", "spindle", "quarry", "cinder", "marble")
_VALUE_WORDS = ("pineapple", "telescope", "saxophone", "umbrella", "kangaroo", "volcano", "backpack", "giraffe",
                "blueberry", "submarine", "cucumber", "dinosaur", "magnet", "pyramid", "octopus", "avocado",
                "microscope", "snowflake", "trumpet", "cactus", "hammock", "tornado", "walrus", "sandcastle")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Montreal", "Valparaiso", "Kraków",
           "Adelaide", "Marrakesh", "Reykjavik", "Osaka", "Cusco", "Tallinn", "Zanzibar")
_ACTIVITIES = ("eat a warm pastry by the river", "ride the old tram up the hill at sunset",
               "swim in the cold lake before breakfast", "read in the botanical garden on a rainy day",
               "climb the clock tower and count the boats", "buy fresh figs at the morning market",
               "listen to a brass band in the main square", "walk along the harbor wall at night",
               "drink mint tea on a rooftop terrace", "watch the fishermen mend their nets",
               "cycle to the lighthouse with a picnic", "play chess with strangers in the park")
_NOUN = {"number": "special magic number", "word": "special magic word", "uuid": "special magic code"}


@dataclass(frozen=True)
class Needle:
    key: str  # what the question names: a two-word key, or a city for sentences
    value: str  # what the answer must hold
    text: str  # the needle sentence


def make_needle(shape: str, rng: random.Random, used: set[str]) -> Needle:
    """A needle whose key and value differ from those in ``used`` (distractors stay distinct)."""
    while True:
        if shape == "sentence":
            key, value = rng.choice(_CITIES), rng.choice(_ACTIVITIES)
            text = f"The best thing to do in {key} is to {value}."
        else:
            key = f"{rng.choice(_KEY_A)}-{rng.choice(_KEY_B)}"
            if shape == "number":
                value = str(rng.randint(1_000_000, 9_999_999))
            elif shape == "word":
                value = rng.choice(_VALUE_WORDS)
            else:
                value = "-".join(f"{rng.getrandbits(16):04x}" for _ in range(3))
            text = f"The {_NOUN[shape]} for {key} is: {value}."
        if key not in used and value not in used:
            used.update((key, value))
            return Needle(key, value, text)


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def question_answer(shape: str, asked: Sequence[Needle]) -> tuple[str, str]:
    """(question, the answer's beginning) for the asked-for needles, in their order."""
    keys = _join([n.key for n in asked])
    if shape == "sentence":
        if len(asked) == 1:
            return f"What is the best thing to do in {keys}?", f"The best thing to do in {keys} is to"
        return (f"What are the best things to do in {keys}?", f"The best things to do in {keys} are:")
    noun = _NOUN[shape]
    if len(asked) == 1:
        return f"What is the {noun} for {keys}?", f"The {noun} for {keys} is:"
    # the answer begins with the first key's frame: a 135M model given "...for A, B and C are" repeats the
    # question (full attention, HF, CPU); begun this way it goes on to the next keys itself
    return f"What are the {noun}s for {keys}?", f"The {noun} for {asked[0].key} is:"


# ---------------------------------------------------------------- scoring

_NOT_WORD_VALUES = frozenset(_KEY_A + _KEY_B + ("the", "special", "magic", "word", "words", "for", "is", "are",
                                                 "and"))
_UUID = re.compile(r"[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}")


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def candidates(shape: str, text: str) -> list[str]:
    """The values an answer names, in order (sentences: the normalized text itself)."""
    if shape == "number":
        return re.findall(r"\d+", text)
    if shape == "word":  # the words of keys and of the answer's frame are not answers
        return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in _NOT_WORD_VALUES]
    if shape == "uuid":
        return _UUID.findall(text.lower())
    return [_norm(text)]


def score(shape: str, values: Sequence[str], text: str) -> float:
    """Fraction of ``values`` the generated ``text`` gives.

    One value: the first number / word / code generated must be it (naming several values does not
    count); a sentence's activity must appear. Several values: each must appear.
    """
    found = candidates(shape, text)
    if shape == "sentence":
        return sum(_norm(v) in found[0] for v in values) / len(values)
    if len(values) == 1:
        return float(bool(found) and found[0] == values[0].lower())
    return sum(v.lower() in found for v in values) / len(values)


# ---------------------------------------------------------------- fillers

_P_SUBJ = ("the river delta", "a limestone cave", "the northern forest", "a colony of desert lizards", "the coastal town",
           "an old copper mine", "the spring market", "the flock of migrating geese", "the mountain railway", "the salt marsh",
           "a family of otters", "the valley vineyard", "the harbor ferry", "the weather station", "the wild bee colony")
_P_VERB = ("shelters", "attracts", "depends on", "slowly reshapes", "is known for", "rarely shows",
           "was built around", "supplies", "quietly absorbs", "often hides", "has always needed", "changes")
_P_OBJ = ("thin layers of clay", "hundreds of visitors", "the seasonal rains", "a narrow stone bridge",
          "the morning fog", "several rare mosses", "the copper-colored rock", "the last of the snow",
          "long rows of poplars", "a surprising amount of light", "the tidal currents", "small wooden boats")
_P_WHEN = ("in early autumn", "after a dry summer", "every few decades", "during the long winter nights",
           "when the wind turns east", "at the start of each spring", "for most of the year", "before dawn")
_P_FORMS = ("{S} {v} {o} {w}.", "In most years {s} {v} {o}.", "Records show that {s} {v} {o} {w}.",
            "{W}, {s} {v} {o}.", "Few people notice that {s} {v} {o}.", "Local guides say {s} {v} {o}.")

_C_NAMES = ("total", "count", "buffer", "offset", "result", "index", "value", "cache", "limit", "rows", "item",
            "score", "width", "delta", "batch", "level")
_C_FUNCS = ("load_items", "parse_header", "merge_rows", "compute_total", "update_cache", "read_config",
            "flush_buffer", "scale_values", "check_limits", "build_index")
_C_WORDS = ("retry the request", "skip empty rows", "keep the order stable", "values are in meters",
            "this runs once per batch", "avoid copying the buffer", "the cache may be stale")


def prose_sentence(rng: random.Random) -> str:
    s, w = rng.choice(_P_SUBJ), rng.choice(_P_WHEN)
    return rng.choice(_P_FORMS).format(S=s[0].upper() + s[1:], s=s, v=rng.choice(_P_VERB),
                                       o=rng.choice(_P_OBJ), w=w, W=w[0].upper() + w[1:])


def code_line(rng: random.Random) -> str:
    a, b, n = rng.choice(_C_NAMES), rng.choice(_C_NAMES), rng.randint(2, 99)
    return rng.choice((
        f"def {rng.choice(_C_FUNCS)}({a}, {b}={n}):", f"    {a} = {b} + {n}", f"    if {a} > {n}:",
        f"        return {a} * {n}", f"    for {a} in range({n}):", f"        {a}.append({b} % {n})",
        f"# {rng.choice(_C_WORDS)}", f"{a.upper()}_MAX = {n * 16}", f"    {a}, {b} = {b}, {a}",
        f"    log.debug(\"{a}=%s\", {a})", f"class {rng.choice(_C_FUNCS).title().replace('_', '')}:",
    ))


def filler_units(kind: str, rng: random.Random) -> Callable[[int], str]:
    """The ``i``-th filler unit (a sentence, or a line of code) of a seeded stream."""
    if kind == "repeat":
        return lambda i: REPEAT_FILLER[i % len(REPEAT_FILLER)]
    make = prose_sentence if kind == "prose" else code_line
    cache: list[str] = []

    def unit(i: int) -> str:
        while len(cache) <= i:
            cache.append(make(rng))
        return cache[i]
    return unit


# ---------------------------------------------------------------- prompts

@dataclass(frozen=True)
class SuitePrompt:
    format: str
    ids: list[int]
    length: int  # the token budget; len(ids) <= length
    depth: float  # requested depth of the first asked-for needle (fraction of the filler before it)
    sample: int
    shape: str
    values: list[str]  # the asked-for values, in the order asked
    keys: list[str]
    spans: list[tuple[int, int]] = field(default_factory=list)  # token span of each needle, asked first
    max_tokens: int = 16


class SuiteBuilder:
    """Builds one format's prompts from a codec (and the chat template's head/tail when chat)."""

    def __init__(self, codec: Codec, task: Task, *, chat: tuple[str, str] | None = None,
                 prefix: Sequence[int] = ()):
        if task.chat and chat is None:
            raise DuoConfigError(f"format {task.name} needs the tokenizer's chat template")
        self.codec, self.task, self.chat, self.prefix = codec, task, chat, list(prefix)
        self.sep = "\n" if task.filler == "code" else " "

    def build(self, length: int, depth: float, sample: int, seed: int = 0) -> SuitePrompt:
        if not 0 <= depth <= 1:
            raise DuoConfigError(f"needle depth must be a fraction in [0, 1] (0.5, not 50), got {depth}")
        task, enc = self.task, self.codec.encode
        rng = random.Random(f"{seed}:{task.name}:{length}:{depth}:{sample}")
        used: set[str] = set()
        needles = [make_needle(task.needle, rng, used) for _ in range(task.needles)]
        asked = needles[:task.queries]
        question, answer = question_answer(task.needle, asked)
        if self.chat is None:
            head = self.prefix + enc(INTRO + "\n")
            tail = enc("\nQuestion: " + question + "\nAnswer: " + answer)
        else:
            head = enc(self.chat[0]) + enc(INTRO + "\n")
            tail = enc("\n" + question) + enc(self.chat[1]) + enc(answer)
        blocks = [enc("\n" + n.text + "\n") for n in needles]
        # 2 tokens per needle of slack: a unit after a needle loses its separator when re-encoded
        budget = length - len(head) - len(tail) - sum(map(len, blocks)) - 2 * len(blocks)
        unit = filler_units(task.filler, rng)
        units: list[list[int]] = []
        used_tokens = 0
        while True:
            u = enc((self.sep if units else "") + unit(len(units)))
            if used_tokens + len(u) > budget:
                break
            units.append(u)
            used_tokens += len(u)
        if len(units) < len(needles):
            raise DuoConfigError(f"context length {length} is too short for format {task.name}: "
                                 f"the prompt without filler takes {length - budget} tokens")
        # unit boundaries 0..len(units); asked needle 0 at the depth, the rest at seeded distinct places
        ends = [0]
        for u in units:
            ends.append(ends[-1] + len(u))
        first = min(range(len(ends)), key=lambda b: (abs(ends[b] - depth * used_tokens), b))
        others = [b for b in range(len(ends)) if b != first]
        at = [first] + rng.sample(others, len(needles) - 1)
        where = {b: i for i, b in enumerate(at)}
        pieces = []  # in order: ("needle", index) / ("unit", index); never two needles in a row
        for b in range(len(units) + 1):
            if b in where:
                pieces.append(("needle", where[b]))
            if b < len(units):
                pieces.append(("unit", b))
        ids, spans = list(head), [(0, 0)] * len(needles)
        prev = "head"  # the head ends a line, and the tail opens one
        for i, (kind, x) in enumerate(pieces):
            nxt = pieces[i + 1][0] if i + 1 < len(pieces) else "tail"
            if kind == "needle":  # a line of its own
                block = enc(("\n" if prev == "unit" else "") + needles[x].text + ("\n" if nxt == "unit" else ""))
                spans[x] = (len(ids), len(ids) + len(block))
                ids += block
            else:  # a unit opening a line goes without its separator
                ids += units[x] if prev == "unit" else enc(unit(x))
            prev = kind
        ids += tail
        if len(ids) > length:  # cannot happen with the slack above; a tokenizer that breaks it must say so
            raise DuoConfigError(f"format {task.name}: built {len(ids)} tokens for a budget of {length}")
        return SuitePrompt(format=task.name, ids=ids, length=length, depth=depth, sample=sample,
                           shape=task.needle, values=[n.value for n in asked], keys=[n.key for n in asked],
                           spans=spans, max_tokens=task.max_tokens)


def build_suite(codec: Codec, tasks: Sequence[Task], lengths: Sequence[int], depths: Sequence[float],
                samples: int, seed: int = 0, *, chat: tuple[str, str] | None = None,
                prefix: Sequence[int] = ()) -> list[SuitePrompt]:
    """Every format's prompts: lengths x depths x samples each, format-major.

    ``chat``: the tokenizer's chat head/tail, used by the chat formats; ``prefix`` (BOS) by the rest.
    """
    out = []
    for task in tasks:
        b = SuiteBuilder(codec, task, chat=chat if task.chat else None, prefix=prefix)
        out += [b.build(n, d, s, seed) for n in lengths for d in depths for s in range(samples)]
    return out


def codec_chat(codec: Any, tasks: Sequence[Task]) -> tuple[tuple[str, str] | None, list[int]]:
    """(chat head/tail if any task needs it, BOS prefix) for an :class:`~vllm_duo.eval.niah.HFCodec`."""
    chat = codec.chat_wrap() if any(t.chat for t in tasks) else None
    return chat, codec.special_prefix()


# ---------------------------------------------------------------- results

def cell(prompt: SuitePrompt, output: str) -> dict[str, Any]:
    s = score(prompt.shape, prompt.values, output)
    rec = {k: v for k, v in asdict(prompt).items() if k not in ("ids", "spans")}
    rec.update(tokens=len(prompt.ids), output=output, score=s, correct=s == 1.0)
    return rec


def summarize(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-format and overall counts: correct (every asked value right) and mean partial score."""
    formats: dict[str, dict[str, Any]] = {}
    for c in cells:
        f = formats.setdefault(c["format"], {"correct": 0, "total": 0, "score_sum": 0.0})
        f["correct"] += c["correct"]
        f["total"] += 1
        f["score_sum"] += c["score"]
    for f in formats.values():
        f["accuracy"] = f["correct"] / f["total"]
        f["mean_score"] = round(f.pop("score_sum") / f["total"], 4)
    correct, total = sum(c["correct"] for c in cells), len(cells)
    return {"formats": formats, "correct": correct, "total": total,
            "accuracy": correct / total if total else 0.0}


def accuracy_table(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{method: {format: accuracy}} from each method's :func:`summarize` result (the summary figure)."""
    return {m: {f: round(v["accuracy"], 4) for f, v in r["formats"].items()} for m, r in methods.items()
            if "formats" in r}


def plot_table(table: dict[str, dict[str, float]], counts: dict[str, int], path: str, title: str) -> None:
    """Heatmap: rows = formats, columns = methods, cell = accuracy (text in each cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    methods = list(table)
    formats = list(dict.fromkeys(f for m in methods for f in table[m]))
    data = np.array([[table[m].get(f, np.nan) for m in methods] for f in formats], dtype=float)
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#DDDDDD")
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 4, 0.42 * len(formats) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_yticks(range(len(formats)), [f"{f} (n={counts.get(f, '?')})" for f in formats], fontsize=8)
    for i in range(len(formats)):
        for j in range(len(methods)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction correct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def interleave(prompts: Sequence[SuitePrompt]) -> list[SuitePrompt]:
    """Round-robin over formats (the i-th prompt of every format, then the next): a run cut short
    by a time budget still has every format measured about equally often."""
    by_format: dict[str, list[SuitePrompt]] = {}
    for p in prompts:
        by_format.setdefault(p.format, []).append(p)
    rounds = max(map(len, by_format.values()), default=0)
    return [ps[i] for i in range(rounds) for ps in by_format.values() if i < len(ps)]


# ---------------------------------------------------------------- runners (torch / vLLM imported on call)

def method_masks(methods: Sequence[Any], model: str) -> dict[str, Any]:
    """Each method's retrieval mask as the engine resolves its options (None: full attention)."""
    from vllm_duo.eval.methods import model_shape
    from vllm_duo.options import parse_options, resolve_options

    layers, kv_heads, _ = model_shape(model)
    return {m.name: resolve_options(parse_options(m.duo), layers, kv_heads, model).mask() if m.duo else None
            for m in methods}


def run_hf(model: str, methods: Sequence[Any], prompts: Sequence[SuitePrompt], decode: Callable[[list[int]], str],
           *, sink: int, recent: int, deadline: float | None = None,
           on_prompt: Callable[[int], None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Greedy generation in HF transformers, float32 (duo semantics: vllm_duo/eval/hf_duo.py).

    Every method answers a prompt before the next prompt starts, so a run stopped at ``deadline``
    (a ``time.monotonic()`` value) has the same prompts for every method.
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from vllm_duo.eval.hf_duo import DuoSemantics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {}
    for name, mask in method_masks(methods, model).items():
        models[name] = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                                            attn_implementation="sdpa").to(device).eval()
        if mask is not None:
            DuoSemantics(mask, sink, recent).install(models[name])
    cells: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    for i, p in enumerate(prompts):
        if deadline is not None and time.monotonic() > deadline:
            break
        ids = torch.tensor([p.ids], device=device)
        for name, m in models.items():
            with torch.no_grad():
                out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                                 do_sample=False)
            cells[name].append(cell(p, decode(out[0, len(p.ids):].tolist())))
        if on_prompt:
            on_prompt(i + 1)
    return cells


def run_engine(model: str, methods: Sequence[Any], prompts: Sequence[SuitePrompt],
               decode: Callable[[list[int]], str], *, engine: dict[str, Any], log_path: str,
               timeout: float = 600, echo: bool = True) -> dict[str, dict[str, Any]]:
    """vLLM, one engine process per method, every prompt in one batch (greedy).

    Generates the longest format's ``max_tokens`` and scores each prompt on its own first
    ``max_tokens``, as :func:`run_hf` does. A method whose engine fails gets ``{"error": ...}``.
    """
    import time

    from vllm_duo.eval.engine_proc import EngineJobError, run_job

    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        kwargs = dict(engine, **m.engine_kwargs())
        spec = dict(model=model, engine=kwargs, prompts=[p.ids for p in prompts],
                    max_tokens=max(p.max_tokens for p in prompts), use_tqdm=True)
        t0 = time.perf_counter()
        try:
            res = run_job("vllm_duo.eval.engine_proc:generate", spec, log_path=log_path, echo=echo,
                          timeout=timeout, header=f"niah suite {m.name}")
        except EngineJobError as e:
            out[m.name] = {"engine": kwargs, "error": str(e)[-4000:]}
            continue
        out[m.name] = {"engine": kwargs, "seconds": round(time.perf_counter() - t0, 1),
                       "generate_seconds": res.get("generate_seconds"),
                       "cells": [cell(p, decode(toks[:p.max_tokens])) for p, toks in zip(prompts, res["tokens"])]}
    return out


def measure(model: str, methods: Sequence[Any], tasks: Sequence[Task], *, lengths: Sequence[int],
            depths: Sequence[float], samples: int, seed: int, sink: int, recent: int, runner: str = "hf",
            time_budget: float | None = None, engine: dict[str, Any] | None = None, log_path: str | None = None,
            timeout: float = 300, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The suite for ``methods`` (vllm_duo.eval.methods.Method): the result payload, per format per method.

    Bad input (a pattern for another model, lengths past the model's positions, unknown formats)
    raises :class:`DuoConfigError` before any model is loaded.
    """
    import time

    from vllm_duo.eval.methods import model_shape
    from vllm_duo.eval.niah import HFCodec

    if runner not in ("hf", "engine"):
        raise DuoConfigError(f"runner must be 'hf' or 'engine', got {runner!r}")
    method_masks(methods, model)  # a pattern made for another model fails here
    _, _, max_positions = model_shape(model)
    longest = max(lengths) + max(t.max_tokens for t in tasks)
    if max_positions and longest > max_positions:
        raise DuoConfigError(f"lengths up to {max(lengths)} plus generated tokens need {longest} positions; "
                             f"the model has {max_positions}: lower the lengths")
    codec = HFCodec(model)
    chat, prefix = codec_chat(codec, tasks)
    prompts = interleave(build_suite(codec, tasks, lengths, depths, samples, seed, chat=chat, prefix=prefix))
    log(f"niah suite: {len(prompts)} prompts ({len(tasks)} formats x {len(lengths)} lengths x {len(depths)} "
        f"depths x {samples}), methods {[m.name for m in methods]}, runner {runner}")
    t0 = time.monotonic()
    if runner == "hf":
        cells = run_hf(model, methods, prompts, codec.decode, sink=sink, recent=recent,
                       deadline=t0 + time_budget if time_budget else None,
                       on_prompt=lambda n: log(f"niah suite: {n}/{len(prompts)} prompts, {time.monotonic() - t0:.0f} s"))
        results: dict[str, dict[str, Any]] = {name: {"cells": c} for name, c in cells.items()}
    else:
        engine = dict(dict(max_model_len=longest, seed=0, gpu_memory_utilization=0.5, max_num_seqs=256,
                           enforce_eager=True, enable_prefix_caching=False), **(engine or {}))
        results = run_engine(model, methods, prompts, codec.decode, engine=engine,
                             log_path=log_path or "niah_suite_engine.log", timeout=timeout)
    counts: dict[str, int] = {}
    for m in methods:
        r = results[m.name]
        r["duo"] = m.duo
        if "cells" in r:
            r.update(summarize(r["cells"]))
            counts.update({f: v["total"] for f, v in r["formats"].items()})
            log(f"niah suite: {m.name:>10} {r['correct']}/{r['total']} ({r['accuracy']:.1%})")
    return dict(runner=runner, model=model, formats=[t.name for t in tasks],
                format_specs={t.name: {k: getattr(t, k) for k in ("needle", "filler", "variant", "chat", "needles",
                                                                 "queries")} for t in tasks},
                lengths=list(lengths), depths=list(depths), samples=samples, seed=seed, sink=sink, recent=recent,
                prompts_planned=len(prompts), prompts_per_format=counts, seconds=round(time.monotonic() - t0, 1),
                attention=("HF transformers float32 (duo: vllm_duo/eval/hf_duo.py)" if runner == "hf"
                           else "vLLM engine (full = FLASH_ATTN)"),
                accuracy={m: r.get("accuracy") for m, r in results.items()}, per_format=accuracy_table(results),
                methods=results)
