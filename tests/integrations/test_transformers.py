"""GradGuardCallback inside a real Hugging Face ``Trainer.train`` (tiny BERT, CPU, offline)."""

from __future__ import annotations

import math
import os

import pytest
import torch

import gradguard as gg

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
pytest.importorskip("gensim", reason="the Lee corpus ships with gensim")

from gradguard.integrations.transformers import STATE_FILE, GradGuardCallback  # noqa: E402
from gradguard.scenarios.data import lee_text  # noqa: E402
from tests.integrations.conftest import BAD_GUARD_KWARGS  # noqa: E402

WINDOW, BATCH, STEPS = 16, 16, 40
# transformers 5.x can keep batches in dataset order, which pins the bad batch's step.
SEQUENTIAL = "train_sampling_strategy" in transformers.TrainingArguments.__dataclass_fields__


@pytest.fixture(scope="module")
def corpus():
    """Character windows of the Lee corpus; target: does the window open on a vowel."""
    text = lee_text()[: WINDOW * 1600]
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    windows = [text[i : i + WINDOW] for i in range(0, len(text) - WINDOW + 1, WINDOW)]
    ids = torch.tensor([[vocab[c] for c in w] for w in windows])
    vowel = torch.tensor([float(w[0] in "aeiouAEIOU") for w in windows])
    return len(vocab), ids, (vowel - vowel.mean()) / vowel.std()


def dataset(ids, target, bad=()):
    rows = [{"input_ids": i, "labels": t.clone()} for i, t in zip(ids, target, strict=True)]
    for k in bad:
        rows[k]["labels"] = torch.tensor(math.nan)  # a corrupt record
    return rows


def tiny_bert(vocab):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=WINDOW, num_labels=1)
    return transformers.BertForSequenceClassification(cfg)


def train(model, rows, out, callbacks=(), max_grad_norm=0.0, resume=None, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(out), learning_rate=3e-3,
        per_device_train_batch_size=kw.pop("per_device_train_batch_size", BATCH),
        max_grad_norm=max_grad_norm, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        logging_strategy=kw.pop("logging_strategy", "no"),
        save_strategy=kw.pop("save_strategy", "no"),
        dataloader_num_workers=0,
        **({"train_sampling_strategy": "sequential"} if SEQUENTIAL else {}), **kw)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                   callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def mse(model, ids, target):
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(input_ids=ids).logits[:, 0], target).item()


def finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_guard_skips_the_bad_batch_and_trains(corpus, tmp_path):
    vocab, ids, target = corpus
    n = BATCH * STEPS
    tr_ids, tr_y, te_ids, te_y = ids[:n], target[:n], ids[n:], target[n:]
    model = tiny_bert(vocab)
    cb = GradGuardCallback(log=tmp_path / "guard.jsonl")
    train(model, dataset(tr_ids, tr_y, bad=[330]), tmp_path / "out", [cb], max_steps=STEPS)
    assert finite(model)
    assert mse(model, te_ids, te_y) < 0.3  # predicting the mean scores 1.0
    guard = cb.guard
    assert guard.steps == guard.total_steps == STEPS  # (told the Trainer's plan)
    [ev] = [e for e in guard.recorder.events if e["kind"] == "nonfinite"]
    assert ev["action"] == "skip"
    assert ev["step"] == 330 // BATCH or not SEQUENTIAL
    rows = [r for r in gg.read_jsonl(tmp_path / "guard.jsonl") if r["type"] == "step"]
    bad = rows[ev["step"]]
    assert len(rows) == STEPS and bad["skipped"] and math.isnan(bad["loss"])


def test_unguarded_trainer_ends_with_nan_weights(corpus, tmp_path):
    vocab, ids, target = corpus
    model = tiny_bert(vocab)
    train(model, dataset(ids[:160], target[:160], bad=[40]), tmp_path, max_grad_norm=1.0,
          max_steps=6)
    assert not finite(model)


def test_requires_max_grad_norm_zero(corpus, tmp_path):
    vocab, ids, target = corpus
    with pytest.raises(gg.ConfigError, match="max_grad_norm=0"):
        train(tiny_bert(vocab), dataset(ids[:32], target[:32]), tmp_path, [GradGuardCallback()],
              max_grad_norm=1.0, max_steps=1)


def test_guard_state_travels_with_trainer_checkpoints(corpus, tmp_path):
    vocab, ids, target = corpus
    rows = dataset(ids[:160], target[:160], bad=[40])
    cb = GradGuardCallback()
    train(tiny_bert(vocab), rows, tmp_path, [cb], max_steps=6, save_strategy="steps",
          save_steps=6)
    assert (tmp_path / "checkpoint-6" / STATE_FILE).exists()
    assert int(cb.guard.skipped) == 1
    cb2 = GradGuardCallback()
    train(tiny_bert(vocab), rows, tmp_path, [cb2], max_steps=9,
          resume=str(tmp_path / "checkpoint-6"))
    assert cb2.guard.steps == 9  # continued from step 6
    assert int(cb2.guard.skipped) == 1
    # From a checkpoint outside output_dir, named in the arguments too: the callback is
    # told the step, not the folder.
    cb3 = GradGuardCallback()
    ckpt = str(tmp_path / "checkpoint-6")
    train(tiny_bert(vocab), rows, tmp_path / "elsewhere", [cb3], max_steps=9, resume=ckpt,
          resume_from_checkpoint=ckpt)
    assert cb3.guard.steps == 9 and int(cb3.guard.skipped) == 1


def test_rollback_restores_model_optimizer_and_scheduler(corpus, tmp_path):
    vocab, ids, target = corpus
    model = tiny_bert(vocab)
    # (watch_batch=False: the bad label is then the model's, which is rolled back; a
    # watched one is the data's, skipped without, see the test below)
    cb = GradGuardCallback(on_nonfinite="rollback", watch_batch=False,
                           rollback=gg.Rollback(every=2, clean_window=1, skip_batches=1))
    train(model, dataset(ids[:160], target[:160], bad=[100]), tmp_path, [cb], max_steps=10)
    guard = cb.guard
    assert guard.rollbacks == 1 and finite(model)
    ev = next(e for e in guard.recorder.events if e["kind"] == "rollback")
    assert ev["to_step"] == 4 or not SEQUENTIAL  # bad batch 6, last good snapshot at step 4
    assert guard.steps == 9  # one Trainer step dropped after the rollback


def test_divergence_raises_and_unhooks(corpus, tmp_path):
    vocab, ids, target = corpus
    model = tiny_bert(vocab)
    cb = GradGuardCallback(policy=gg.Policy(max_consecutive_skips=2))
    rows = dataset(ids[:64], target[:64], bad=range(16, 64))  # every batch after the first
    with pytest.raises(gg.TrainingDivergedError):
        train(model, rows, tmp_path, [cb], max_steps=4)
    assert cb._gate is None and not model._forward_hooks and not model._forward_pre_hooks
    assert finite(model)


def test_a_shard_of_missing_labels_is_the_datas(corpus, tmp_path):
    # The Trainer calls model(**inputs): the callback watches them, labels included, so
    # a run of batches with a missing (NaN) label is skipped, with no rollback or LR cut.
    if not SEQUENTIAL:
        pytest.skip("needs batches in dataset order (transformers 5.x)")
    vocab, ids, target = corpus
    model = tiny_bert(vocab)
    cb = GradGuardCallback(log=None, rollback=gg.Rollback(every=5))
    bad = [BATCH * b + 3 for b in range(10, 20)]  # one record in each of batches 10-19
    train(model, dataset(ids[:BATCH * 30], target[:BATCH * 30], bad=bad), tmp_path, [cb],
          max_steps=30)
    guard = cb.guard
    assert guard.rollbacks == 0 and guard.lr.scale == 1 and int(guard.skipped) == 10
    data = [e["step"] for e in guard.recorder.events if e.get("data")]
    assert data == list(range(11, 20))  # (on a CPU the first NaN step arms the watch)


def tiny_lm(vocab):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=WINDOW)
    return transformers.LlamaForCausalLM(cfg)


def test_accumulated_causal_lm_losses_are_the_trainers_own(corpus, tmp_path):
    # A causal LM takes num_items_in_batch: each micro-batch's loss is already divided by
    # the whole step's tokens. Averaged, the guard's loss was a quarter of the Trainer's,
    # and each epoch's short last step (one micro-batch) was skipped as a loss spike.
    vocab, ids, _ = corpus
    rows = [{"input_ids": i, "labels": i.clone()} for i in ids[: 4 * (4 * 10 + 1)]]
    cb = GradGuardCallback()
    trainer = train(tiny_lm(vocab), rows, tmp_path, [cb], per_device_train_batch_size=4,
                    gradient_accumulation_steps=4, num_train_epochs=2,
                    logging_strategy="steps", logging_steps=1)
    ours = [r["loss"] for r in cb.guard.recorder.rows]
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(ours) == len(theirs) == 22
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert int(cb.guard.skipped) == 0


class _TupleOut(torch.nn.Module):
    """A model that returns a tuple (``return_dict=False``): the loss first, with labels."""

    def __init__(self, vocab):
        super().__init__()
        self.bert = tiny_bert(vocab)

    def forward(self, input_ids, labels=None):
        return self.bert(input_ids=input_ids, labels=labels, return_dict=False)


def test_a_tuple_output_gives_its_loss_and_no_loss_at_all_is_said(corpus, tmp_path, caplog):
    vocab, ids, target = corpus
    rows = dataset(ids[:64], target[:64])
    cb = GradGuardCallback()
    train(_TupleOut(vocab), rows, tmp_path, [cb], max_steps=3)
    assert all(math.isfinite(r["loss"]) for r in cb.guard.recorder.rows)
    # A loss computed outside the model (here: compute_loss_func) is none the guard sees.
    cb = GradGuardCallback()
    with caplog.at_level("WARNING", logger="gradguard"):
        train(tiny_bert(vocab), rows, tmp_path, [cb], max_steps=3)
        trainer = transformers.Trainer(
            model=tiny_bert(vocab), train_dataset=rows, callbacks=[cb],
            compute_loss_func=lambda out, labels, num_items_in_batch=None:
                torch.nn.functional.mse_loss(out.logits[:, 0], labels),
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=3,
                max_grad_norm=0.0, report_to=[], use_cpu=True, disable_tqdm=True,
                logging_strategy="no", save_strategy="no"))
        trainer.train()
    assert "the model's output holds no loss" in caplog.text


def test_a_checkpoint_from_other_settings_names_the_callbacks_way_out(corpus, tmp_path):
    vocab, ids, target = corpus
    rows = dataset(ids[:160], target[:160])
    train(tiny_bert(vocab), rows, tmp_path, [GradGuardCallback()], max_steps=6,
          save_strategy="steps", save_steps=6)
    cb = GradGuardCallback(clip=gg.clip.GlobalNorm(1.0))
    with pytest.raises(gg.ConfigError, match=f"delete the checkpoint's {STATE_FILE}"):
        train(tiny_bert(vocab), rows, tmp_path, [cb], max_steps=9,
              resume=str(tmp_path / "checkpoint-6"))
    assert cb.guard._closed  # (not left hooked on the optimizer)


@pytest.mark.parametrize("kwargs, match", BAD_GUARD_KWARGS)
def test_the_callback_checks_its_guard_keywords_when_built(kwargs, match):
    # (before, a typo surfaced only at the start of training, after the Trainer's set-up)
    with pytest.raises(gg.ConfigError, match=match):
        GradGuardCallback(**kwargs)
