"""Every ```python block of the README runs as written.

The first block is the setup the README says the others start from (``model``,
``optimizer``, ``loss_fn``, ``loader``): each later block runs in a fresh namespace after
it, in a temporary working directory (the examples write logs and checkpoints). The
distributed example calls ``init_process_group()`` as under torchrun; the test provides
torchrun's environment for a single process and tears the group down afterwards.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _title(code: str) -> str:
    first = next(line for line in code.splitlines() if line.strip())
    return first[:60]


def _run(code: str, scope: dict, index: int) -> None:
    exec(compile(code, f"README.md python block {index}", "exec"), scope)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 10
    assert "DataLoader" in BLOCKS[0] and "guard.step(loss, batch=(x, y))" in BLOCKS[0]


def test_the_readme_speaks_in_user_terms():
    # "the brief" is the project's internal source document, not something users have.
    assert not re.search(r"\bbrief\b", README.read_text(), re.I)


def test_setup_block_trains_and_logs(in_tmp):
    scope: dict = {}
    _run(BLOCKS[0], scope, 0)
    assert scope["info"].step == 95  # 3 epochs of 32 batches (the last one of 8)
    assert scope["guard"]._closed
    rows = [r for r in __import__("gradguard").read_jsonl("runs/exp0.jsonl")
            if r["type"] == "step"]
    assert len(rows) == 96


@pytest.mark.parametrize("index", range(1, len(BLOCKS)), ids=[_title(b) for b in BLOCKS[1:]])
def test_readme_block_runs(index, in_tmp, monkeypatch, one_thread):
    code = BLOCKS[index]
    distributed = "init_process_group" in code
    if distributed:
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                     "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(k, v)
    scope: dict = {}
    _run(BLOCKS[0], scope, 0)
    try:
        _run(code, scope, index)
    finally:
        guard = scope.get("guard")
        if guard is not None:
            guard.close()
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
