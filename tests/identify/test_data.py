"""Synthetic multi-passkey samples: exact lengths, answer mask, passkeys in the context."""

from __future__ import annotations

import pytest

from tests.identify.conftest import word_tokenizer
from vllm_duo.errors import DuoConfigError
from vllm_duo.identify.data import PasskeyData, filler_text


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
