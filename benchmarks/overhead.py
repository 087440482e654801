"""What does ``guard.step`` cost next to ``optimizer.step()`` and next to its peers? (issue #8)

For each model, in ONE process, every variant below gets its own copy of the model and its
own optimizer. Each repetition (after warm-up) visits every variant once, in a shuffled
order (round-robin): the same saved real gradients (one of ``--grad-sets`` sets from real
backward passes, cycled) are copied into the variant's ``.grad`` tensors outside the
timed region, then only the part after ``backward()`` is timed: clipping/guard plus the
optimizer step. One real forward+backward per repetition is timed too, for the
training-step context. Reported: medians over the repetitions, and for each variant the
*added* time over the bare step as the median of the per-repetition paired differences.

Variants (all use ``AdamW(fused=True)`` so they differ only in what runs before the
step; ``bare (AdamW default)`` shows what the guard's switch to the fused kernel is worth):

- ``foreach_norm (floor)``: one ``torch._foreach_norm`` over all grads, no step: the
  cost of reading every gradient once.
- ``clip_grad_norm_ alone``: ``torch.nn.utils.clip_grad_norm_(params, 1.0)``, no step.
- ``bare step``: ``optimizer.step()``.
- ``+ clip_grad_norm_``, ``+ zclip`` (``ZClip().step(model)``), ``+ autoclip global``
  (``QuantileClip(params, global_threshold=True)``), ``+ autoclip per-tensor``
  (``QuantileClip(params)``, the package default), ``+ lightning grad_norm``
  (``grad_norm(model, 2)``), ``+ cockpit GradNorm`` (the quantity's ``track``).
- ``gradguard default``: ``gg.Guard(model, opt)``, ``guard.step(loss)``.
- ``gradguard full``: ``gg.Guard(model, opt, clip=[AGC(), ZScore()],
  rollback=gg.Rollback(every=100))``.

Peers with growing state are measured in steady state: autoclip's history is pre-filled
to its 1000 entries, zclip and the guards run past their warm-ups (the guard's drift
analyzer needs 200 steps) before timing starts.

Usage::

    python benchmarks/overhead.py                       # CPU, 2 threads, all models
    python benchmarks/overhead.py --reps 50 --models cnn,lm
    python benchmarks/overhead.py --device cuda         # plus a no-host-sync check
    python benchmarks/overhead.py --json out.json --profile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import json
import math
import os
import platform
import pstats
import random
import statistics
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradguard as gg
from gradguard import checkpoint
from gradguard.bench.runner import cpu_model

LR = 1e-5  # small: parameters barely move over thousands of identical-gradient steps


# --------------------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    """6 hidden Linear(1024, 1024) + ReLU, then a 10-way head."""

    def __init__(self, width: int = 1024, depth: int = 6, d_in: int = 1024) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def small_cnn() -> nn.Module:
    """Four 3×3 conv + BatchNorm + ReLU blocks on 32×32 RGB, global pool, linear head."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU()]

    return nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2),
                         *block(128, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10))


class TinyLM(nn.Module):
    """Decoder-only LM: 4 pre-LN blocks, d=256, 4 heads, byte vocabulary, context 128."""

    def __init__(self, vocab: int = 256, d: int = 256, layers: int = 4, heads: int = 4,
                 ctx: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        return self.head(self.ln(self.blocks(x, mask=mask, is_causal=True)))


class ResidualStack(nn.Module):
    """``depth`` residual Linear(width, width) layers and a head: 2·depth+2 tensors."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = x + 0.1 * torch.tanh(layer(x))
        return self.head(x)


def _classify(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it and make one batch."""

    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor] = _classify


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        "MLP 6×1024 (ReLU), batch 128",
        MLP,
        lambda g: (torch.randn(128, 1024, generator=g), torch.randint(10, (128,), generator=g))),
    "cnn": ModelSpec(
        "CNN 4×(conv3×3+BN+ReLU) 32→128 ch, 32×32 input, batch 64",
        small_cnn,
        lambda g: (torch.randn(64, 3, 32, 32, generator=g),
                   torch.randint(10, (64,), generator=g))),
    "lm": ModelSpec(
        "Transformer LM 4 layers d=256, 4 heads, 16×128 tokens",
        TinyLM,
        lambda g: (torch.randint(256, (16, 128), generator=g),
                   torch.randint(256, (16, 128), generator=g))),
    "deep": ModelSpec(
        "Residual stack 128×Linear(128,128): 258 tensors, 2.1 M params, batch 64",
        lambda: ResidualStack(128, 128),
        lambda g: (torch.randn(64, 128, generator=g), torch.randint(10, (64,), generator=g))),
    "wide": ModelSpec(
        "Residual stack 2×Linear(1024,1024): 6 tensors, 2.1 M params (control for deep)",
        lambda: ResidualStack(1024, 2),
        lambda g: (torch.randn(64, 1024, generator=g), torch.randint(10, (64,), generator=g))),
    # For the smoke test only.
    "tiny": ModelSpec(
        "MLP 8→16→10, batch 4",
        lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10)),
        lambda g: (torch.randn(4, 8, generator=g), torch.randint(10, (4,), generator=g))),
}
DEFAULT_MODELS = ("mlp", "cnn", "lm", "deep", "wide")


# --------------------------------------------------------------------------------------
# Peers that need care to import


def import_cockpit_gradnorm() -> tuple[Any, str | None]:
    """cockpit's ``GradNorm`` quantity class, or ``(None, why not)``.

    cockpit-for-pytorch 1.0.2 imports ``pkg_resources`` only to read its own version;
    setuptools ≥ 81 no longer ships it, so a stand-in is put in ``sys.modules`` for the
    duration of the import and removed afterwards (nothing else sees it).
    """
    stub = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name: str) -> Any:
            from importlib.metadata import PackageNotFoundError, version

            try:
                return types.SimpleNamespace(version=version("cockpit-for-pytorch"))
            except PackageNotFoundError as e:
                raise DistributionNotFound(name) from e

        stub.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
        stub.get_distribution = get_distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stub
    try:
        from cockpit.quantities import GradNorm
    except Exception as e:  # missing package, or backpack failing against this torch
        return None, (f"cockpit-for-pytorch not importable ({type(e).__name__}: {e}); install "
                      "it with `pip install --no-deps cockpit-for-pytorch==1.0.2 "
                      "backpack-for-pytorch==1.7.1 unfoldNd einops json-tricks seaborn`")
    finally:
        if stub is not None and sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]
    return GradNorm, None


def import_lightning_grad_norm() -> tuple[Any, str | None]:
    for mod in ("lightning.pytorch.utilities", "pytorch_lightning.utilities"):
        try:
            return __import__(mod, fromlist=["grad_norm"]).grad_norm, None
        except ImportError:
            continue
    return None, "neither lightning nor pytorch_lightning is installed"


# --------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    """One way of doing the part after ``backward()``, on its own model copy."""

    name: str
    model: nn.Module
    fn: Callable[[Tensor], object]  # called with the step's loss
    with_step: bool = True  # includes optimizer.step() (False: a measurement alone)
    warmup: int = 0  # extra steps (beyond the common warm-up) to reach steady state
    guard: gg.Guard | None = None
    grads: list[Tensor] = field(default_factory=list)
    times: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.model.parameters()]


def _adamw(model: nn.Module, fused: bool = True) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, **({"fused": True} if fused else {}))


def build_variants(base: nn.Module, typical_norm: float, steady: bool,
                   skipped: dict[str, str]) -> list[Variant]:
    """Every variant on its own deep copy of ``base``. Unavailable peers go to ``skipped``."""

    def fresh() -> nn.Module:
        return copy.deepcopy(base)

    out: list[Variant] = []

    v = Variant("foreach_norm (floor)", fresh(), lambda _l: None, with_step=False)
    v.fn = lambda _l, g=v.grads: torch._foreach_norm(g)
    out.append(v)

    m = fresh()
    params = list(m.parameters())
    out.append(Variant("clip_grad_norm_ alone", m,
                       lambda _l, p=params: nn.utils.clip_grad_norm_(p, 1.0), with_step=False))

    m = fresh()
    opt = _adamw(m)
    out.append(Variant("bare step", m, lambda _l, o=opt: o.step()))

    m = fresh()
    opt = _adamw(m, fused=False)
    out.append(Variant("bare step (AdamW default impl)", m, lambda _l, o=opt: o.step()))

    m = fresh()
    opt, params = _adamw(m), list(m.parameters())

    def clip_step(_l: Tensor, o: torch.optim.Optimizer = opt, p: list[Tensor] = params) -> None:
        nn.utils.clip_grad_norm_(p, 1.0)
        o.step()

    out.append(Variant("+ clip_grad_norm_", m, clip_step))

    try:
        from zclip import ZClip
    except ImportError as e:
        skipped["+ zclip"] = f"zclip not installed ({e})"
    else:
        m = fresh()
        opt, z = _adamw(m), ZClip()

        def zclip_step(_l: Tensor, o: torch.optim.Optimizer = opt, z: Any = z,
                       m: nn.Module = m) -> None:
            z.step(m)
            o.step()

        out.append(Variant("+ zclip", m, zclip_step, warmup=30 if steady else 0))

    try:
        from autoclip.torch import QuantileClip
    except ImportError as e:
        skipped["+ autoclip"] = f"autoclip not installed ({e})"
    else:
        gen = torch.Generator().manual_seed(1)
        for label, global_threshold in (("global", True), ("per-tensor", False)):
            m = fresh()
            opt = _adamw(m)
            qc = QuantileClip(m.parameters(), quantile=0.9, history_length=1000,
                              global_threshold=global_threshold)
            if steady:
                # Steady state: a full 1000-entry history (as after 1000 steps).
                dev = next(m.parameters()).device
                keys: list[Any] = ["global_history"] if global_threshold else list(m.parameters())
                for key in keys:
                    hist = (typical_norm * (0.5 + torch.rand(1000, generator=gen))).to(dev)
                    if global_threshold:
                        qc.state[key] = hist
                    else:
                        qc.state[key]["history"] = hist

            def qc_step(_l: Tensor, o: torch.optim.Optimizer = opt, qc: Any = qc) -> None:
                qc.step()
                o.step()

            out.append(Variant(f"+ autoclip {label}", m, qc_step))

    grad_norm, why = import_lightning_grad_norm()
    if grad_norm is None:
        skipped["+ lightning grad_norm"] = why or ""
    else:
        m = fresh()
        opt = _adamw(m)

        def pl_step(_l: Tensor, o: torch.optim.Optimizer = opt, m: nn.Module = m) -> None:
            grad_norm(m, 2)
            o.step()

        out.append(Variant("+ lightning grad_norm", m, pl_step))

    gradnorm_cls, why = import_cockpit_gradnorm()
    if gradnorm_cls is None:
        skipped["+ cockpit GradNorm"] = why or ""
    else:
        m = fresh()
        opt, params = _adamw(m), list(m.parameters())
        q = gradnorm_cls(track_schedule=lambda _s: True)
        counter = iter(range(10**12))

        def cockpit_step(loss: Tensor, o: torch.optim.Optimizer = opt, q: Any = q,
                         p: list[Tensor] = params, c: Iterator[int] = counter) -> None:
            q.track(next(c), p, loss)
            o.step()

        out.append(Variant("+ cockpit GradNorm", m, cockpit_step))

    # The guard's host analyzers reach steady state after Drift's 200-step window.
    guard_warmup = 210 if steady else 0
    m = fresh()
    g = gg.Guard(m, _adamw(m))
    out.append(Variant("gradguard default", m, g.step, warmup=guard_warmup, guard=g))

    m = fresh()
    g = gg.Guard(m, _adamw(m), clip=[gg.clip.AGC(), gg.clip.ZScore()],
                 rollback=gg.Rollback(every=100))
    out.append(Variant("gradguard full", m, g.step, warmup=guard_warmup, guard=g))
    return out


# --------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> int:
    _sync(device)
    t0 = time.perf_counter_ns()
    fn()
    _sync(device)
    return time.perf_counter_ns() - t0


@contextlib.contextmanager
def _no_host_reads() -> Iterator[None]:
    """CPU stand-in for CUDA's sync debug mode: every tensor → Python read raises."""

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("host read of a tensor value")

    names = ("item", "__bool__", "__float__", "__int__", "tolist", "__index__")
    saved = {n: getattr(Tensor, n) for n in names}
    try:
        for n in names:
            setattr(Tensor, n, boom)
        yield
    finally:
        for n, f in saved.items():
            setattr(Tensor, n, f)


def sync_check(v: Variant, grad_sets: list[list[Tensor]], losses: list[Tensor],
               device: torch.device, steps: int = 3) -> str:
    """Run ``steps`` guard steps with host syncs made errors; "ok" or the error."""
    try:
        for k in range(steps):
            torch._foreach_copy_(v.grads, grad_sets[k % len(grad_sets)])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    v.fn(losses[k % len(losses)])
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            else:
                with _no_host_reads():
                    v.fn(losses[k % len(losses)])
    except Exception as e:
        return f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return "ok"


def count_ops(v: Variant, grads: list[Tensor], loss: Tensor) -> int:
    """How many aten operators one call of ``v`` dispatches (each costs ~1 µs on CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            Count.n += 1
            return func(*args, **(kwargs or {}))

    torch._foreach_copy_(v.grads, grads)
    with Count():
        v.fn(loss)
    return Count.n


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _cpu_clock() -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine, CPU s used by this process); Linux only."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
    return time.monotonic(), busy, time.process_time()


def others_cores(since: tuple[float, float, float] | None) -> float | None:
    """CPU cores other processes kept busy, on average, since ``since``: the contamination."""
    now = _cpu_clock()
    if since is None or now is None or now[0] <= since[0]:
        return None
    return max(0.0, ((now[1] - since[1]) - (now[2] - since[2])) / (now[0] - since[0]))


def wait_idle(limit_s: float, window_s: float = 2.0, threshold: float = 0.15) -> float | None:
    """Wait (up to ``limit_s``) until other processes use < ``threshold`` cores; return it."""
    deadline = time.monotonic() + limit_s
    while True:
        t0 = _cpu_clock()
        time.sleep(window_s)
        busy = others_cores(t0)
        if busy is None or busy < threshold or time.monotonic() >= deadline:
            return busy


def run_model(name: str, reps: int, warmup: int, device: torch.device, grad_sets_n: int = 4,
              steady: bool = True, snapshot_reps: int = 10, profile: bool = False,
              seed: int = 0, fb_reps: int = 50) -> dict[str, Any]:
    """Measure every variant on one model; returns plain data (ms)."""
    spec = MODELS[name]
    torch.manual_seed(seed)
    base = spec.build().to(device)
    gen = torch.Generator().manual_seed(seed)
    batches = [tuple(t.to(device) for t in spec.batch(gen)) for _ in range(grad_sets_n)]

    # Real gradients from real backward passes, saved once and copied in every repetition.
    train = copy.deepcopy(base)
    grad_sets: list[list[Tensor]] = []
    losses: list[Tensor] = []
    for x, y in batches:
        train.zero_grad(set_to_none=True)
        loss = spec.loss(train(x), y)
        loss.backward()
        grad_sets.append([p.grad.detach().clone() for p in train.parameters()])
        losses.append(loss.detach())
    norms = [float(torch.stack(torch._foreach_norm(g)).norm()) for g in grad_sets]
    n_tensors = sum(1 for _ in base.parameters())
    n_params = sum(p.numel() for p in base.parameters())

    skipped: dict[str, str] = {}
    variants = build_variants(base, statistics.mean(norms), steady, skipped)
    names = [v.name for v in variants]

    def fwd_bwd(k: int) -> None:
        x, y = batches[k % grad_sets_n]
        train.zero_grad(set_to_none=True)
        spec.loss(train(x), y).backward()

    def call(v: Variant, k: int) -> None:
        torch._foreach_copy_(v.grads, grad_sets[k % grad_sets_n])
        v.times.append(_timed(lambda: v.fn(losses[k % grad_sets_n]), device))

    # Warm-up: each variant's own steady-state steps, then common interleaved rounds.
    started, clock = time.time(), _cpu_clock()
    for v in variants:
        for k in range(v.warmup):
            call(v, k)
    rng = random.Random(seed)
    fb_times: list[int] = []
    # Forward+backward is only context (and the slowest part on the LM): time it in at
    # most ``fb_reps`` of the rounds, spread evenly.
    fb_every = max(1, reps // fb_reps)
    for r in range(warmup + reps):
        order = list(range(len(variants)))
        rng.shuffle(order)
        for i in order:
            call(variants[i], r)
        if r < warmup or (r - warmup) % fb_every == 0:
            fb_times.append(_timed(lambda r=r: fwd_bwd(r), device))
    for v in variants:
        v.times = v.times[-reps:]
    fb = fb_times[warmup:] or fb_times
    elapsed, others = time.time() - started, others_cores(clock)

    checks = {v.name: sync_check(v, grad_sets, losses, device)
              for v in variants if v.guard is not None}

    ms = 1e-6
    bare = next(v for v in variants if v.name == "bare step")
    clip_alone = next(v for v in variants if v.name == "clip_grad_norm_ alone")
    fb_med = statistics.median(fb) * ms
    bare_med = statistics.median(bare.times) * ms
    train_step = fb_med + bare_med
    clip_alone_med = statistics.median(clip_alone.times) * ms
    rows = []
    for v in variants:
        t = [x * ms for x in v.times]
        med = statistics.median(t)
        if v.with_step:
            added = statistics.median([(a - b) * ms for a, b in zip(v.times, bare.times,
                                                                     strict=True)])
        else:
            added = med
        rows.append({
            "variant": v.name, "median_ms": med, "p25_ms": _q(t, 0.25), "p75_ms": _q(t, 0.75),
            "mean_ms": statistics.fmean(t), "with_step": v.with_step,
            "x_bare": med / bare_med if v.with_step else None,
            "added_ms": added, "added_x_clip": added / clip_alone_med,
            "added_pct_train_step": 100 * added / train_step,
        })

    snapshot = None
    full = next((v for v in variants if v.name == "gradguard full"), None)
    if full is not None and full.guard is not None and full.guard.policy.rollback is not None:
        every = full.guard.policy.rollback.every
        take = lambda g=full.guard: g.store._take(g.steps, checkpoint.trajectory(g))  # noqa: E731
        st = [_timed(take, device) * ms for _ in range(snapshot_reps)]
        snap_med = statistics.median(st)
        full_med = next(r for r in rows if r["variant"] == "gradguard full")["median_ms"]
        snapshot = {"every": every, "median_ms": snap_med, "amortised_ms": snap_med / every,
                    "pct_train_step": 100 * snap_med / every / (fb_med + full_med)}

    prof = None
    if profile:
        v = next(v for v in variants if v.name == "gradguard default")
        pr = cProfile.Profile()
        for k in range(200):
            torch._foreach_copy_(v.grads, grad_sets[k % grad_sets_n])
            pr.enable()
            v.fn(losses[k % grad_sets_n])
            pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
        prof = buf.getvalue() + "\n" + "\n".join(
            f"aten ops per call, {u.name}: {count_ops(u, grad_sets[0], losses[0])}"
            for u in variants if u.name in ("clip_grad_norm_ alone", "bare step",
                                            "gradguard default", "gradguard full"))

    guards = {}
    for v in variants:
        if v.guard is not None:
            v.guard.close()
            kinds = sorted({e["kind"] for e in v.guard.recorder.events})
            guards[v.name] = {"steps": v.guard.steps, "skipped": int(v.guard.skipped),
                              "events": kinds}
    return {
        "model": name, "description": spec.description, "n_tensors": n_tensors,
        "started": time.strftime("%H:%M:%S", time.localtime(started)), "seconds": elapsed,
        "others_cores": others, "reps": reps,
        "n_params": n_params, "fwd_bwd_ms": fb_med, "train_step_ms": train_step,
        "bare_ms": bare_med, "clip_alone_ms": clip_alone_med, "rows": rows,
        "variants": names, "skipped": skipped, "sync_check": checks, "snapshot": snapshot,
        "guards": guards,
        "profile": prof,
    }


# --------------------------------------------------------------------------------------
# Report


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def model_table(res: dict[str, Any]) -> str:
    head = (f"### {res['model']}: {res['description']}\n\n"
            f"{res['n_tensors']} parameter tensors, {res['n_params'] / 1e6:.2f} M parameters. "
            f"Forward+backward {res['fwd_bwd_ms']:.2f} ms; training step with the bare "
            f"optimizer step {res['train_step_ms']:.2f} ms. {res['reps']} repetitions from "
            f"{res['started']} for {res['seconds']:.0f} s; other processes kept "
            f"{_f(res['others_cores'], '.2f')} CPU cores busy on average meanwhile.\n\n"
            "| variant | median ms | IQR ms | mean ms | × bare step | added ms | "
            "added ÷ clip_grad_norm_ alone | added % of training step |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in res["rows"]:
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.3f} | {r['p25_ms']:.3f}–{r['p75_ms']:.3f} "
            f"| {r['mean_ms']:.3f} | {_f(r['x_bare'], '.2f')} | {r['added_ms']:.3f} "
            f"| {r['added_x_clip']:.2f} | {r['added_pct_train_step']:.2f} |")
    tail = []
    for k, why in res["skipped"].items():
        tail.append(f"- `{k}` not measured: {why}")
    for k, ok in res["sync_check"].items():
        tail.append(f"- no-host-sync check, `{k}`: {ok}")
    for k, g in res["guards"].items():
        tail.append(f"- `{k}`: {g['steps']} steps, {g['skipped']} skipped, events: "
                    f"{', '.join(g['events']) or 'none'}")
    s = res["snapshot"]
    if s:
        tail.append(f"- rollback snapshot: {s['median_ms']:.3f} ms, every {s['every']} steps → "
                    f"{s['amortised_ms']:.4f} ms/step = {s['pct_train_step']:.3f} % of a "
                    "training step")
    return head + "\n".join(lines) + "\n\n" + "\n".join(tail) + "\n"


def _row(res: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((r for r in res["rows"] if r["variant"] == name), None)


def targets(results: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(target, met, evidence) for the targets of issue #8."""
    out: list[tuple[str, bool, str]] = []
    for res in results:
        g = _row(res, "gradguard default")
        if g is None:
            continue
        m = res["model"]
        ok = g["added_x_clip"] <= 1.15
        out.append((f"{m}: default guard ≤ 1.15× clip_grad_norm_", ok,
                    f"{g['added_ms']:.3f} ms vs {res['clip_alone_ms']:.3f} ms = "
                    f"{g['added_x_clip']:.2f}×"))
        peers = [r for r in res["rows"] if r["variant"].startswith(("+ zclip", "+ autoclip"))]
        if peers:
            worse = [r["variant"] for r in peers if r["added_ms"] <= g["added_ms"]]
            out.append((f"{m}: default guard cheaper than zclip and autoclip", not worse,
                        ", ".join(f"{r['variant'][2:]} {r['added_ms']:.3f} ms" for r in peers)
                        + f"; guard {g['added_ms']:.3f} ms"))
        if m in ("cnn", "lm"):
            out.append((f"{m}: guard adds ≤ 2 % of a training step",
                        g["added_pct_train_step"] <= 2.0,
                        f"{g['added_pct_train_step']:.2f} %"))
        s = res["snapshot"]
        if s:
            out.append((f"{m}: snapshot amortised ≤ 1 % of a step", s["pct_train_step"] <= 1.0,
                        f"{s['median_ms']:.2f} ms / {s['every']} = {s['pct_train_step']:.3f} %"))
    by = {r["model"]: r for r in results}
    if "deep" in by and "wide" in by:
        d, w = by["deep"], by["wide"]
        gd, gw = _row(d, "gradguard default"), _row(w, "gradguard default")
        if gd and gw:
            dn = d["n_tensors"] - w["n_tensors"]
            per_g = (gd["added_ms"] - gw["added_ms"]) / dn * 1e3
            per_c = (d["clip_alone_ms"] - w["clip_alone_ms"]) / dn * 1e3
            ratio = gd["added_ms"] / gw["added_ms"]
            clip_ratio = d["clip_alone_ms"] / w["clip_alone_ms"]
            out.append(("deep vs wide (same bytes, 43× the tensors): guard grows no more "
                        "than clip_grad_norm_ (ratio ≤ 1.15× clip's)",
                        ratio <= 1.15 * clip_ratio,
                        f"guard {gw['added_ms']:.3f} → {gd['added_ms']:.3f} ms ({ratio:.2f}×, "
                        f"{per_g:.2f} µs/tensor); clip_grad_norm_ {w['clip_alone_ms']:.3f} → "
                        f"{d['clip_alone_ms']:.3f} ms ({clip_ratio:.2f}×, {per_c:.2f} µs/tensor)"))
    return out


def environment(device: torch.device) -> dict[str, str]:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "threads": str(torch.get_num_threads()), "cpu": cpu_model(),
           "cores": str(os.cpu_count()), "gradguard": gg.__version__,
           "command": " ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run(models: list[str], reps: int = 200, warmup: int = 30, device: str = "cpu",
        threads: int = 2, steady: bool = True, grad_sets: int = 4, snapshot_reps: int = 10,
        profile: bool = False, wait_idle_s: float = 0.0) -> dict[str, Any]:
    """Measure ``models``; returns ``{"env": ..., "results": [...], "targets": [...]}``."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    results = []
    for m in models:
        if wait_idle_s > 0:
            wait_idle(wait_idle_s)
        results.append(run_model(m, reps, warmup, dev, grad_sets, steady, snapshot_reps,
                                 profile))
    return {"env": environment(dev), "results": results,
            "targets": [list(t) for t in targets(results)]}


def markdown(report: dict[str, Any]) -> str:
    env = report["env"]
    parts = ["## Environment\n", *(f"- {k}: {v}" for k, v in env.items()), ""]
    parts += ["## Per model\n", *(model_table(r) for r in report["results"])]
    parts += ["## Targets\n", "| target | met | evidence |", "|---|---|---|"]
    parts += [f"| {t} | {'met' if ok else 'MISSED'} | {ev} |" for t, ok, ev in report["targets"]]
    for r in report["results"]:
        if r.get("profile"):
            parts += [f"\n## cProfile of gradguard default on {r['model']} (200 steps)\n",
                      "```", r["profile"].strip(), "```"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated, from {sorted(MODELS)}")
    ap.add_argument("--reps", type=int, default=200, help="timed repetitions per variant")
    ap.add_argument("--warmup", type=int, default=30, help="interleaved warm-up rounds")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each model, wait up to this long for other processes to "
                         "leave the CPU (a shared machine)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile 200 steps of the default guard on each model")
    a = ap.parse_args(argv)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA build of torch and a GPU")
    report = run(models, a.reps, a.warmup, a.device, a.threads, profile=a.profile,
                 wait_idle_s=a.wait_idle)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    print(markdown(report))


if __name__ == "__main__":
    main()
