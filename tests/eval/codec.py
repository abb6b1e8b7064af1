"""A tokenizer stand-in for CPU tests: words, punctuation and trailing space as tokens, lossless."""

from __future__ import annotations

import re
from collections.abc import Sequence

_TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")


class WordCodec:
    """Each token keeps its leading whitespace, so decode(encode(t)) == t for any text."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _TOKEN.findall(text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.words)
                self.words.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.words[i] for i in ids)
