"""Re-initialisation: the fix for signal that grows or shrinks with depth.

``auto`` picks, per weight layer, the initialisation that keeps the variance of
activations and gradients constant through the activation that follows it:

- ReLU-family (ReLU, LeakyReLU, PReLU, ELU, GELU, SiLU, Mish): Kaiming (He et al. 2015,
  "Delving Deep into Rectifiers", eq. 10) with the nonlinearity's gain;
- tanh / sigmoid / none: Xavier (Glorot & Bengio 2010, "Understanding the difficulty of
  training deep feedforward neural networks", eq. 16) with torch's gain for it (5/3 for tanh);
- recurrent hidden-to-hidden weights: orthogonal, scaled to a spectral radius just below 1
  (Pascanu, Mikolov & Bengio 2013, section 3.3; Saxe et al. 2014 for orthogonal init);
- residual-branch output projections (names matching ``residual``): scaled by
  1/sqrt(2·n_blocks) as GPT-2 (Radford et al. 2019, section 2.3) and nanoGPT do.

Layer patterns (``layers=``, ``residual=``, here and in :mod:`gradguard.fixes.weights`) are
``fnmatch`` globs matched against the whole dotted module name, selecting the module they
name and every layer inside it: ``"fc1"`` is the layer ``fc1`` only (not ``fc10``),
``"*.c_proj"`` every ``c_proj`` at any depth, ``"1"`` the second layer of an
``nn.Sequential`` (not ``10``), ``"encoder"`` every layer inside ``encoder``. Patterns that
select no layer at all are refused (one of several may match nothing: a recipe can list
the names of several architectures).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, check_int, check_positive

__all__ = ["FixReport", "layer_activations", "reinit", "spectral_radius"]

SCHEMES = ("auto", "kaiming", "xavier", "orthogonal")
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RELU_LIKE = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.ReLU6)
_SATURATING = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Softsign)
ACTIVATIONS = _RELU_LIKE + _SATURATING
_MARK = "_gradguard_init"


@dataclass
class FixReport:
    """What a fix changed: one line per change, and the layers it touched."""

    fix: str
    changes: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.fix}: {len(self.layers)} layer(s) changed"
        lines = [head, *(f"  - {c}" for c in self.changes)]
        if self.skipped:
            lines.append(f"  (left as they were: {', '.join(self.skipped[:6])}"
                         f"{' …' if len(self.skipped) > 6 else ''})")
        return "\n".join(lines)


def layer_activations(model: nn.Module) -> dict[str, nn.Module | None]:
    """For each Linear/Conv layer, the activation that follows it in the forward pass.

    Read from the traced forward (``torch.fx``): an activation module, a functional one
    (``F.relu(self.fc(x))``, ``torch.tanh``, ``x.relu()``; returned as the equivalent
    module) or one module shared by several layers are all found, through the norms,
    dropout, pooling and reshapes in between; a layer whose output goes anywhere else
    first (another weight layer, a residual sum) maps to None. A forward that cannot be
    traced (data-dependent control flow) falls back to registration order, which is
    forward order for ``nn.Sequential`` stacks and the usual ``self.fc1 … self.act …``
    style.
    """
    out = _registered_activations(model)
    out.update(_traced_activations(model))
    return out


def _registered_activations(model: nn.Module) -> dict[str, nn.Module | None]:
    out: dict[str, nn.Module | None] = {}
    pending: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, _WEIGHTED):
            for p in pending:
                out.setdefault(p, None)
            pending = [name]
        elif isinstance(m, ACTIVATIONS):
            for p in pending:
                out[p] = m
            pending = []
    for p in pending:
        out.setdefault(p, None)
    return out


F = nn.functional
# Functional activations (and their Tensor-method names), as the module reinit reads them.
_FUNCTIONAL: dict[object, type[nn.Module]] = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, F.relu6: nn.ReLU6, F.gelu: nn.GELU,
    F.silu: nn.SiLU, F.elu: nn.ELU, F.mish: nn.Mish, torch.tanh: nn.Tanh,
    F.tanh: nn.Tanh, torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid,
    F.hardtanh: nn.Hardtanh, F.softsign: nn.Softsign,
    "relu": nn.ReLU, "relu_": nn.ReLU, "tanh": nn.Tanh, "tanh_": nn.Tanh,
    "sigmoid": nn.Sigmoid, "sigmoid_": nn.Sigmoid,
}
# What sits between a layer and its activation without changing which gain it needs.
_PASS_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Dropout,
                 nn.Flatten, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_PASS_CALLS: set[object] = {
    F.dropout, F.batch_norm, F.layer_norm, F.group_norm, F.max_pool1d, F.max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.flatten,
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
    "unsqueeze"}


def _traced_activations(model: nn.Module) -> dict[str, nn.Module | None]:
    """The activation after each weight layer the traced forward calls ({} when the
    forward cannot be traced)."""
    import torch.fx

    try:
        # Traced on a copy whose tensors are on the meta device: tracing runs the user's
        # forward, whose side effects (a counter, a cached tensor, a proxy stored on the
        # module) must not land on the model; the copy costs no memory for its weights.
        memo: dict[int, object] = {}
        for t in [*model.parameters(), *model.buffers()]:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, t.requires_grad) \
                if isinstance(t, nn.Parameter) else meta
        shadow = copy.deepcopy(model, memo)
        graph = torch.fx.symbolic_trace(shadow).graph
    except Exception:  # (any failure to copy or trace: fall back to registration order)
        return {}
    mods = dict(shadow.named_modules())
    out: dict[str, nn.Module | None] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), _WEIGHTED):
            # (a layer called twice keeps what follows its first call)
            out.setdefault(node.target, _activation_after(node, mods))
    return out


def _activation_after(node: object, mods: dict[str, nn.Module]) -> nn.Module | None:
    while True:
        users = list(node.users)  # type: ignore[attr-defined]
        if len(users) != 1:
            return None
        node = users[0]
        op, target = node.op, node.target  # type: ignore[attr-defined]
        if op == "call_module":
            m = mods.get(target)
            if isinstance(m, ACTIVATIONS):
                return m
            if isinstance(m, _PASS_MODULES):
                continue
            return None
        if op in ("call_function", "call_method"):
            if target in (F.leaky_relu, "leaky_relu"):
                args, kw = node.args, node.kwargs  # type: ignore[attr-defined]
                slope = kw.get("negative_slope", args[1] if len(args) > 1 else 0.01)
                return nn.LeakyReLU(slope if isinstance(slope, float | int) else 0.01)
            if (cls := _FUNCTIONAL.get(target)) is not None:
                return cls()
            if target in _PASS_CALLS:
                continue
        return None


def _gain_and_rule(act: nn.Module | None) -> tuple[str, str, float]:
    """(rule, nonlinearity name, a) for torch.nn.init given the following activation."""
    if isinstance(act, nn.LeakyReLU):
        return "kaiming", "leaky_relu", act.negative_slope
    if isinstance(act, _RELU_LIKE):
        return "kaiming", "relu", 0.0
    if isinstance(act, nn.Tanh | nn.Hardtanh | nn.Softsign):
        return "xavier", "tanh", 0.0
    if isinstance(act, nn.Sigmoid):
        return "xavier", "sigmoid", 0.0
    return "xavier", "linear", 0.0


def spectral_radius(w: torch.Tensor) -> float:
    """Largest |eigenvalue| of a square matrix."""
    return float(torch.linalg.eigvals(w.detach().double().cpu()).abs().max())


def _match(name: str, patterns: Sequence[str]) -> bool:
    """Whether the dotted module ``name`` is, or sits inside, a module one of the glob
    ``patterns`` names (whole names: ``"fc1"`` is not ``"fc10"``; ``"encoder"`` is every
    layer inside ``encoder``; ``"*.c_proj"`` is every ``c_proj``)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"{p}.*")
               for p in patterns)


def _patterns(value: object, fix: str, what: str = "layers") -> list[str] | None:
    """``layers=`` / ``residual=`` as a list of glob strings (None stays None; one string is
    one pattern, not its letters; an iterator is read once)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    try:
        out = list(value)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigError(f"{fix}: {what} takes a list of glob patterns of layer names "
                          f"(e.g. ['*.fc1']), got {value!r}") from None
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise ConfigError(f"{fix}: {what} takes glob patterns of layer names (strings such "
                          f"as '0' or '*.fc1'), got {bad[0]!r}; nothing was changed")
    return out


def _refuse_unmatched(names: Sequence[str], patterns: Sequence[str], fix: str,
                      what: str = "layers") -> None:
    """Patterns that select nothing at all are a typo or a partial name: say so, with the
    names. (One pattern of several that matches nothing is fine: a recipe may list the
    names several architectures use, ``["*.c_proj", "*.out_proj"]``.)"""
    unmatched = [p for p in patterns if not any(_match(n, [p]) for n in names)]
    if unmatched and len(unmatched) == len(patterns):
        hint = ""
        p = unmatched[0]
        if any(n.rsplit(".", 1)[-1] == p for n in names):
            hint = f" (patterns match the whole dotted name: '*.{p}' selects every {p!r})"
        raise ConfigError(f"{fix}: no layer matches {unmatched} in {what}{hint}; the model's "
                          f"layers are {[n for n in names if n][:12]}; nothing was changed")


def _is_lazy(m: nn.Module) -> bool:
    """A Lazy* layer not run yet: its weight has no shape."""
    return any(nn.parameter.is_lazy(p) for p in m.parameters(recurse=False))


def _hook_norm(m: nn.Module) -> str | None:
    """The hook-based (pre-parametrisation) ``torch.nn.utils.weight_norm`` or
    ``spectral_norm`` on ``m``, by name, or None: the layer's weight is then recomputed from
    ``weight_g``/``weight_v`` or ``weight_orig`` before every forward pass."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            return "torch.nn.utils.weight_norm"
        if isinstance(hook, SpectralNorm):
            return "torch.nn.utils.spectral_norm"
    return None


def _frozen(m: nn.Module) -> bool:
    """A layer whose weight is frozen (a weight tensor of its own with requires_grad=False:
    a frozen backbone, or BitFit-style training of the biases alone)."""
    return any(not p.requires_grad for n, p in m.named_parameters(recurse=False)
               if n.startswith("weight"))


FROZEN_NOTE = "frozen: its weight has requires_grad=False; frozen=True includes it"


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """For each parameter (by id), the names of the modules that hold it as their own."""
    owners: dict[int, list[str]] = {}
    seen: set[int] = set()
    for n, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(n)
    return owners


def _tied_to(owners: dict[int, list[str]], name: str, m: nn.Module,
             only_weight: bool = False) -> str | None:
    """The other module that holds one of ``m``'s parameters (tied weights), or None."""
    params = [m._parameters.get("weight")] if only_weight else list(
        m.parameters(recurse=False))
    for p in params:
        if p is None:
            continue
        others = [o for o in owners.get(id(p), []) if o != name]
        if others:
            return repr(others[0]) if others[0] else "the model itself"
    return None


def _count_blocks(names: Sequence[str]) -> tuple[int, str]:
    """The number of residual blocks the residual projections ``names`` sit in, and how it
    was read. Blocks in an ``nn.ModuleList`` / ``nn.Sequential`` (``h.0.attn.c_proj``,
    ``h.0.mlp.c_proj``): the distinct paths up to the last index before the layer's own
    name. Otherwise the distinct components right after the names' common prefix
    (``block1.…``)."""
    if len(names) <= 1:
        return max(1, len(names)), "one residual layer"
    parts = [n.split(".") for n in names]
    # The block is the path up to the last index before the layer's own name: nanoGPT's
    # h.0 (attn.c_proj and mlp.c_proj), a stage's stages.1.blocks.2, an MLP's blocks.0
    # in blocks.0.mlp.2. A name without one (a final projection) is a block of its own.
    lasts = [max((i for i, c in enumerate(ps[:-1]) if c.isdigit()), default=None)
             for ps in parts]
    if any(i is not None for i in lasts):
        keys = {".".join(ps if i is None else ps[:i + 1])
                for i, ps in zip(lasts, parts, strict=True)}
        return len(keys), "counted by block index in the layer names"
    common = 0
    while all(len(ps) > common + 1 and ps[common] == parts[0][common] for ps in parts):
        common += 1
    keys = {ps[common] for ps in parts}
    return len(keys), "counted from the layer names' paths"


@torch.no_grad()
def reinit(
    model: nn.Module,
    scheme: str = "auto",
    *,
    layers: Sequence[str] | None = None,
    residual: Sequence[str] = (),
    n_blocks: int | None = None,
    rnn_radius: float = 0.95,
    force: bool = False,
    frozen: bool = False,
) -> FixReport:
    """Re-initialise weight layers (and recurrent weights) of ``model`` in place.

    Args:
        model: the module to fix.
        scheme: "auto" (by the following activation), "kaiming", "xavier" or "orthogonal".
        layers: only these layer names (glob patterns over the whole dotted name, see the
            module docstring; one string is one pattern); default all weight layers.
        residual: glob patterns of residual-branch output projections to scale by
            1/sqrt(2·n_blocks) (e.g. ``["*.c_proj"]``).
        n_blocks: number of residual blocks. Default: counted from the matching layers'
            names, as blocks, not layers: nanoGPT's ``transformer.h.{i}.attn.c_proj`` and
            ``….mlp.c_proj`` are two projections in each of ``n_layer`` blocks, scaled
            1/sqrt(2·n_layer) as nanoGPT does. Blocks are the distinct paths up to the
            last index (an ``nn.ModuleList`` / ``nn.Sequential`` position) before the
            layer's own name (a name without one is a block of its own), or, when no
            name has one, the distinct components after the names' common prefix;
            the report says which count it used. Pass it when the blocks are laid out
            otherwise.
        rnn_radius: spectral radius for recurrent hidden-to-hidden weights, in (0, 1.5].
        force: re-initialise layers this function already initialised with the same scheme
            (otherwise they are left alone, so applying the fix twice changes nothing).
        frozen: also re-initialise layers whose weight is frozen (``requires_grad=False``).
            By default they are left alone (a frozen pretrained backbone would lose its
            weights for good) and listed in ``report.skipped``.

    Layers left alone, each listed in ``report.skipped`` with the reason: a lazy layer not
    run yet, a weight computed from others (a parametrisation, weight_norm, spectral_norm
    or pruning), a frozen weight (unless ``frozen=True``), a weight tied to another module
    (an LM head sharing the embedding table: re-initialising the head would overwrite the
    embedding with an init meant for the head; untie it, or re-initialise the table
    yourself), and a weighted module reinit has no rule for.

    Returns:
        A :class:`FixReport` naming each layer and the rule applied.

    Raises:
        ConfigError: a bad scheme, ``rnn_radius``, ``n_blocks`` or pattern, or a pattern in
            ``layers`` / ``residual`` that matches no layer; nothing is changed then.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"reinit takes an nn.Module, got {type(model).__name__}")
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    rnn_radius = check_positive("reinit.rnn_radius", rnn_radius)
    if rnn_radius > 1.5:
        raise ConfigError(f"reinit: rnn_radius must be in (0, 1.5], got {rnn_radius!r}")
    if n_blocks is not None:
        n_blocks = check_int("reinit.n_blocks", n_blocks, 1)
    layers = _patterns(layers, "reinit")
    residual = _patterns(residual, "reinit", "residual") or []
    names = [n for n, _ in model.named_modules()]
    if layers:
        _refuse_unmatched(names, layers, "reinit")
    if residual:
        _refuse_unmatched(names, residual, "reinit", "residual")
    report = FixReport(f"reinit(scheme={scheme!r})")
    acts = layer_activations(model)
    res_layers = [n for n in acts if residual and _match(n, residual)]
    blocks, how = (n_blocks, "n_blocks given") if n_blocks is not None else \
        _count_blocks(res_layers)
    targets = _targets(model, scheme, layers, force, frozen, report)
    # All or nothing: a layer torch cannot initialise (say, in a dtype it has no kernel
    # for) puts back the layers already done.
    saved = [(m, [(p, p.detach().clone()) for p in m.parameters(recurse=False)],
              getattr(m, _MARK, None)) for _, m in targets]
    try:
        for name, m in targets:
            if isinstance(m, nn.RNNBase):
                _reinit_rnn(name, m, rnn_radius, report)
            else:
                _reinit_layer(name, m, scheme, acts.get(name), name in res_layers, blocks,
                              report)
            setattr(m, _MARK, scheme)
            report.layers.append(name)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        for m, params, mark in saved:
            for p, before in params:
                p.copy_(before)
            if mark is None:
                if hasattr(m, _MARK):
                    delattr(m, _MARK)
            else:
                setattr(m, _MARK, mark)
        raise ConfigError(f"reinit could not initialise the model, and changed nothing: "
                          f"{e}") from e
    if any(n in res_layers for n in report.layers):
        report.changes.append(f"residual: {len(res_layers)} output projection(s) in {blocks} "
                              f"block(s) ({how}), each scaled 1/sqrt(2·{blocks})")
    return report


def _targets(model: nn.Module, scheme: str, layers: Sequence[str] | None, force: bool,
             frozen: bool, report: FixReport) -> list[tuple[str, nn.Module]]:
    """The layers ``reinit`` changes, in order; the others it looked at go to
    ``report.skipped`` with the reason."""
    out: list[tuple[str, nn.Module]] = []
    owners = _owners(model)
    for name, m in model.named_modules():
        if layers is not None and not _match(name, layers):
            continue
        if isinstance(m, (*_WEIGHTED, nn.RNNBase)):
            if getattr(m, _MARK, None) == scheme and not force:
                report.skipped.append(f"{name} (already re-initialised with {scheme!r}; "
                                      "force=True does it again)")
                continue
            if (why := _not_reinitable(m)) is not None:
                report.skipped.append(f"{name} ({why})")
                continue
            if not frozen and _frozen(m):
                report.skipped.append(f"{name} ({FROZEN_NOTE})")
                continue
            if (other := _tied_to(owners, name, m)) is not None:
                report.skipped.append(
                    f"{name} (its weight is tied to {other}: re-initialising it would "
                    f"overwrite {other} too; untie them, or initialise the shared tensor "
                    "yourself)")
                continue
            out.append((name, m))
        elif _has_matrix(m):  # (a weight reinit has no rule for: say so, not nothing)
            report.skipped.append(f"{name} (a {type(m).__name__}: no rule for it here)")
    return out


def _has_matrix(m: nn.Module) -> bool:
    """A layer with its own weight matrix that is not an embedding table or a norm's
    scale (ConvTranspose, MultiheadAttention's in_proj, Bilinear, custom modules)."""
    if isinstance(m, nn.Embedding | nn.EmbeddingBag | nn.modules.batchnorm._NormBase |
                  nn.LayerNorm | nn.GroupNorm):
        return False
    return any(p.dim() >= 2 and not nn.parameter.is_lazy(p)
               for p in m.parameters(recurse=False))


def _not_reinitable(m: nn.Module) -> str | None:
    """Why a layer's weight cannot be re-initialised in place, or None: a lazy layer has no
    weight yet, and a weight computed from others (a parametrisation, weight_norm,
    pruning) would be recomputed from them at the next forward pass, undoing the init."""
    if _is_lazy(m):
        return "lazy: not initialised yet; run one forward pass first"
    computed = torch.nn.utils.parametrize.is_parametrized(m) or _hook_norm(m) is not None \
        or any(hasattr(m, a) for a in ("weight_g", "weight_v", "weight_orig"))
    if computed:
        return ("its weight is computed (a parametrisation, weight_norm or pruning); "
                "re-initialise before applying it")
    return None


def _reinit_layer(name: str, m: nn.Module, scheme: str, act: nn.Module | None,
                  is_residual: bool, blocks: int, report: FixReport) -> None:
    w = m.weight
    rule, nonlin, a = _gain_and_rule(act)
    if scheme == "kaiming":
        rule = "kaiming"
        nonlin = "relu" if nonlin in ("linear", "tanh", "sigmoid") else nonlin
    elif scheme == "xavier":
        rule = "xavier"
    elif scheme == "orthogonal":
        rule = "orthogonal"
    if rule == "kaiming":
        nn.init.kaiming_normal_(w, a=a, nonlinearity=nonlin)
        desc = f"Kaiming normal ({nonlin})"
    elif rule == "xavier":
        gain = nn.init.calculate_gain(nonlin if nonlin != "linear" else "linear")
        nn.init.xavier_normal_(w, gain=gain)
        desc = f"Xavier normal (gain {gain:.3g} for {nonlin})"
    else:
        gain = nn.init.calculate_gain("relu" if nonlin == "relu" else
                                      ("tanh" if nonlin == "tanh" else "linear"))
        _orthogonal_(w, gain)
        desc = f"orthogonal (gain {gain:.3g})"
    if is_residual:
        w.mul_(1 / math.sqrt(2 * blocks))
        desc += f", scaled 1/sqrt(2·{blocks}) as a residual output projection"
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)
        desc += ", bias zeroed"
    after = type(act).__name__ if act is not None else "no activation"
    report.changes.append(f"{name} ({type(m).__name__}, before {after}): {desc}")


def _orthogonal_(t: torch.Tensor, gain: float) -> None:
    """``nn.init.orthogonal_``, drawn in float32 for a half-precision tensor (torch's QR has
    no half-precision kernel on a CPU)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        full = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        nn.init.orthogonal_(full, gain=gain)
        t.copy_(full)
    else:
        nn.init.orthogonal_(t, gain=gain)


def _reinit_rnn(name: str, m: nn.RNNBase, radius: float, report: FixReport) -> None:
    # One block of hidden_size rows per gate (4 for an LSTM, 3 for a GRU); with an LSTM's
    # proj_size the blocks are hidden × proj, and the projection back is weight_hr.
    h = m.hidden_size
    for pname, p in m.named_parameters():
        if pname.startswith("weight_hh"):
            for g in range(p.shape[0] // h):
                _orthogonal_(p[g * h : (g + 1) * h], radius)
        elif pname.startswith("weight_hr"):
            _orthogonal_(p, 1.0)
        elif pname.startswith("weight_ih"):
            nn.init.xavier_uniform_(p)
        elif pname.startswith("bias"):
            nn.init.zeros_(p)
    proj = ", projection orthogonal" if getattr(m, "proj_size", 0) else ""
    report.changes.append(f"{name} ({type(m).__name__}): recurrent weights orthogonal with "
                          f"spectral radius {radius}{proj}, input weights Xavier, biases "
                          "zeroed")
