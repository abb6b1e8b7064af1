"""Synthetic multi-passkey samples: exact lengths, answer mask, passkeys in the context."""

from __future__ import annotations

import pytest

from tests.identify.conftest import word_tokenizer
from vllm_duo.errors import DuoConfigError
from vllm_duo.identify.data import PasskeyData, code_text, filler_text, parse_kinds


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


def test_passkey_kinds_and_fillers_vary_per_sample(tok):
    """Mixed alphabets and haystacks: every sample keeps its exact length, and across samples each
    alphabet (words from the NATO list, 3-digit groups, 4-digit hex groups) and haystack appears."""
    import numpy as np

    data = PasskeyData(tok, min_length=400, max_length=700, num_lengths=3, num_passkeys=2, passkey_length=4,
                       seed=5, passkey_kinds=("words", "digits", "hex"), fillers=("story", "code"))
    alphabets, hays = set(), set()
    for step in range(40):
        rng = np.random.default_rng([data.seed, step, 1])
        kind = data.kinds[int(rng.integers(3))]
        filler = data.fillers[int(rng.integers(2))]
        alphabets.add(kind)
        hays.add(filler)
        ids, mask = data.batch(step).input_ids[0], data.batch(step).answer_mask[0]
        assert len(ids) == data.length_at(step) and mask.any()
    assert alphabets == {"words", "digits", "hex"} and hays == {"story", "code"}
    # the passkey units really come from the drawn alphabet (digits: 3 characters, all digits)
    from vllm_duo.identify.data import passkey_unit

    rng = np.random.default_rng(0)
    assert all(len(u) == 3 and u.isdigit() for u in (passkey_unit("digits", rng) for _ in range(50)))
    assert all(len(u) == 4 and set(u) <= set("0123456789abcdef") for u in (passkey_unit("hex", rng) for _ in range(50)))


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
