"""Typed run-log records: what read_jsonl yields, and their dict compatibility."""

import json
import math

import torch

import gradguard as gg
from gradguard.record import encode_float
from gradguard.runlog import typed


def _log(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.jsonl"
    with gg.Guard(model, opt, log=path) as guard:
        for k in range(12):
            opt.zero_grad()
            x = torch.randn(8, 3) * (1e4 if k == 10 else 1.0)  # one spike to log
            loss = model(x).pow(2).mean()
            loss.backward()
            guard.step(loss)
    return path


def test_read_jsonl_yields_typed_records_equal_to_the_lines(tmp_path):
    path = _log(tmp_path)
    recs = list(gg.read_jsonl(path))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [type(r).__name__ for r in recs[:2]] == ["Meta", "StepRecord"]
    assert isinstance(recs[-1], gg.Event) and recs[-1].kind == "verdict"
    assert recs[0].params == ["weight", "bias"]
    for rec, line in zip(recs, lines, strict=True):
        # the typed record is the line: same keys, same values (NaN/Inf as written)
        back = {k: (encode_float(v) if isinstance(v, float) else v)
                for k, v in rec.as_dict().items()}
        assert back == line
    steps = [r for r in recs if isinstance(r, gg.StepRecord)]
    assert [s.step for s in steps] == list(range(12))
    assert all(isinstance(s.loss, float) and isinstance(s.skipped, bool) for s in steps)
    assert steps[10].flagged and not steps[3].flagged
    spike = next(r for r in recs if isinstance(r, gg.Event) and r.kind == "grad_spike")
    assert spike.step == 10 and spike.action and "spiked" in spike.message


def test_typed_records_read_like_the_old_dicts():
    rec = typed({"type": "step", "step": 4, "loss": 0.5, "skipped": True, "norms": [1.0],
                 "future_key": 7})
    assert rec["type"] == "step" and rec["loss"] == 0.5 and rec.get("future_key") == 7
    assert rec.extra == {"future_key": 7} and "future_key" in rec
    assert rec.get("lr") is None and "lr" not in rec  # not logged: absent, as in the line
    assert isinstance(rec.get("norms"), list) and dict(rec)["skipped"] is True
    ev = typed({"type": "event", "step": 3, "kind": "rollback", "message": "m",
                "action": "rollback", "lr_scale": 0.3})
    assert ev.kind == "rollback" and ev["lr_scale"] == 0.3 and ev.get("origin_layer") is None
    assert typed({"type": "something-new", "x": 1}) == {"type": "something-new", "x": 1}


def test_a_foreign_or_hand_edited_line_gets_defaults_not_a_crash():
    rec = typed({"type": "step", "step": "7", "loss": None, "grad_norm": "big",
                 "skipped": 1})
    assert rec.step == -1 and math.isnan(rec.loss) and math.isnan(rec.grad_norm)
    assert rec.skipped is True and rec.lr_scale == 1.0
