"""The doctor's checks; each returns findings with numbers, layers and a concrete fix."""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..fixes.init import reinit, spectral_radius
from ..record import read_jsonl
from ..runlog import Event, StepRecord
from .confirm import confirm, unconfirmed
from .findings import Diagnosis, Finding
from .lr_find import Batch, as_batch, cycle_batches, is_batch, lr_find
from .probe import ProbeResult, probe
from .trial import Trials, _features, _leaves, feature_dim, group_lrs

__all__ = ["diagnose", "diagnose_run"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
          nn.InstanceNorm1d, nn.InstanceNorm2d, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def _sev(value: float, warn: float, crit: float) -> str | None:
    return "critical" if value >= crit else ("warning" if value >= warn else None)


# -- 1. signal propagation ------------------------------------------------------------


def check_init(model: nn.Module, batch: Batch, loss_fn: Callable[[Tensor, Tensor], Tensor],
               pr: ProbeResult, warn: float = 30.0, crit: float = 300.0) -> list[Finding]:
    """Activation and gradient std across depth (Glorot & Bengio 2010; He et al. 2015)."""
    fr, br = pr.forward_ratio(), pr.backward_ratio()
    if fr is None and br is None:
        return []
    worst = max(abs(math.log10(r)) for r in (fr, br) if r is not None and r > 0)
    sev = _sev(10**worst, warn, crit)
    if sev is None:
        return []
    fixed = copy.deepcopy(model)
    rep = reinit(fixed, "auto")
    after = probe(fixed, batch, loss_fn)
    fa, ba = after.forward_ratio(), after.backward_ratio()
    wl = pr.weight_layers()
    gains = [wl[i].out_std / wl[i - 1].out_std for i in range(1, len(wl))
             if wl[i - 1].out_std > 0]
    typical_gain = math.exp(sum(math.log(g) for g in gains if g > 0) / max(1, len(gains)))
    direction = []
    if fr is not None and abs(math.log10(fr)) >= math.log10(warn):
        direction.append("activations " + ("grow" if fr > 1 else "shrink") +
                         f" {max(fr, 1 / fr):.3g}× from the first to the last layer")
    if br is not None and abs(math.log10(br)) >= math.log10(warn):
        direction.append("gradients " + ("explode" if br > 1 else "vanish") +
                         f" {max(br, 1 / br):.3g}× from the output back to the input")
    return [Finding(
        "init", sev, "weight initialisation: " + "; ".join(direction),
        evidence={"forward_std_ratio": fr, "backward_grad_ratio": br,
                  "typical_layer_gain": typical_gain,
                  "layer_out_std": {lp.name: lp.out_std for lp in wl},
                  "after_auto_reinit": {"forward_std_ratio": fa, "backward_grad_ratio": ba}},
        layers=[lp.name for lp in wl],
        fix=("re-initialise with the scheme matching each layer's activation (Kaiming for "
             "ReLU-like, Xavier for tanh/sigmoid); on this batch that gives forward ratio "
             f"{_fmt(fa)} and gradient ratio {_fmt(ba)}. Changes: {len(rep.layers)} layers"),
        fix_code='gg.fixes.reinit(model, scheme="auto")',
        score=worst,
    )]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


# -- 2. learning rate -----------------------------------------------------------------


def check_lr(model: nn.Module, optimizer: torch.optim.Optimizer, data: Any,
             loss_fn: Callable[[Tensor, Tensor], Tensor], num_iter: int = 100
             ) -> tuple[list[Finding], dict[str, Any]]:
    """LR range test on copies (Smith 2017): where the loss diverges, and a suggestion.

    The measurements only: whether the LR is a problem is judged from training trials
    (:mod:`gradguard.doctor.confirm`), since a fast ramp puts the divergence point late.
    """
    try:
        res = lr_find(model, optimizer, data, loss_fn, num_iter=num_iter)
    except Exception as e:  # an exotic optimizer we cannot clone: say so, do not crash
        return [Finding("learning_rate", "info", f"LR range test not run: {e}",
                        fix="run gradguard lr-find with a standard optimizer")], {}
    # (The range test ramps every group together: the largest group LR is compared.)
    return [], {"user_lr": max(group_lrs(optimizer)),
                "diverges_at": res.diverged_at, "suggested": res.suggested,
                "min_loss_lr": res.min_loss_lr}


# -- 3. input scale -------------------------------------------------------------------


def check_inputs(batches: list[Batch], model: nn.Module | None = None
                 ) -> tuple[list[Finding], dict[str, Any]]:
    """Unnormalised inputs and targets (LeCun et al. 1998, "Efficient BackProp", sec. 4.3).

    Args:
        batches: a sample of the data.
        model: the model the inputs feed (its first layer says which axis holds features
            in 3-D inputs); None: channels on axis 1.

    Returns:
        The findings (each names in ``evidence["standardise"]`` what it would standardise:
        "inputs" or "targets") and the measurements.
    """
    out: list[Finding] = []
    meas: dict[str, Any] = {}
    xs = [b[0] for b in batches if torch.is_floating_point(b[0])]
    if xs and len({x.dim() for x in xs}) == 1:
        out += _input_findings(xs, feature_dim(model, xs[0]), meas)
    # Targets are checked whatever the inputs are (token ids in, a price out).
    ys = [b[1] for b in batches if torch.is_floating_point(b[1]) and b[1].dim() >= 1]
    if ys and len({y[0].numel() for y in ys}) == 1:
        y = torch.cat([v.detach().float().reshape(len(v), -1) for v in ys])
        y = y[torch.isfinite(y).all(1)]
        if len(y) > 1:
            ymax = float((y.mean(0).abs() + y.std(0)).max())
            meas["target_scale"] = ymax
            sev = _sev(ymax, 10.0, 1000.0)
            if sev:
                out.append(Finding(
                    "input_scale", sev,
                    f"regression targets are large (|mean| + std up to {ymax:.3g}): the first "
                    "gradients are that much larger",
                    evidence={"target_scale": ymax, "standardise": "targets"},
                    # (Train on standardised targets: adding the mean to the outputs
                    # would leave the loss, and its gradient, in the raw units.)
                    fix="train on standardised targets, (y - mean) / std, and map "
                        "predictions back with · std + mean (gg.fixes.Standardizer's "
                        "transform and inverse_targets)",
                    fix_code="std = gg.fixes.Standardizer.fit(loader, targets=True); "
                             "x, y = std.transform((x, y)); "
                             "pred = std.inverse_targets(model(x_new))",
                    score=math.log10(ymax) - 0.5))
    return out, meas


def _input_findings(xs: list[Tensor], dim: int, meas: dict[str, Any]) -> list[Finding]:
    """The inputs' part of :func:`check_inputs` (``meas`` filled in place)."""
    f = torch.cat([_features(x, dim) for x in xs])
    if len(f) < 2:
        return []
    mean, std = f.mean(0), f.std(0)
    absmax = float(f.abs().max())
    live = std > 1e-3 * float(std.median())
    spread = float(std[live].max() / std[live].min()) if live.sum() > 1 else 1.0
    scale = float((mean.abs() + std).max())
    # Channels of images and signals, features of tables and sequences.
    unit = "channel" if xs[0].dim() >= 3 and dim % xs[0].dim() == 1 else "feature"
    meas.update({"feature_dim": dim, "feature_mean_range": [float(mean.min()), float(mean.max())],
                 "feature_std_range": [float(std.min()), float(std.max())],
                 "abs_max": absmax, "std_spread": spread})
    ev = {**meas, "standardise": "inputs"}
    # The one line that does it, on the axis measured here (Standardizer takes no (N,)).
    axis = ", dim=-1" if xs[0].dim() == 3 and dim == -1 else ""
    line = ("x = (x - x_train.mean()) / x_train.std()" if xs[0].dim() == 1 else
            f"model = gg.fixes.Standardizer.fit(loader, targets=False{axis}).wrap(model)")
    sev = _sev(scale, 10.0, 100.0)
    if sev:
        worst = [int(i) for i in torch.argsort(mean.abs() + std, descending=True)[:3]]
        return [Finding(
            "input_scale", sev,
            f"inputs are not standardised: {unit}s reach |x| = {absmax:.3g} "
            f"(mean up to {float(mean.abs().max()):.3g}, std up to {float(std.max()):.3g})",
            evidence=ev, layers=[f"{unit} {i}" for i in worst],
            fix=f"standardise inputs to zero mean and unit variance per {unit} (per channel "
                f"for images), with statistics from the training set; in one line: {line}",
            fix_code="x = (x - x_train.mean(0)) / x_train.std(0)",
            score=math.log10(scale))]
    if spread > 100 and f.shape[1] <= 100:  # tabular features, not pixels
        return [Finding(
            "input_scale", "warning",
            f"{unit} scales differ {spread:.3g}× (an ill-conditioned problem for SGD)",
            evidence=ev, fix=f"standardise each {unit} (gg.fixes.Standardizer)",
            fix_code=line,
            score=math.log10(spread) - 1)]
    return []


# -- 4. activations -------------------------------------------------------------------


def check_activations(pr: ProbeResult) -> list[Finding]:
    """Saturation, dead units, huge pre-activations, attention logits, output log Z."""
    out: list[Finding] = []
    sat = [(lp.name, lp.saturated) for lp in pr.layers if lp.saturated is not None]
    bad = [(n, s) for n, s in sat if s > 0.5]
    if bad:
        worst = max(s for _, s in bad)
        out.append(Finding(
            "activations", "critical" if worst > 0.9 else "warning",
            f"{len(bad)} tanh/sigmoid layer(s) saturated (up to {worst:.0%} of units at ±1), "
            "so their local gradient is ~0", evidence={"saturated_fraction": dict(sat)},
            layers=[n for n, _ in bad],
            fix="shrink the init (Xavier), normalise inputs, or switch to a non-saturating "
                "activation (gg.fixes.swap_activations(model, 'non-saturating'): tanh → GELU)",
            fix_code='gg.fixes.reinit(model, scheme="auto")  '
                     '# or gg.fixes.swap_activations(model, "non-saturating")',
            score=worst))
    dead = [(lp.name, lp.dead) for lp in pr.layers if lp.dead is not None]
    bad = [(n, d) for n, d in dead if d > 0.5]
    if bad:
        worst = max(d for _, d in bad)
        out.append(Finding(
            "activations", "warning",
            f"{len(bad)} ReLU layer(s) with up to {worst:.0%} dead units on this batch",
            evidence={"dead_fraction": dict(dead)}, layers=[n for n, _ in bad],
            fix="lower the LR, use LeakyReLU/GELU, or re-initialise",
            fix_code='gg.fixes.swap_activations(model, "leaky")', score=worst))
    big = [(lp.name, lp.out_absmax) for lp in pr.weight_layers()
           if math.isfinite(lp.out_absmax) and lp.out_absmax > 1e3]
    if big:
        out.append(Finding(
            "activations", "warning",
            f"pre-activations reach {max(v for _, v in big):.3g}",
            evidence={"pre_activation_max": dict(big)}, layers=[n for n, _ in big],
            fix="normalise inputs or add normalisation layers",
            score=math.log10(max(v for _, v in big)) - 3))
    att = [(lp.name, lp.attn_logit_max) for lp in pr.layers if lp.attn_logit_max is not None]
    if att and max(v for _, v in att) > 50:
        v = max(v for _, v in att)
        out.append(Finding(
            "activations", "warning" if v < 1e3 else "critical",
            f"attention logits reach {v:.3g}: attention-logit growth "
            "(Wortsman et al. 2023) makes softmax one-hot and training unstable",
            evidence={"attention_logit_max": dict(att)}, layers=[n for n, v2 in att if v2 > 50],
            fix="add layer norm to queries and keys (qk-layernorm) or lower the LR",
            score=math.log10(v)))
    if pr.log_z is not None and pr.log_z > 30:
        out.append(Finding(
            "activations", "warning",
            f"output log-partition |log Z| = {pr.log_z:.3g}: logits drift large "
            "(Wortsman et al. 2023; PaLM)",
            evidence={"log_z": pr.log_z},
            fix="add a z-loss term 1e-4·log²Z to the loss",
            fix_code="loss_fn = gg.fixes.with_z_loss(loss_fn, weight=1e-4)",
            score=math.log10(pr.log_z)))
    return out


# -- 5. architecture ------------------------------------------------------------------


def check_architecture(model: nn.Module) -> list[Finding]:
    """Missing normalisation in deep stacks; recurrent spectral radius (Pascanu et al. 2013)."""
    out: list[Finding] = []
    weighted = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d |
                                                                  nn.Conv1d)]
    norms = [n for n, m in model.named_modules() if isinstance(m, _NORMS)]
    if len(weighted) >= 8 and not norms:
        out.append(Finding(
            "architecture", "info",
            f"{len(weighted)} stacked weight layers and no normalisation layer",
            evidence={"depth": len(weighted)},
            fix="add BatchNorm/LayerNorm between layers, or residual connections",
            score=len(weighted) / 10))
    for name, m in model.named_modules():
        if isinstance(m, nn.RNN):
            for pname, p in m.named_parameters():
                if not pname.startswith("weight_hh"):
                    continue
                rho = spectral_radius(p)
                lname = f"{name}.{pname}" if name else pname
                if rho > 1.05:
                    out.append(Finding(
                        "recurrent", "critical" if rho >= 1.3 else "warning",
                        f"vanilla RNN recurrent weights have spectral radius {rho:.3g} > 1: "
                        "gradients can grow exponentially with sequence length",
                        evidence={"spectral_radius": rho, "nonlinearity": m.nonlinearity},
                        layers=[lname],
                        fix="initialise recurrent weights orthogonal with radius < 1 and clip "
                            "gradient norms (Pascanu et al. 2013), or use an LSTM/GRU",
                        fix_code='gg.fixes.reinit(model, scheme="auto")',
                        score=math.log10(rho) * 10))
                elif rho < 0.5:
                    out.append(Finding(
                        "recurrent", "info",
                        f"recurrent spectral radius {rho:.3g}: gradients vanish over long "
                        "sequences", evidence={"spectral_radius": rho}, layers=[lname],
                        fix="orthogonal init with radius near 1, or an LSTM/GRU"))
    return out


# -- 6. precision ---------------------------------------------------------------------


def check_precision(model: nn.Module, amp_dtype: torch.dtype | None,
                    scaler: torch.amp.GradScaler | None) -> list[Finding]:
    """fp16 without loss scaling, collapsing scales, bf16 weights under fp16 autocast."""
    out: list[Finding] = []
    dtypes = Counter(p.dtype for p in model.parameters())
    if dtypes.get(torch.float16):
        out.append(Finding(
            "precision", "warning",
            f"{dtypes[torch.float16]} parameter tensors are stored in fp16: small updates "
            "round to zero and large gradients overflow",
            fix="keep fp32 master weights and use torch.autocast(dtype=torch.float16) with a "
                "GradScaler", score=1))
    if amp_dtype == torch.float16 and (scaler is None or not scaler.is_enabled()):
        out.append(Finding(
            "precision", "critical",
            "fp16 autocast without a GradScaler: small gradients underflow to zero and large "
            "ones overflow to inf", fix="use torch.amp.GradScaler and pass it to the guard",
            fix_code='scaler = torch.amp.GradScaler(); gg.Guard(model, opt, scaler=scaler)',
            score=2))
    if scaler is not None and scaler.is_enabled():
        scale = scaler.get_scale()
        if scale < 1.0:
            out.append(Finding(
                "precision", "warning",
                f"GradScaler scale has collapsed to {scale:.3g}: gradients overflow at every "
                "scale, i.e. they are inf/NaN in fp32 too", evidence={"scale": scale},
                fix="look for the source of inf gradients (the guard's events name the layer)",
                score=-math.log10(max(scale, 1e-30))))
    if amp_dtype == torch.float16 and dtypes.get(torch.bfloat16):
        out.append(Finding(
            "precision", "warning",
            "bf16 parameters under fp16 autocast: values beyond fp16's range overflow",
            fix="autocast with dtype=torch.bfloat16 for bf16 models", score=1))
    return out


def check_finite_start(model: nn.Module, batch: Batch,
                       loss_fn: Callable[[Tensor, Tensor], Tensor], loss: float) -> list[Finding]:
    """A loss that is NaN/Inf at the initial weights, before any step: no LR or training
    dynamics is to blame, so it is named first, with where it comes from (the data, the
    forward pass or the loss function)."""
    if math.isfinite(loss):
        return []
    x, y = batch

    def bad(t: Tensor) -> bool:
        return t.is_floating_point() and not bool(torch.isfinite(t).all())

    if bad(x) or bad(y):
        which = "inputs" if bad(x) else "targets"
        title = f"the loss is {loss} before any step: the batch's {which} hold NaN/Inf"
        fix = (f"clean the data: find the rows with ~torch.isfinite({which[0]}).all(dim=1) "
               "and drop or repair them (a missing value, a division by zero in "
               "preprocessing)")
    else:
        with torch.no_grad():
            out = copy.deepcopy(model)(x)
        if any(bad(t) for _, t in _leaves(out)):
            title = (f"the loss is {loss} before any step: the model's output is NaN/Inf on "
                     "finite inputs (an overflow in the forward pass)")
            fix = ("look at the init's scale and unbounded activations (the init and "
                   "activation findings below); gg.fixes.reinit(model, scheme='auto')")
        else:
            title = (f"the loss is {loss} before any step, on finite inputs, targets and "
                     "outputs: the loss function leaves its domain")
            fix = ("check the loss: a log of 0 or of a negative number, a division by zero, "
                   "targets outside the range it expects (class indices, probabilities)")
    return [Finding("nonfinite", "critical", title, evidence={"loss": loss}, fix=fix,
                    score=10.0)]


def check_finite_data(batches: list[Batch], model: nn.Module | None = None,
                      loss_fn: Callable[[Any, Tensor], Tensor] | None = None) -> list[Finding]:
    """NaN/Inf in any batch's inputs or targets that makes its loss NaN/Inf: the data's
    fault, not the model's; every trial would stop at the first such batch, so no training
    measurement can say more. A batch whose loss stays finite (NaN marking a missing
    label that the loss masks out) is no fault.

    Args:
        batches: every batch the doctor holds (a list's all, else a sample).
        model, loss_fn: to compute the loss of a batch with NaN/Inf (on a copy, without
            gradients); None: every such batch counts.

    Returns:
        One critical ``nonfinite`` finding naming the batches, or none.
    """
    where: dict[str, list[int]] = {"inputs": [], "targets": []}
    count = {"inputs": 0, "targets": 0}
    shadow: nn.Module | None = None
    for i, (x, y) in enumerate(batches):
        if all(not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all())
               for t in (x, y)):
            continue
        if model is not None and loss_fn is not None:
            if shadow is None:
                shadow = copy.deepcopy(model)
            try:
                with torch.no_grad():
                    masked = bool(torch.isfinite(torch.as_tensor(
                        loss_fn(shadow(x), y), dtype=torch.float64)).all())
            except Exception:  # (a loss that raises on it: judged by the values alone)
                masked = False
            if masked:
                continue
        for name, t in (("inputs", x), ("targets", y)):
            if t.is_floating_point() or t.is_complex():
                n = int((~torch.isfinite(t)).sum())
                if n:
                    where[name].append(i)
                    count[name] += n
    parts = [f"{name} of batch(es) {', '.join(map(str, idx[:5]))}"
             f"{' …' if len(idx) > 5 else ''} ({count[name]} value(s))"
             for name, idx in where.items() if idx]
    if not parts:
        return []
    which = "inputs" if where["inputs"] else "targets"
    return [Finding(
        "nonfinite", "critical",
        f"the data holds NaN/Inf: the {' and the '.join(parts)}, of the {len(batches)} "
        "batch(es) read; the first such batch makes every loss after it NaN, whatever the "
        "model or LR",
        evidence={"batches": len(batches), "inputs_batches": where["inputs"][:100],
                  "targets_batches": where["targets"][:100], **count},
        fix=(f"clean the data: find the rows with ~torch.isfinite({which[0]}) (a missing "
             "value, a division by zero in preprocessing) and drop or repair them; the "
             "guard skips such steps in training, but they should not be there"),
        score=10.0)]


def _held(data: Batch | Iterable[Batch], sample: list[Batch]) -> list[Batch]:
    """The batches the doctor holds: all of a list's (they are in memory already), else
    the sample read from a loader (reading a loader through would cost a whole epoch)."""
    if is_batch(data):
        return [as_batch(data)]
    if isinstance(data, Sequence):
        return [as_batch(b) for b in data]
    return sample


# -- the entry points -----------------------------------------------------------------


def _sample(data: Batch | Iterable[Batch], n: int = 4) -> list[Batch]:
    if is_batch(data):
        return [as_batch(data)]
    it = cycle_batches(data)
    return [next(it) for _ in range(n)]


def diagnose(
    model: nn.Module,
    batch_or_loader: Batch | Iterable[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    run_log: str | None = None,
    lr_test: bool = True,
    lr_iters: int = 100,
    trial_steps: int = 60,
) -> Diagnosis:
    """Find why gradients explode or vanish; returns ranked findings.

    The checks measure the model at initialisation; each suspicion's severity then rests
    on what happens when copies train for ``trial_steps`` steps, as they are and with the
    proposed fix (:mod:`gradguard.doctor.confirm`). Works on copies: the model, optimizer
    and data are not modified (a one-shot iterator is read once, into a list).

    Args:
        model: the model as it will start training.
        batch_or_loader: one ``(inputs, targets)`` batch or an iterable of batches.
        loss_fn: ``loss_fn(model(inputs), targets)``.
        optimizer: the optimizer with the LR you intend to use; enables the training
            trials and the LR range test. Without it, suspicions are capped at warning.
        amp_dtype, scaler: the mixed-precision setup, for the precision checks.
        run_log: a JSONL run log from a guard: its findings are listed as evidence, never
            as the root cause.
        lr_test: set False to skip the (slower) LR range test.
        lr_iters: steps of the LR range test.
        trial_steps: steps of each training trial (0: no trials, as without an optimizer).

    Returns:
        A :class:`Diagnosis`; ``root_cause`` is None when nothing is above info.
    """
    data: Batch | Iterable[Batch] = batch_or_loader
    if isinstance(data, Iterator):
        data = list(itertools.islice(data, max(lr_iters, trial_steps, 4)))
    batches = _sample(data)
    pr = probe(model, batches[0], loss_fn)
    findings: list[Finding] = []
    meas: dict[str, Any] = {"loss": pr.loss, "forward_std_ratio": pr.forward_ratio(),
                            "backward_grad_ratio": pr.backward_ratio()}
    f, m = check_inputs(batches, model)
    findings += f
    meas["inputs"] = m
    findings += check_init(model, batches[0], loss_fn, pr)
    findings += check_activations(pr)
    findings += check_architecture(model)
    findings += check_precision(model, amp_dtype, scaler)
    start = check_finite_start(model, batches[0], loss_fn, pr.loss)
    if start:  # (no LR test or trial can say more: every one starts from this NaN)
        return Diagnosis([*start, *unconfirmed(findings)], meas)
    bad_data = check_finite_data(_held(data, batches), model, loss_fn)
    if bad_data:  # (every trial would stop at the first such batch)
        return Diagnosis([*bad_data, *unconfirmed(findings)], meas)
    lr_meas: dict[str, Any] = {}
    if optimizer is not None and lr_test:
        f, lr_meas = check_lr(model, optimizer, data, loss_fn, lr_iters)
        meas["lr_range_test"] = lr_meas
        findings += f
    if optimizer is not None and trial_steps > 0:
        trials = Trials(model, optimizer, data, loss_fn, trial_steps)
        findings = confirm(findings, trials, batches, lr_meas)
        meas["trials"] = {k: t.summary() for k, t in trials.done().items()}
    else:
        findings = unconfirmed(findings)
    if run_log is not None:
        try:
            findings += diagnose_run(run_log).findings
        except ConfigError as e:  # (evidence only: a bad log costs the diagnosis nothing)
            findings.append(Finding("run_log", "info", f"run log not read: {e}"))
    return Diagnosis(findings, meas)


def _dead_finding(dead: Event, trouble: list[Event]) -> Finding:
    """The guard's ``dead_units`` warning as a finding: units killed by earlier steps."""
    since = dead.get("since")
    since = dead.step if since is None else int(since)
    before = [e.step for e in trouble if e.step <= since]
    when = (f"; the first flagged step was {before[0]}: restart from a checkpoint before it"
            if before else "")
    return Finding(
        "run_log", "critical",
        f"units died by step {since}: {dead.message.removeprefix('dead units: ')}{when}",
        evidence={"dead_step": since, "first_flag": before[0] if before else None},
        layers=[dead["tensor"]] if dead.get("tensor") else [],
        fix="no LR revives dead units: restart from before the oversized steps with a lower "
            "LR (gg.doctor.lr_find), standardised inputs (gg.fixes.Standardizer) or a better "
            "init (gg.fixes.reinit)",
        score=math.log10(len(trouble) + 1) + 1)  # (above the flags it follows from)


def diagnose_run(path: str) -> Diagnosis:
    """Read a guard's JSONL log: when and where trouble started, what preceded it."""
    records = list(read_jsonl(path))  # (refuses a file that is no run log)
    steps = [r for r in records if isinstance(r, StepRecord)]
    flags = [e for e in records if isinstance(e, Event)
             and e.kind in ("nonfinite", "grad_spike", "loss_spike")]
    # One per flagged step (a spike flags the gradient and the loss at once); the data's
    # NaN/Inf steps are the data pipeline's, not the run's.
    data_steps = sorted({e.step for e in flags if e.get("data")})
    trouble: list[Event] = []
    for e in flags:
        if not e.get("data") and (not trouble or trouble[-1].step != e.step):
            trouble.append(e)
    dead = [e for e in records if isinstance(e, Event) and e.kind == "dead_units"]
    out = [_dead_finding(dead[0], trouble)] if dead else []
    if data_steps:
        out.append(Finding(
            "run_log", "warning",
            f"{len(data_steps)} step(s) had NaN/Inf in the data (first at step "
            f"{data_steps[0]}); the guard skipped them without touching the LR",
            evidence={"data_steps": data_steps[:100]},
            fix="clean the data pipeline: find the records with ~torch.isfinite(t) (a "
                "missing value, a division by zero in preprocessing)"))
    if not trouble:
        out.append(Finding("run_log", "info", f"{len(steps)} steps recorded, no spikes "
                           "or non-finite steps" + (" of the model's" if data_steps else "")))
        return Diagnosis(out, {"steps": len(steps)})
    first = trouble[0]
    k = first.step
    lrs = [(r.step, r.lr) for r in steps if isinstance(r.lr, float)]
    before = [lr for s, lr in lrs if s < k]
    lr_note = ""
    ev: dict[str, Any] = {"first_step": k, "kind": first.kind, "count": len(trouble)}
    if len(before) >= 2:
        window = before[-50:]
        if window[-1] > 1.5 * min(window):
            lr_note = (f"; it followed an LR increase from {min(window):.3g} to {window[-1]:.3g} "
                       "within 50 steps (end of warm-up or a schedule change)")
            ev["lr_rise"] = [min(window), window[-1]]
    origins = Counter(e.get("origin_layer") for e in trouble if e.get("origin_layer"))
    dom = ""
    if origins:
        layer, n = origins.most_common(1)[0]
        ev["origins"] = dict(origins)
        if n >= max(2, 0.5 * len(trouble)):
            dom = f"; {n} of {len(trouble)} flagged steps start at {layer}"
    out.append(Finding(
        "run_log", "warning" if len(trouble) < 10 else "critical",
        f"first trouble at step {k} ({first.kind}, {first.message}){lr_note}{dom}",
        evidence=ev, layers=[first["origin_layer"]] if first.get("origin_layer") else [],
        fix="if it follows an LR rise, lengthen warm-up (gg.fixes.warmup_cosine) or lower the "
            "peak LR; if one layer dominates, inspect its init and inputs",
        score=math.log10(len(trouble) + 1)))
    return Diagnosis(out, {"steps": len(steps), "flagged": len(trouble)})
