"""Fixtures for the framework integration tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: a second intra-op thread buys nothing, and on a shared 2-core
    # machine it makes each step wait for a busy core (10x slower measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
