"""Synthetic multi-passkey retrieval data, as the reference's ``MultiplePasskeyRetrievalDataset``.

Passkeys (32 NATO-alphabet words each) are inserted at random depths into a long filler text;
the answer block asks for every passkey in turn. The reference's BookSum haystack is a download
(now a dead link), so the filler here is generated locally: seeded, grammatical story sentences
from small word lists. The model's own teacher outputs are the target, so the filler only needs
to look like ordinary prose.

Beyond the reference (its defaults: NATO-word passkeys in story prose), ``passkey_kinds`` and
``fillers`` draw each sample's passkey alphabet (words, digit groups, hex groups) and haystack
(story prose, code-like text) at random, so the gates see retrieval of more than one needle shape
in more than one kind of context.

Every sample of one step has exactly the step's length (no padding); sample ``step`` depends only
on (seed, step), which makes resuming exact without saving any data-loader state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from vllm_duo.errors import DuoConfigError

PASSKEY_ALPHABET = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
                    "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
                    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth",
            "seventeenth", "eighteenth", "nineteenth", "twentieth")
NEEDLE = "Remember this sequence of words, it's the {ordinal} passkey to the vault: "
QUESTION = "Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey: "
PROMPT_START = "This is a very long story book: <book> "
PROMPT_END = " </book>.\n\n"
SEPARATOR = "\n\n"
MIN_FILLER = 64  # filler tokens a sample must at least have
DEFAULT_FILLER = 1000  # default shortest filler, as the reference's context_length_min

_NAMES = ("Mara", "Tobias", "Elena", "Iker", "Nadia", "Oskar", "Priya", "Samuel", "Lucia", "Bram",
          "Ines", "Felix", "Hana", "Jonas", "Rosa", "Viktor", "Amal", "Teodor", "Wren", "Colm")
_PLACES = ("the harbour", "the old mill", "the village square", "the orchard", "the library",
           "the river bank", "the market", "the lighthouse", "the forest path", "the chapel",
           "the bakery", "the railway station", "the hill farm", "the school yard", "the quarry")
_NOUNS = ("letter", "lantern", "basket", "map", "key", "boat", "coat", "song", "promise", "storm",
          "garden", "horse", "window", "story", "bridge", "candle", "rope", "bell", "book", "clock",
          "ladder", "kettle", "wagon", "photograph", "violin", "blanket")
_ADJS = ("quiet", "heavy", "bright", "cold", "narrow", "ancient", "gentle", "restless", "golden",
         "broken", "distant", "careful", "small", "strange", "warm", "crooked", "patient", "faded")
_VERBS = ("carried", "found", "watched", "repaired", "remembered", "painted", "sold", "hid",
          "opened", "followed", "described", "borrowed", "noticed", "wrapped", "mended", "counted")
_ADVS = ("slowly", "quietly", "at dawn", "before supper", "without a word", "once again",
         "in the rain", "with great care", "late at night", "for the last time", "as usual")
_TEMPLATES = (
    "{name} {verb} the {adj} {noun} near {place} {adv}.",
    "Nobody in {place} had seen a {noun} so {adj} before.",
    "When {name} reached {place}, the {noun} was already {adj}.",
    "{name} told {name2} about the {adj} {noun}, and {name2} listened {adv}.",
    "The {noun} that {name} {verb} {adv} belonged to someone from {place}.",
    "It was a {adj} evening, and {place} smelled of rain and smoke.",
    "\"Do you still have the {noun}?\" asked {name}. {name2} shook their head {adv}.",
    "For many years {name} {verb} the same {adj} {noun} every season.",
    "Later, {name2} said that the {noun} had never been {adj} at all.",
    "The road to {place} was {adj}, so {name} walked {adv}.",
    "{name} and {name2} {verb} a {noun} together, though neither spoke of it.",
    "Some people in {place} still remember how {name} {verb} the {noun}.",
)


# Passkey alphabets: one unit per "word" of a passkey. Digit and hex units have a fixed width, so
# a unit never takes more tokens than its characters plus the separating space.
PASSKEY_UNITS = {
    "words": PASSKEY_ALPHABET,
    "digits": tuple(f"{i:03d}" for i in range(1000)),
    "hex": None,  # 4 random hex digits, drawn per unit
}
FILLERS = ("story", "code")
_HEX = "0123456789abcdef"
_IDENTS = ("count", "total", "items", "buffer", "offset", "result", "value", "index", "window", "cache",
           "record", "status", "limit", "cursor", "payload", "handle", "config", "queue", "token", "score")
_CODE_TEMPLATES = (
    "def {f}_{g}({a}, {b}):\n    {c} = {a} * {n} + {b}\n    return {c}\n",
    "for {a} in range({n}):\n    {b}[{a}] = {f}_{g}({a}, {c})\n",
    "if {a} > {n}:\n    {b} = {c} - {a}\nelse:\n    {b} = {c} + {n}\n",
    "{a} = [{f}_{g}(x, {n}) for x in {b} if x % {m} == 0]\n",
    "class {F}{G}:\n    def __init__(self, {a}):\n        self.{a} = {a}\n        self.{b} = {n}\n",
    "while {a} < {n}:\n    {a} += {m}\n    {b}.append({a})\n",
    "# {f} the {g} before the {a} is read\n{c} = {{'{a}': {n}, '{b}': {m}}}\n",
)


def passkey_unit(kind: str, rng: np.random.Generator) -> str:
    if kind == "hex":
        return "".join(rng.choice(list(_HEX), 4))
    return str(rng.choice(PASSKEY_UNITS[kind]))


def parse_kinds(value: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), each one of ``allowed``; one-line error naming the flag otherwise."""
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in allowed]
    if not kinds or bad:
        raise DuoConfigError(f"{flag} must be a comma-separated list of {', '.join(allowed)}; got {value!r}")
    return kinds


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def filler_text(rng: random.Random, sentences: int) -> str:
    """``sentences`` sentences of seeded story prose, in paragraphs of 4-8 sentences."""
    paras, cur = [], []
    for _ in range(sentences):
        name, name2 = rng.sample(_NAMES, 2)
        cur.append(rng.choice(_TEMPLATES).format(
            name=name, name2=name2, place=rng.choice(_PLACES), noun=rng.choice(_NOUNS),
            adj=rng.choice(_ADJS), verb=rng.choice(_VERBS), adv=rng.choice(_ADVS)))
        if len(cur) >= rng.randint(4, 8):
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


def code_text(rng: random.Random, blocks: int) -> str:
    """``blocks`` seeded snippets of Python-like code: a haystack unlike prose."""
    out = []
    for _ in range(blocks):
        a, b, c, f, g = rng.sample(_IDENTS, 5)
        out.append(rng.choice(_CODE_TEMPLATES).format(
            a=a, b=b, c=c, f=f, g=g, F=f.title(), G=g.title(), n=rng.randint(2, 999), m=rng.randint(2, 9)))
    return "\n".join(out)


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, S] int64
    answer_mask: torch.Tensor  # [B, S] bool: the answer block, where the loss is taken


class PasskeyData:
    """Samples for identification steps; ``lengths`` are total sequence lengths in tokens."""

    def __init__(self, tokenizer: Tokenizer, *, min_length: int | None, max_length: int,
                 num_lengths: int = 50, num_passkeys: int = 10, passkey_length: int = 32,
                 depth_intervals: int = 1000, min_depth: float = 0.05, max_depth: float = 0.95,
                 seed: int = 42, passkey_kinds: tuple[str, ...] = ("words",),
                 fillers: tuple[str, ...] = ("story",)) -> None:
        if not 1 <= num_passkeys <= len(ORDINALS):
            raise DuoConfigError(f"--num-passkeys must be in [1, {len(ORDINALS)}], got {num_passkeys}")
        if passkey_length < 1 or num_lengths < 1 or depth_intervals < num_passkeys:
            raise DuoConfigError(
                f"need passkey_length >= 1, num_lengths >= 1 and depth_intervals >= num_passkeys; got "
                f"{passkey_length}, {num_lengths}, {depth_intervals}")
        if not 0 <= min_depth <= max_depth <= 1:
            raise DuoConfigError(f"need 0 <= min depth <= max depth <= 1, got {min_depth}, {max_depth}")
        bad = [k for k in passkey_kinds if k not in PASSKEY_UNITS] + [f for f in fillers if f not in FILLERS]
        if not passkey_kinds or not fillers or bad:
            raise DuoConfigError(f"passkey kinds must be among {', '.join(PASSKEY_UNITS)} and fillers among "
                                 f"{', '.join(FILLERS)}; got {list(passkey_kinds)}, {list(fillers)}")
        self.tok, self.seed = tokenizer, seed
        self.kinds, self.fillers = tuple(passkey_kinds), tuple(fillers)
        self.num_passkeys, self.passkey_length = num_passkeys, passkey_length
        enc = self._enc
        self.start, self.end, self.sep = enc(PROMPT_START, True), enc(PROMPT_END), enc(SEPARATOR)
        self.needles = [enc(NEEDLE.format(ordinal=o)) for o in ORDINALS[:num_passkeys]]
        self.questions = [enc(QUESTION.format(ordinal=o)) for o in ORDINALS[:num_passkeys]]
        words = max(max(len(enc(w)), len(enc(" " + w))) for w in PASSKEY_ALPHABET)
        word = max(words if k == "words" else 5 for k in self.kinds)  # " " + 4 characters at most
        self.max_overhead = (len(self.start) + len(self.end) + 3 * num_passkeys * len(self.sep)
                             + sum(map(len, self.needles)) + sum(map(len, self.questions))
                             + 2 * num_passkeys * (word * passkey_length + 1))
        if min_length is None:
            min_length = min(max_length, self.max_overhead + DEFAULT_FILLER)
        if min_length < self.max_overhead + MIN_FILLER or min_length > max_length:
            raise DuoConfigError(
                f"lengths {min_length}..{max_length} do not fit: {num_passkeys} passkeys of "
                f"{passkey_length} words take up to {self.max_overhead} tokens, so --min-length must be "
                f">= {self.max_overhead + MIN_FILLER} and <= --max-length; raise the lengths or lower "
                f"--num-passkeys / --passkey-length")
        self.lengths = np.linspace(min_length, max_length, num_lengths).astype(np.int64)
        self.depths = np.linspace(min_depth, max_depth, depth_intervals)
        self.haystacks = {f: self._haystack(max_length, f) for f in self.fillers}

    def _enc(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special))

    def _haystack(self, tokens: int, kind: str) -> np.ndarray:
        rng, ids = random.Random(self.seed), []
        while len(ids) < tokens:
            ids += self._enc((filler_text(rng, 200) if kind == "story" else code_text(rng, 60)) + "\n\n")
        return np.asarray(ids, dtype=np.int64)

    def length_at(self, step: int) -> int:
        """Lengths are visited in a fresh random order every ``len(lengths)`` steps."""
        n = len(self.lengths)
        perm = np.random.default_rng([self.seed, step // n]).permutation(n)
        return int(self.lengths[perm[step % n]])

    def batch(self, step: int, batch_size: int = 1) -> Batch:
        length = self.length_at(step)
        rng = np.random.default_rng([self.seed, step, 1])
        ids, masks = zip(*(self._sample(rng, length) for _ in range(batch_size)))
        return Batch(torch.tensor(np.stack(ids)), torch.tensor(np.stack(masks)))

    def _sample(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        # The reference's draw order when only its defaults are chosen: same samples as before.
        kind = self.kinds[int(rng.integers(len(self.kinds)))] if len(self.kinds) > 1 else self.kinds[0]
        haystack = self.haystacks[self.fillers[int(rng.integers(len(self.fillers)))]
                                  if len(self.fillers) > 1 else self.fillers[0]]
        if kind == "words":
            keys = [self._enc(" ".join(rng.choice(PASSKEY_ALPHABET, self.passkey_length)))
                    for _ in range(self.num_passkeys)]
        else:
            keys = [self._enc(" ".join(passkey_unit(kind, rng) for _ in range(self.passkey_length)))
                    for _ in range(self.num_passkeys)]
        needles = [self.sep + n + k + self.sep for n, k in zip(self.needles, keys)]
        answer = [t for q, k in zip(self.questions, keys) for t in q + k + self.sep]
        filler = length - len(self.start) - len(self.end) - len(answer) - sum(map(len, needles))
        offset = int(rng.integers(0, len(haystack) - filler + 1))
        hay = haystack[offset:offset + filler].tolist()
        depths = np.sort(rng.choice(self.depths, self.num_passkeys, replace=False))
        context, last = list(self.start), 0
        for depth, needle in zip(depths, needles):
            point = int(filler * depth)
            context += hay[last:point] + needle
            last = point
        context += hay[last:] + self.end
        ids = np.asarray(context + answer, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(context):] = True
        assert len(ids) == length, (len(ids), length)
        return ids, mask
