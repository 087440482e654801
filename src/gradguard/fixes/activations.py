"""Swap activation modules model-wide, by a mapping or a named preset.

Presets:

- ``"smooth"``: piecewise-linear → smooth (ReLU/ReLU6/Hardswish → SiLU, Hardtanh → Tanh,
  Hardsigmoid → Sigmoid). SiLU (Elfwing, Uchibe & Doya 2018; Ramachandran et al. 2017)
  has a continuous derivative, so the local gradient does not jump between 0 and 1.
- ``"non-saturating"``: Tanh/Hardtanh/Softsign → GELU, Sigmoid → SiLU: no flat tails, so
  deep stacks do not lose their gradient to saturation (Glorot & Bengio 2010, section 3;
  Hendrycks & Gimpel 2016 for GELU).
- ``"leaky"``: ReLU → LeakyReLU(0.01): dead units keep a gradient (Maas et al. 2013).
- ``"bounded"``: ReLU-family → Tanh: every hidden activation stays in (−1, 1) however
  large the weights, so the forward signal cannot grow with depth (LeCun et al. 1998,
  "Efficient BackProp", section 4.4). It trades explosion for possible saturation;
  ReLU6's bound of 6 is not enough (measured on ``mlp-init``: ReLU6 ends at chance).

Only activation *modules* can be swapped; ``F.relu`` called inside ``forward`` is code, and
the report then says it found nothing to replace.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from ..errors import ConfigError
from .init import FixReport

__all__ = ["PRESETS", "swap_activations"]

Factory = type[nn.Module] | Callable[[], nn.Module]

PRESETS: dict[str, dict[type[nn.Module], Factory]] = {
    "smooth": {nn.ReLU: nn.SiLU, nn.ReLU6: nn.SiLU, nn.Hardswish: nn.SiLU,
               nn.Hardtanh: nn.Tanh, nn.Hardsigmoid: nn.Sigmoid},
    "non-saturating": {nn.Tanh: nn.GELU, nn.Hardtanh: nn.GELU, nn.Softsign: nn.GELU,
                       nn.Sigmoid: nn.SiLU},
    "leaky": {nn.ReLU: nn.LeakyReLU},
    "bounded": {nn.ReLU: nn.Tanh, nn.ReLU6: nn.Tanh, nn.LeakyReLU: nn.Tanh, nn.GELU: nn.Tanh,
                nn.SiLU: nn.Tanh},
}


def _resolve(mapping: Mapping[type[nn.Module], Factory] | str) -> dict[type[nn.Module], Factory]:
    if isinstance(mapping, str):
        if mapping not in PRESETS:
            raise ConfigError(f"swap_activations: unknown preset {mapping!r}; choose from "
                              f"{', '.join(PRESETS)} or pass a mapping {{nn.Tanh: nn.GELU}}")
        return PRESETS[mapping]
    if not isinstance(mapping, Mapping) or not mapping:
        raise ConfigError("swap_activations: pass a preset name or a non-empty mapping "
                          f"{{old module class: new class or factory}}, got {mapping!r}")
    for old, new in mapping.items():
        if not (isinstance(old, type) and issubclass(old, nn.Module)):
            raise ConfigError(f"swap_activations: mapping keys must be nn.Module classes, "
                              f"got {old!r}")
        if isinstance(new, nn.Module):
            raise ConfigError(f"swap_activations: the replacement for {old.__name__} must be a "
                              f"class or a zero-argument factory, got the module {new!r}: "
                              f"pass {type(new).__name__} (or lambda: {new!r}), so each "
                              "place gets its own")
        if not callable(new):
            raise ConfigError(f"swap_activations: the replacement for {old.__name__} must be a "
                              f"class or a zero-argument factory, got {new!r}")
    return dict(mapping)


def _fast_path_code(act: nn.Module) -> int:
    """``nn.TransformerEncoderLayer.activation_relu_or_gelu`` for the activation ``act``, as
    the layer's ``__init__`` sets it: 1 ReLU, 2 GELU, 0 anything else. The eval-mode fast
    path computes ReLU or (exact) GELU from this flag and ignores ``.activation``; 0 turns
    the fast path off, so ``.activation`` runs. A tanh-approximated GELU gets 0 (torch
    would say 2 and compute the exact GELU on the fast path)."""
    if isinstance(act, nn.ReLU):
        return 1
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return 2
    return 0


def swap_activations(model: nn.Module,
                     mapping: Mapping[type[nn.Module], Factory] | str = "smooth") -> FixReport:
    """Replace every activation module of a mapped type, wherever it sits in ``model``.

    Each old module gets a fresh replacement (one module shared at several paths gets one
    replacement shared the same way). Replacements are never themselves mapped, so a
    second call finds nothing left to replace and changes nothing. An
    ``nn.TransformerEncoderLayer``'s ``activation_relu_or_gelu`` flag is set to match its
    new ``.activation`` (as the layer's ``__init__`` would), so torch's eval-mode fast path
    computes the new activation too, not the old ReLU/GELU.

    Args:
        model: the module to change in place.
        mapping: ``{old class: new class or zero-argument factory}`` (e.g.
            ``{nn.Tanh: nn.GELU}``) or a preset name from :data:`PRESETS`.

    Returns:
        A :class:`FixReport` with each replaced module path, old → new.

    Raises:
        ConfigError: an unknown preset, a malformed mapping, ``model`` itself is a mapped
            activation (it cannot be replaced in place), or a replacement is of a mapped type
            (the swap would not be idempotent).
    """
    table = _resolve(mapping)
    label = mapping if isinstance(mapping, str) else ", ".join(
        f"{k.__name__}→{getattr(v, '__name__', repr(v))}" for k, v in table.items())
    fix = f"swap_activations({label!r})"
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{fix}: model must be an nn.Module, got {type(model).__name__}")
    keys = tuple(table)
    if isinstance(model, keys):
        raise ConfigError(f"{fix}: the model itself is a {type(model).__name__}; wrap it in a "
                          "container to swap it")
    report = FixReport(fix)
    done: dict[int, nn.Module] = {}
    # Every path, shared modules included, collected before any is replaced; and every
    # replacement built (and checked) before the first goes in: all or nothing.
    targets = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
               if n and isinstance(m, keys)]
    like = next((t for t in [*model.parameters(), *model.buffers()]
                 if t.is_floating_point()), None)
    for _, old in targets:
        if id(old) in done:
            continue
        factory = table.get(type(old)) or next(v for k, v in table.items() if isinstance(old, k))
        new = factory()
        if not isinstance(new, nn.Module):
            raise ConfigError(f"{fix}: the factory for {type(old).__name__} returned "
                              f"{type(new).__name__}, not an nn.Module; nothing was changed")
        if isinstance(new, keys):
            raise ConfigError(f"{fix}: {type(old).__name__} would become "
                              f"{type(new).__name__}, itself a mapped type; a second call "
                              "would swap it again; nothing was changed")
        if like is not None:  # (a replacement with weights, PReLU: the model's dtype, device)
            new.to(device=like.device, dtype=like.dtype)
        done[id(old)] = new
    for name, old in targets:
        new = done[id(old)]
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, new)
        if attr == "activation" and hasattr(owner, "activation_relu_or_gelu"):
            owner.activation_relu_or_gelu = _fast_path_code(new)
        report.layers.append(name)
        report.changes.append(f"{name}: {type(old).__name__} → {type(new).__name__}")
    if not targets:
        report.changes.append(
            f"nothing to replace: no {', '.join(k.__name__ for k in keys)} module in the model "
            "(activations called as functions in forward() cannot be swapped)")
    return report
