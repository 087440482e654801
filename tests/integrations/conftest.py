"""Fixtures for the framework integration tests."""

from __future__ import annotations

import pytest

from tests.conftest import single_thread


@pytest.fixture(autouse=True, scope="module")
def one_thread_module():
    with single_thread():
        yield
