"""Passkey needle-in-a-haystack: prompts of exact token length, scoring, grid and heatmap.

Pure Python (plus matplotlib for the plot): prompts are built as token ids from any tokenizer
that offers ``encode(text) -> ids`` and ``decode(ids) -> text`` (:class:`HFCodec` wraps an HF
tokenizer), so every method gets byte-identical prompts and the needle sits at a known token.

The task is sized for a small model (SmolLM2-135M): the Landmark-attention passkey prompt (intro,
"The grass is green. ..." filler, the 5-digit key stated twice on its own line), asked for at the
end with the answer already begun, greedy; correct when the first number generated is the key.
The line layout matters for a 135M model: with a blank line before the question it takes the
question as a new document and invents a definition (full attention, HF transformers on CPU:
7/15 cells at 1K-4K); this layout scores 35/40 at 1K-7K x 5 depths x 2 (14/15 in the chat
template at 1K-4K).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from vllm_duo.errors import DuoConfigError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
         "Find it and memorize them. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "Question: What is the pass key?"
CHAT_QUESTION = "What is the pass key?"  # inside the user turn; the assistant turn begins ANSWER
ANSWER = "The pass key is"
DEFAULT_MODEL = "/tmp/models/smollm2-135m-instruct"  # the devkit's SmolLM2-135M-Instruct folder
_MARKER = "\x00NIAH_CONTENT\x00"


class Codec(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFCodec:
    """An HF tokenizer as a :class:`Codec` (no special tokens added by ``encode``)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def special_prefix(self) -> list[int]:
        """The ids the tokenizer puts before plain text (BOS), if any."""
        full, plain = self.tok.encode("x"), self.tok.encode("x", add_special_tokens=False)
        n = len(full) - len(plain)
        return list(full[:n]) if n > 0 and list(full[n:n + len(plain)]) == list(plain) else []

    def chat_wrap(self) -> tuple[str, str]:
        """(text before, text after) a user message in the chat template, generation prompt included."""
        if not getattr(self.tok, "chat_template", None):
            raise DuoConfigError("this tokenizer has no chat template; run with --chat-template off")
        text = self.tok.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False,
                                            add_generation_prompt=True)
        if text.count(_MARKER) != 1:
            raise DuoConfigError("the chat template rewrites the message text; run with --chat-template off")
        head, tail = text.split(_MARKER)
        return head, tail


@dataclass(frozen=True)
class NiahPrompt:
    ids: list[int]
    passkey: int
    length: int  # requested = len(ids)
    depth: float  # requested needle depth, fraction of the haystack before the needle
    needle_start: int  # token index of the needle's first token
    needle_end: int  # one past its last token
    actual_depth: float  # where it landed (sentence boundary nearest the requested depth)


class PromptBuilder:
    """Builds NIAH prompts of an exact token length, the needle at a sentence boundary.

    Layout, one line each: [prefix] INTRO / filler... / NEEDLE / ...filler / QUESTION / "Answer: "
    ANSWER; with a chat template: [chat head] INTRO / filler / NEEDLE / filler / CHAT_QUESTION
    [chat tail] ANSWER. ``prefix`` is the tokenizer's BOS (if any) without a chat template; with
    one, the template's own text carries it.
    """

    def __init__(self, codec: Codec, *, chat: tuple[str, str] | None = None,
                 prefix: Sequence[int] = ()):
        self.codec = codec
        enc = codec.encode
        if chat is None:
            self.head = list(prefix) + enc(INTRO + "\n")
            self.tail = enc("\n" + QUESTION + "\nAnswer: " + ANSWER)
        else:
            self.head = enc(chat[0]) + enc(INTRO + "\n")
            self.tail = enc("\n" + CHAT_QUESTION) + enc(chat[1]) + enc(ANSWER)
        self.units = [enc(" " + s) for s in FILLER]

    def _needle(self, passkey: int) -> tuple[list[int], list[int], list[int]]:
        """The needle on a line of its own, as (newline, sentence, newline)."""
        nl = self.codec.encode("\n")
        return nl, self.codec.encode(NEEDLE.format(key=passkey)), nl

    def build(self, length: int, depth: float, passkey: int) -> NiahPrompt:
        if not 0 <= depth <= 1:
            raise DuoConfigError(f"needle depth must be a fraction in [0, 1] (0.5, not 50), got {depth}")
        before, sentence, after = self._needle(passkey)
        n_fill = length - len(self.head) - len(self.tail) - len(before + sentence + after)
        if n_fill < 0:
            raise DuoConfigError(f"context length {length} is too short: the prompt without filler "
                                 f"already takes {length - n_fill} tokens")
        filler, bounds = self._filler(n_fill)
        at = min(bounds, key=lambda b: (abs(b - depth * n_fill), b))
        # At either end the head's or the tail's own newline separates the needle: no blank line
        # (the filler's surplus is cut from the front, so both ends stay sentence bounds).
        if 0 < n_fill and at in (0, n_fill):
            n_fill += len(before if at == 0 else after)
            filler, _ = self._filler(n_fill)
            needle = sentence + after if at == 0 else before + sentence
            at = 0 if at == 0 else n_fill
        else:
            needle = before + sentence + after
        ids = self.head + filler[:at] + needle + filler[at:] + self.tail
        start = len(self.head) + at
        return NiahPrompt(ids=ids, passkey=passkey, length=length, depth=depth, needle_start=start,
                          needle_end=start + len(needle),
                          actual_depth=at / n_fill if n_fill else depth)

    def _filler(self, n: int) -> tuple[list[int], list[int]]:
        """``n`` filler tokens and the sentence ends in them (0 and ``n`` included).

        Whole sentences, cycled; the surplus is cut from the front, so every boundary the
        needle can take ends a sentence (the fragment sits right after the intro).
        """
        out: list[int] = []
        ends: list[int] = []
        i = 0
        while len(out) < n:
            out.extend(self.units[i % len(self.units)])
            ends.append(len(out))
            i += 1
        cut = len(out) - n
        return out[cut:], [0] + [e - cut for e in ends if e > cut]


def grid_prompts(codec: Any, chat_template: bool, lengths: list[int], depths: list[float], samples: int,
                 seed: int) -> list[tuple[int, NiahPrompt]]:
    """(sample, prompt) for every cell of the grid: one builder for the engine and HF runs alike."""
    chat = codec.chat_wrap() if chat_template else None
    builder = PromptBuilder(codec, chat=chat, prefix=[] if chat else codec.special_prefix())
    return [(s, builder.build(n, d, passkey_for(seed, n, d, s)))
            for n in lengths for d in depths for s in range(samples)]


def passkey_for(seed: int, length: int, depth: float, sample: int) -> int:
    """A 5-digit key, the same for a cell in every run and every method."""
    return random.Random(f"{seed}:{length}:{depth}:{sample}").randint(10000, 99999)


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group() if m else None


def is_correct(text: str, passkey: int) -> bool:
    """The first number in the generated text is the key (the answer was begun in the prompt)."""
    return first_number(text) == str(passkey)


def grid_summary(cells: list[dict[str, Any]], lengths: list[int], depths: list[float]) -> dict[str, Any]:
    """Per-cell accuracy as rows = depths, columns = lengths, plus the overall accuracy."""
    grid = [[None] * len(lengths) for _ in depths]
    for di, d in enumerate(depths):
        for li, n in enumerate(lengths):
            hits = [c["correct"] for c in cells if c["length"] == n and c["depth"] == d]
            grid[di][li] = sum(hits) / len(hits) if hits else None
    return {"grid": grid, "accuracy": sum(c["correct"] for c in cells) / len(cells) if cells else 0.0,
            "correct": sum(c["correct"] for c in cells), "total": len(cells)}


def cell_record(prompt: NiahPrompt, sample: int, output: str) -> dict[str, Any]:
    rec = {k: v for k, v in asdict(prompt).items() if k != "ids"}
    rec.update(sample=sample, output=output, answer=first_number(output), correct=is_correct(output, prompt.passkey))
    return rec


def plot_grid(grid: list[list[float | None]], lengths: list[int], depths: list[float], path: str,
              title: str) -> None:
    """The paper's NIAH heatmap: x = context length, y = needle depth, green = found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#DDDDDD")
    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(lengths) + 2.5), max(3.0, 0.45 * len(depths) + 1.8)))
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [_k(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction correct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _k(n: int) -> str:
    return f"{n / 1000:g}K" if n >= 1000 else str(n)
