"""Fixtures for the framework integration tests."""

from __future__ import annotations

import pytest

from tests.conftest import single_thread


@pytest.fixture(autouse=True, scope="module")
def one_thread_module():
    with single_thread():
        yield


# Guard keywords a callback must refuse when it is built, not at the start of training
# (the Lightning and Hugging Face callbacks alike).
BAD_GUARD_KWARGS = [
    ({"on_spkie": "skip"}, r"'on_spkie' \(did you mean 'on_spike'\?\), not a Guard keyword"),
    ({"clip": "global"}, r"clip takes a gradguard.clip transform"),
    ({"rollback": True}, r"rollback takes a gradguard.Rollback"),
    ({"log": 5}, r"log= takes a file path"),
    ({"scaler": None}, r"takes 'scaler' from the Trainer"),
]
