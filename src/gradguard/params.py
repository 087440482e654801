"""Which parameters the guard watches, their names, and the order the forward pass uses."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import graph
from .distributed import local_tensor
from .errors import ConfigError, GuardUsageWarning

__all__ = ["ForwardOrder", "InputWatch", "optimizer_params", "resolve_params"]
def resolve_params(
    model: nn.Module | None, optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None,
) -> tuple[list[str], list[Tensor], list[tuple[str, Tensor]]]:
    """The parameters the guard watches, with names, in model registration order; and,
    when the guard chose them (no ``params``), the optimizer's parameters it left out for
    being frozen then, with their names (see ``HostSide.thawed``)."""
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_ids = {id(p) for p in opt_params}
    if not opt_params:
        raise ConfigError("the optimizer has no parameters; build it with model.parameters()")
    names: list[str] = []
    chosen: list[Tensor] = []
    if params is not None:
        if isinstance(params, nn.Module):
            raise ConfigError(f"params= takes tensors, got the module {type(params).__name__}"
                              ": params=model.parameters(), or leave params out to watch the "
                              "model's trainable parameters")
        wanted = list(params)
        if any(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
               for p in wanted):
            raise ConfigError("params= takes tensors, got (name, tensor) pairs: pass "
                              "model.parameters(), or [p for _, p in model.named_parameters()]")
        bad = next((p for p in wanted if not isinstance(p, Tensor)), None)
        if bad is not None:
            raise ConfigError(f"params= takes tensors, got a {type(bad).__name__}")
        if not wanted:
            raise ConfigError("params= is empty: pass the tensors to watch, or leave it out "
                              "to watch the model's trainable parameters")
        missing = [i for i, p in enumerate(wanted) if id(p) not in opt_ids]
        if missing:
            raise ConfigError(
                f"params #{missing[:5]} are not in the optimizer; the guard can only skip "
                "steps of parameters the optimizer updates"
            )
        lookup = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        for i, p in enumerate(wanted):
            names.append(lookup.get(id(p), f"param{i}"))
            chosen.append(p)
        return names, chosen, []
    if model is not None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        foreign = [n for n, p in trainable if id(p) not in opt_ids]
        if foreign and len(foreign) == len(trainable):
            raise ConfigError(
                "none of the model's trainable parameters are in the optimizer: build the "
                "optimizer from this model's parameters "
                "(e.g. torch.optim.AdamW(model.parameters()))"
            )
        if foreign:
            raise ConfigError(
                f"{len(foreign)} trainable parameter(s) of the model are not in the optimizer "
                f"(first: {foreign[:3]}); freeze them (requires_grad_(False)), add them to the "
                "optimizer, or pass params= to guard a subset"
            )
        seen: set[int] = set()
        for n, p in trainable:
            seen.add(id(p))
            names.append(n)
            chosen.append(p)
        named = optimizer_params(model, optimizer)
        for n, p in named:
            if id(p) not in seen and p.requires_grad:
                names.append(n)
                chosen.append(p)
        if not chosen:
            raise ConfigError(
                "every parameter the optimizer holds is frozen (requires_grad=False), so the "
                "guard has none to watch: build it after unfreezing, or pass "
                "params=[p for g in optimizer.param_groups for p in g['params']] to watch "
                "them once they are unfrozen")
        watched = {id(p) for p in chosen}
        return names, chosen, [(n, p) for n, p in named if id(p) not in watched]
    named = optimizer_params(None, optimizer)
    return [n for n, _ in named], [p for _, p in named], []


def optimizer_params(model: nn.Module | None, optimizer: torch.optim.Optimizer
                     ) -> list[tuple[str, Tensor]]:
    """Every parameter of the optimizer, named: the model's name for it, else its place
    (``group{i}.param{j}``)."""
    by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    return [(by_id.get(id(p), f"group{gi}.param{pi}"), p)
            for gi, g in enumerate(optimizer.param_groups) for pi, p in enumerate(g["params"])]


def refuses_hooks(module: nn.Module) -> bool:
    """A scripted module (torch.jit.script) refuses forward hooks; traced ones take them."""
    return isinstance(module, torch.jit.RecursiveScriptModule)


def hook_weighted_modules(model: nn.Module, hook: Callable[..., Any],
                          after: Callable[..., Any] | None = None) -> list[Any]:
    """Register ``hook`` as a forward pre-hook (and ``after``, if given, as a forward
    hook) on every module that owns parameters; the handles. Frameworks call
    submodules, not always the root (Lightning's training_step). Scripted modules
    (torch.jit.script) refuse hooks and are left out (what the hooks watch is then not
    seen through them). All or none: a module refusing a hook takes the ones already
    registered off again."""
    handles: list[Any] = []
    try:
        for m in model.modules():
            if refuses_hooks(m):
                continue
            if any(True for _ in m.parameters(recurse=False)):
                handles.append(m.register_forward_pre_hook(hook))
                if after is not None:
                    handles.append(m.register_forward_hook(after))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


# torch's recurrent layers: their forward runs the recurrence inside one call.
_RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase)


class ForwardOrder:
    """Learns the order in which modules run in the first forward pass, which recurrent
    and attention layers ran (and, with ``outputs``, whether its graph computes
    attention), then unhooks."""

    def __init__(self, model: nn.Module | None, params: Sequence[Tensor],
                 outputs: bool = False) -> None:
        self.model = model
        self.params = params
        self.calls: list[nn.Module] = []  # each module once, in the order it first ran
        self._seen: set[int] = set()
        # With ``outputs``, the autograd nodes of each module's latest output: the model's
        # graph, for attention a loss passed detached (or not at all) would not show.
        self._outputs: dict[int, list[Any]] = {}
        self.handles = [] if model is None else hook_weighted_modules(
            model, self._hook, self._output if outputs else None)

    def _hook(self, module: nn.Module, _args: Any) -> None:
        # (bounded by the model's modules: a guard built and never stepped keeps these
        # hooks through every forward pass until it is closed)
        if id(module) not in self._seen:
            self._seen.add(id(module))
            self.calls.append(module)

    def _output(self, module: nn.Module, _args: Any, out: Any) -> None:
        if torch.compiler.is_compiling():  # (a compiled graph's nodes are one opaque node)
            return
        fns = [t.grad_fn for t in _floating_leaves(out) if t.grad_fn is not None]
        if fns:  # (a forward under no_grad leaves the last one with a graph)
            self._outputs[id(module)] = fns

    def graph_attention(self) -> bool:
        """With ``outputs``: whether the first forward pass's graph computes dot-product
        attention (see :func:`gradguard.graph.computes_attention`)."""
        fns = [fn for fns in self._outputs.values() for fn in fns]
        self._outputs = {}
        return bool(fns) and graph.computes_attention(graph.nodes(fns))

    def recurrent(self) -> list[str]:
        """Names of torch's recurrent layers (RNN/LSTM/GRU and their cells) that ran
        before the first step with parameters the guard watches. A hand-written loop over
        time steps is not told apart from a layer shared for another reason (an
        encoder-decoder's embedding, a Siamese encoder, a detection head shared across
        feature levels), so only the types count; a frozen or unused RNN does not."""
        return self._ran(_RECURRENT_TYPES)

    def attention(self) -> list[str]:
        """Names of the ``nn.MultiheadAttention`` layers that ran before the first step
        with parameters the guard watches (attention computed by other code is found in
        the graph of the model's outputs or of the loss instead, see :meth:`graph_attention`
        and :mod:`gradguard.graph`)."""
        return self._ran(nn.MultiheadAttention)

    def _ran(self, types: Any) -> list[str]:
        if self.model is None:
            return []
        ran = {id(m) for m in self.calls}
        watched = {id(p) for p in self.params}
        return [name for name, m in self.model.named_modules()
                if isinstance(m, types) and id(m) in ran
                and any(id(p) in watched for p in m.parameters(recurse=False))]

    @property
    def first(self) -> nn.Module | None:
        """The first module with parameters that the forward pass ran."""
        return self.calls[0] if self.calls else None

    def remove(self) -> None:
        """Take the hooks off (also when the guard closes before any forward pass)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self._outputs = {}  # (the graphs they hold: read before, by graph_attention)

    def finish(self) -> list[int]:
        """Positions of the guarded params in forward order (unused ones at the end)."""
        self.remove()
        pos = {id(p): i for i, p in enumerate(self.params)}
        order: list[int] = []
        seen: set[int] = set()
        for m in self.calls:
            for p in m.parameters(recurse=False):
                i = pos.get(id(p))
                if i is not None and i not in seen:
                    seen.add(i)
                    order.append(i)
        order += [i for i in range(len(self.params)) if i not in seen]
        return order




def input_module(model: nn.Module | None, first: nn.Module) -> nn.Module:
    """The module whose inputs are the data: the first layer the forward pass ran, or,
    for a model compiled with ``torch.compile``, the compiled wrapper itself (a compiled
    graph does not run hooks added to its inner layers after it was compiled)."""
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    wrapper = getattr(compiled, "OptimizedModule", None)
    return model if wrapper is not None and isinstance(model, wrapper) else first


def _floating_leaves(obj: Any, depth: int = 8) -> Iterator[Tensor]:
    """Every floating (or complex) dense tensor in ``obj`` (a DTensor: this rank's shard),
    through mappings, lists, tuples (named ones too) and dataclasses, down to ``depth``
    levels; a list or tuple of plain values (ids, strings) is not walked."""
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "fc":
        obj = torch.from_numpy(obj)  # (no copy; read on the host)
    if isinstance(obj, Tensor):
        t = local_tensor(obj)
        if (t.is_floating_point() or t.is_complex()) and t.layout == torch.strided \
                and not t.is_meta and not t.is_nested:
            yield t
    elif depth <= 0 or isinstance(obj, str | bytes):
        return
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _floating_leaves(v, depth - 1)
    elif isinstance(obj, list | tuple):
        if obj and isinstance(obj[0], int | float | complex | str | bytes):
            return  # (a column of plain values: no tensor to find, and slow to walk)
        for v in obj:
            yield from _floating_leaves(v, depth - 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _floating_leaves(getattr(obj, f.name, None), depth - 1)


def _holds_tensor(obj: Any, depth: int = 8) -> bool:
    """Whether ``obj`` holds any tensor or array at all, where :func:`_floating_leaves`
    looks (a batch of integer ids holds nothing to watch, and says so by holding some)."""
    if isinstance(obj, Tensor | np.ndarray):
        return True
    if depth <= 0 or isinstance(obj, str | bytes):
        return False
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v, depth - 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_holds_tensor(v, depth - 1) for v in obj[:64])
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return any(_holds_tensor(getattr(obj, f.name, None), depth - 1)
                   for f in dataclasses.fields(obj))
    return False


def _first_floating(values: Sequence[Any]) -> Tensor | None:
    """The first floating (or complex) tensor among ``values``, looking one level into a
    dict, list or tuple (a batch passed as ``model(batch)`` or ``model(x=...)``); None
    when there is none, or when it is one torch has no ``isfinite`` for (sparse, nested)."""
    for v in values:
        for t in (v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple)
                  else (v,)):
            if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()):
                return next(_floating_leaves(t), None)
    return None


class InputWatch:
    """Records, per step, whether the data held NaN/Inf: the first floating tensor passed
    to the first layer (positionally, by keyword, or one level down in a dict, list or
    tuple), at its first call of the step.

    Only that one: the first layer's later calls (a recurrence written by hand feeds it
    its own hidden state, a tied embedding decodes with it) and its other arguments (an
    additive attention mask full of -inf, a carried state) are the model's, and a NaN
    there is the model's fault. A first call with no floating tensor (token ids) leaves
    the step unwatched. With micro-batches accumulated into one step only the first is
    watched; a NaN in a later one is judged as any other NaN step.

    A batch passed to ``guard.step(loss, batch=...)`` is watched whole (:meth:`check_batch`:
    every floating tensor in it, targets included), so NaN labels or targets count as the
    data's too; nothing else tells them apart from a model whose loss went NaN.

    The step's flag is a device tensor that travels to the host in the step's row (the
    ``bad_inputs`` column), so reading it costs no sync. Armed (:meth:`arm`) at the first
    step where rows reach the host late (CUDA), so the first NaN/Inf rows are already
    watched; else at the first NaN/Inf row, so a healthy run on a CPU pays nothing. The
    hook keeps no step number and no reference to the guard: under ``torch.compile`` it
    traces to two variants (first call of a step or not), and a guard never closed can
    still be collected (its finalizer takes the hook off).
    """

    def __init__(self) -> None:
        self.handle: Any = None
        self.armed = False
        self.open = True  # the step's first call is still to come
        self.flag: Tensor | None = None
        self.batch: Tensor | None = None  # the flag of the batches passed to step
        self.warned = False  # (a batch with no tensor in it: said once)

    def arm(self, module: nn.Module | None) -> None:
        """Watch from now on: ``module``'s inputs (None: no layer ran, only the batch)."""
        self.armed = True
        if self.handle is None and module is not None:
            self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: nn.Module, args: Any, kwargs: Any) -> None:
        if not self.open or not torch.is_grad_enabled():
            return  # a later call of the step, or an evaluation pass between steps
        self.open = False
        x = _first_floating([*args, *kwargs.values()])
        if x is not None:
            self.flag = ~torch.isfinite(x).all()

    def batch_flag(self, batch: Any, device: torch.device) -> Tensor | None:
        """NaN/Inf in any floating tensor of ``batch`` (None: not armed, or none to watch),
        as a flag on ``device`` that needs no host wait: a tensor on the CPU while the
        guard is elsewhere is read on the host, where reading it is free."""
        if not self.armed:
            return None
        flags: list[Tensor] = []
        host_bad = False
        for t in _floating_leaves(batch):
            try:
                bad = ~torch.isfinite(t).all()
            except (NotImplementedError, RuntimeError):
                continue  # (a dtype or layout torch has no isfinite for: left unwatched)
            if bad.device.type == "cpu" and device.type != "cpu":
                host_bad = host_bad or bool(bad)
            else:
                flags.append(bad)
        if host_bad:
            flags.append(torch.ones((), dtype=torch.bool, device=device))
        if not flags:
            if not self.warned and batch is not None and not _holds_tensor(batch):
                self.warned = True
                warnings.warn(
                    f"guard.step(batch=...) found no tensor in the {type(batch).__name__} it "
                    "was given, so nothing in it is watched for NaN/Inf: pass the tensors "
                    "(in dicts, lists, tuples or dataclasses)", GuardUsageWarning,
                    stacklevel=4)
            return None
        flag = flags[0]
        for f in flags[1:]:
            flag = flag | f
        return flag

    def add(self, flag: Tensor | None) -> None:
        """Fold a batch's flag (:meth:`batch_flag`) into the step's."""
        if flag is not None:
            self.batch = flag if self.batch is None else self.batch | flag

    def check_batch(self, batch: Any, device: torch.device) -> None:
        """Add the step's batch to its flag (when armed)."""
        self.add(self.batch_flag(batch, device))

    def take(self) -> Tensor | None:
        """The step's flag (None: nothing watched); the next call opens the next step."""
        flag, batch = self.flag, self.batch
        self.flag, self.batch, self.open = None, None, True
        if flag is None or batch is None:
            return batch if flag is None else flag
        return flag.to(batch.device) | batch

    def remove(self) -> None:
        self.armed = False
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
