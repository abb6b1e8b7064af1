"""Synthetic multi-passkey samples: exact lengths, answer mask, passkeys in the context."""

from __future__ import annotations

import pytest

from tests.identify.conftest import word_tokenizer
from vllm_duo.errors import DuoConfigError
from vllm_duo.identify.data import PASSKEY_ALPHABET, PasskeyData, code_text, filler_text, parse_kinds


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def test_samples_have_their_length_answers_and_needles(tok):
    data = PasskeyData(tok, min_length=300, max_length=600, num_lengths=4, num_passkeys=3,
                       passkey_length=5, seed=1)
    assert list(data.lengths) == [300, 400, 500, 600]
    assert sorted(data.length_at(s) for s in range(4)) == [300, 400, 500, 600]  # one epoch
    batch = data.batch(7, batch_size=2)
    ids, mask = batch.input_ids, batch.answer_mask
    assert ids.shape == mask.shape == (2, data.length_at(7))
    for row, m in zip(ids.tolist(), mask.tolist()):
        start = m.index(True)
        assert all(m[start:]) and not any(m[:start])  # the answer block is the tail
        text = tok.decode(row)
        answers = tok.decode(row[start:])
        for ordinal in ("first", "second", "third"):
            assert f"the {ordinal} passkey to the vault" in tok.decode(row[:start])
            assert f"what is the {ordinal} passkey" in answers
        assert "book" in text
    assert (data.batch(7, 2).input_ids == ids).all()  # a pure function of (seed, step)
    assert not (data.batch(8, 2).input_ids.shape == ids.shape and (data.batch(8, 2).input_ids == ids).all())


def test_default_min_length_and_too_short_lengths(tok):
    data = PasskeyData(tok, min_length=None, max_length=4000, num_passkeys=2, passkey_length=4)
    assert data.lengths[0] == data.max_overhead + 1000
    with pytest.raises(DuoConfigError, match="--min-length must be"):
        PasskeyData(tok, min_length=100, max_length=4000, num_passkeys=10, passkey_length=32)


def test_filler_is_seeded_prose():
    import random

    a, b = filler_text(random.Random(3), 30), filler_text(random.Random(3), 30)
    assert a == b and a.count(".") >= 30 and "\n\n" in a


class _Chars:
    """One token per character: samples decode back to their exact text."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    @staticmethod
    def decode(ids) -> str:
        return "".join(map(chr, ids))


def test_passkey_kinds_and_fillers_vary_per_sample():
    """Mixed alphabets and haystacks, read back from the samples themselves: every sample keeps its
    exact length; its passkeys are all NATO words, all 3-digit groups or all 4-digit hex groups;
    across samples each alphabet and both haystacks (prose, code) appear."""
    import re

    data = PasskeyData(_Chars(), min_length=1500, max_length=2500, num_lengths=3, num_passkeys=2,
                       passkey_length=4, seed=5, passkey_kinds=("words", "digits", "hex"),
                       fillers=("story", "code"))
    kinds = {"words": lambda u: u in PASSKEY_ALPHABET, "digits": lambda u: re.fullmatch(r"\d{3}", u),
             "hex": lambda u: re.fullmatch(r"[0-9a-f]{4}", u)}
    alphabets, hays = set(), set()
    for step in range(40):
        batch = data.batch(step)
        ids, mask = batch.input_ids[0].tolist(), batch.answer_mask[0].tolist()
        assert len(ids) == data.length_at(step) and mask[-1] and not mask[0]
        context, answer = _Chars.decode(ids[:mask.index(True)]), _Chars.decode(ids[mask.index(True):])
        units = [u for key in re.findall(r"Passkey: ([^\n]*)", answer) for u in key.split()]
        assert len(units) == 2 * 4
        alphabets |= {next(k for k, ok in kinds.items() if all(ok(u) for u in units))}  # widths differ
        hays |= {"code" if "):\n" in context or " = " in context else "story"}
    assert alphabets == {"words", "digits", "hex"} and hays == {"story", "code"}


def test_reference_defaults_draw_the_same_samples(tok):
    """Adding kinds must not change what the reference settings train on (a shipped pattern's
    identification stays reproducible)."""
    a = PasskeyData(tok, min_length=300, max_length=600, num_lengths=4, num_passkeys=3, passkey_length=5, seed=1)
    b = PasskeyData(tok, min_length=300, max_length=600, num_lengths=4, num_passkeys=3, passkey_length=5, seed=1,
                    passkey_kinds=("words",), fillers=("story",))
    assert all((a.batch(s).input_ids == b.batch(s).input_ids).all() for s in range(6))


def test_unknown_kinds_are_refused_in_one_line(tok):
    with pytest.raises(DuoConfigError, match="--fillers must be a comma-separated list of story, code; got 'prose'"):
        parse_kinds("prose", ("story", "code"), "--fillers")
    assert parse_kinds("words, hex", ("words", "digits", "hex"), "--passkey-kinds") == ("words", "hex")
    with pytest.raises(DuoConfigError, match="passkey kinds must be among"):
        PasskeyData(tok, min_length=300, max_length=600, passkey_kinds=("emoji",))


def test_code_filler_is_seeded_code():
    import random

    a, b = code_text(random.Random(3), 20), code_text(random.Random(3), 20)
    assert a == b and a.count("\n") >= 20 and ("def " in a or "for " in a or "while " in a)
