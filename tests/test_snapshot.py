import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gradguard import snapshot as snap
from tests.conftest import backward, small_mlp


def make_snapshot(step=3, width=16):
    model = small_mlp(width=width)
    opt = torch.optim.Adam(model.parameters())
    backward(model)
    opt.step()
    return snap.take(step, model, list(model.parameters()), opt, {"x": torch.ones(2)}), model, opt


def test_roundtrip_through_disk(tmp_path):
    s, model, _opt = make_snapshot()
    path = snap.save_file(s, tmp_path / "a.pt")
    back = snap.load_file(path)
    assert back.step == 3
    for k, v in s.model.items():
        assert torch.equal(v, back.model[k])
    assert torch.equal(back.guard["x"], torch.ones(2))
    model2 = small_mlp(seed=9)
    opt2 = torch.optim.Adam(model2.parameters())
    snap.restore(back, model2, list(model2.parameters()), opt2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_corrupted_and_truncated_files_are_refused(tmp_path):
    s, *_ = make_snapshot()
    path = snap.save_file(s, tmp_path / "a.pt")
    data = bytearray(path.read_bytes())
    (tmp_path / "trunc.pt").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(snap.SnapshotError, match="truncated"):
        snap.load_file(tmp_path / "trunc.pt")
    # flip bytes inside the payload: the zip may still open, the checksum must not match
    i = data.find(b"PK", 200)
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    with pytest.raises(snap.SnapshotError):
        snap.load_file(tmp_path / "flip.pt")
    assert i != -1
    with pytest.raises(snap.SnapshotError, match="does not exist"):
        snap.load_file(tmp_path / "missing.pt")


def test_a_process_killed_mid_write_leaves_the_previous_snapshot_loadable(tmp_path):
    target = tmp_path / "snap.pt"
    s, *_ = make_snapshot(step=0)
    snap.save_file(s, target)
    writer = textwrap.dedent(f"""
        import torch
        from gradguard import snapshot as snap
        from tests.conftest import small_mlp
        model = small_mlp(width=512, depth=6)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        step = 1
        print("ready", flush=True)
        while True:
            snap.save_file(snap.take(step, model, list(model.parameters()), opt, {{}}),
                           {str(target)!r})
            step += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE,
                            cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    loaded = snap.load_file(target)  # the last completed write, never a torn one
    assert loaded.step >= 0
    leftovers = [p for p in tmp_path.iterdir() if p.name != "snap.pt"]
    assert all(p.name.endswith(".tmp") for p in leftovers)  # only temp files may remain
