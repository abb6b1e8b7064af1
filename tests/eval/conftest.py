"""Fixtures for the evaluation tools' CPU tests."""

from __future__ import annotations

import pytest

from tests.conftest import pattern_dir


@pytest.fixture
def pattern_llama3() -> str:
    return pattern_dir("Llama-3-8B-Instruct-Gradient-1048k")
