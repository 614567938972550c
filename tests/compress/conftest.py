"""The compression tests' trained models: the session's ``trained_llamas`` (tests/conftest.py), a tiny
Llama base pretrained with the project's own code and two experts fine-tuned on different llmmix tasks."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trained(trained_llamas):
    return trained_llamas
