"""The adapter lifecycle: wrap, activate, merge, disable, delete, unwrap.

A wrapped model is the user's own model object, changed in place: adapter layers stand where
the targeted modules stood, and ``model._peftcore`` (a :class:`PeftState`, plain data) records
which adapters exist. Methods are looked up by name in the registry when needed, never stored
on the model, so a wrapped model deep-copies and pickles like any module.

Every function that changes the model either succeeds or leaves the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from peftcore import registry, routing, targeting
from peftcore.errors import AdapterNotFoundError, AdapterStateError, ConfigError, PeftcoreError, TargetError
from peftcore.integrations import transformers as hf_integration

STATE_ATTR = "_peftcore"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")


@dataclasses.dataclass
class AdapterRecord:
    """What the model knows of one adapter.

    Attributes:
        name: the adapter's name.
        method: the method's registry name.
        config: the method's config object.
        targets: module paths the adapter attached to.
        trainable: paths of original modules trained in full with this adapter (``trainable=``).
        provider: distribution and version of the method (recorded in saved adapters).
        merged: whether the adapter is folded into the base weights.
    """

    name: str
    method: str
    config: Any
    targets: list[str]
    trainable: list[str]
    provider: dict[str, str | None]
    merged: bool = False


@dataclasses.dataclass
class PeftState:
    """The adapter bookkeeping stored on a wrapped model.

    Attributes:
        adapters: adapter records by name, in the order they were added.
        active: names of the adapters that run in forward.
        base_requires_grad: ``requires_grad`` of every parameter before the first wrap,
            restored by :func:`unwrap`.
    """

    adapters: dict[str, AdapterRecord]
    active: list[str]
    base_requires_grad: dict[str, bool]


# -- state helpers -------------------------------------------------------------------------------
def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"peftcore works on torch.nn.Module objects, got {type(model).__name__}")


def parallel_inner(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper (else ``model``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _refuse_parallel_wrapper(model: nn.Module, call: str) -> None:
    """Adding an adapter under DDP would leave it out of DDP's gradient synchronisation."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        kind = type(model).__name__
        raise ConfigError(
            f"peftcore.{call} on a {kind}: {kind} records the parameters it synchronises when it is built, so an "
            f"adapter added now would not train in step across ranks. Call peftcore.{call}(model, ...) on the model "
            f"first, then build {kind}(model)"
        )


def get_state(model: nn.Module, required: bool = True) -> PeftState | None:
    """The model's :class:`PeftState`; raises :class:`AdapterStateError` if not wrapped and ``required``."""
    _check_model(model)
    state = model.__dict__.get(STATE_ATTR)
    if state is None and required:
        raise AdapterStateError(
            f"this {type(model).__name__} holds no peftcore adapter; add one with peftcore.wrap(model, 'lora') "
            "or peftcore.load(model, path)"
        )
    return state


def _record(state: PeftState, name: str) -> AdapterRecord:
    if name not in state.adapters:
        known = ", ".join(state.adapters) or "none"
        raise AdapterNotFoundError(f"no adapter named {name!r} on this model; adapters: {known}")
    return state.adapters[name]


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"adapter name {name!r} is not valid: use letters, digits, '_' and '-' (no dots), e.g. 'default' or 'task_a'"
        )


def _make_config(method: Any, options: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(method.config_class)} if dataclasses.is_dataclass(method.config_class) else None
    if fields is not None:
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ConfigError(
                f"{method.name} has no option {', '.join(map(repr, unknown))}; its options are: {', '.join(sorted(fields))}"
            )
    try:
        return method.config_class(**options)
    except PeftcoreError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {method.name} options {options}: {exc}") from exc


# -- atomicity -----------------------------------------------------------------------------------
_CONTAINERS = (dict, list, set)


class _Snapshot:
    """A cheap record of a model's structure, enough to undo a failed change.

    Saves, for every module, a one-level copy of its ``__dict__`` (children, parameters,
    buffers, hooks, plain attributes), and for every parameter its tensor and
    ``requires_grad``. Methods must rebind (``param.data = new``), never write base tensors in
    place, while attaching; then restoring the snapshot undoes everything they did.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = [(m, self._copy_dict(m)) for m in model.modules()]
        self.params = [(p, p.data, p.requires_grad) for p in model.parameters()]

    @staticmethod
    def _copy_dict(module: nn.Module) -> dict[str, Any]:
        saved = {k: copy.copy(v) if isinstance(v, _CONTAINERS) else v for k, v in module.__dict__.items()}
        if STATE_ATTR in saved:
            saved[STATE_ATTR] = copy.deepcopy(saved[STATE_ATTR])
        return saved

    def restore(self) -> None:
        for module, saved in self.modules:
            module.__dict__.clear()
            module.__dict__.update(saved)
        for param, data, requires_grad in self.params:
            if param.data.data_ptr() != data.data_ptr() or param.shape != data.shape:
                param.data = data
            param.requires_grad_(requires_grad)


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[None]:
    """Undoes every structural change to ``model`` made in the block if the block raises."""
    snapshot = _Snapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


# -- trainability and activity -----------------------------------------------------------------------
def _all_adapter_params(model: nn.Module, state: PeftState) -> dict[str, list[nn.Parameter]]:
    out = {}
    for name, record in state.adapters.items():
        method = registry.get_method(record.method)
        out[name] = [p for _, p in method.adapter_parameters(model, name)]
    return out


def apply_trainability(model: nn.Module, state: PeftState) -> None:
    """Freezes everything, then unfreezes the active adapters and their ``trainable=`` modules."""
    adapter_params = _all_adapter_params(model, state)
    adapter_ids = {id(p) for params in adapter_params.values() for p in params}
    for param in model.parameters():
        param.requires_grad_(False)
    for name in state.active:
        for param in adapter_params[name]:
            param.requires_grad_(True)
        for path in state.adapters[name].trainable:
            for param in targeting.get_module(model, path).parameters():
                if id(param) not in adapter_ids:
                    param.requires_grad_(True)


def _apply_active(model: nn.Module, state: PeftState) -> None:
    by_method: dict[str, list[str]] = {}
    for name, record in state.adapters.items():
        by_method.setdefault(record.method, [])
        if name in state.active:
            by_method[record.method].append(name)
    for method_name, names in by_method.items():
        registry.get_method(method_name).set_active(model, names)
    apply_trainability(model, state)


# -- public API --------------------------------------------------------------------------------------
def wrap(
    model: nn.Module,
    method: str,
    *,
    name: str = "default",
    targets: targeting.Selection = None,
    exclude: targeting.Selection = None,
    trainable: targeting.Selection = None,
    layers: int | Sequence[int] | None = None,
    **options: Any,
) -> nn.Module:
    """Adds an adapter to ``model`` in place and returns the same model object.

    Every base parameter is frozen; the new adapter's parameters and the ``trainable`` modules
    train. The new adapter becomes the only active one (earlier adapters stay attached, inactive;
    see :func:`activate`).

    Args:
        model: any ``nn.Module`` (transformers models included).
        method: a registered method name, e.g. ``"lora"`` (see :func:`peftcore.methods`).
        name: the adapter's name (letters, digits, ``_``, ``-``).
        targets: modules to attach to (names, regex, ``"all-linear"`` or callable); ``None``
            uses the method's default (LoRA: every linear-like layer but the output head).
        exclude: modules to leave out, same forms as ``targets``.
        trainable: original modules to train in full with this adapter, e.g. ``["classifier"]``.
        layers: keep only targets in these block indices (negative counts from the end).
        **options: the method's options, e.g. ``rank=8, alpha=16, dropout=0.1`` for LoRA.

    Returns:
        ``model`` itself.

    Raises:
        ConfigError: bad option values or adapter name (a ``ValueError``).
        TargetError: a selection that matches nothing (a ``ValueError``).
        UnsupportedModuleError: a target type without a layer handler (a ``TypeError``).
        PluginError: unknown method, or a plugin that fails to load.
        AdapterStateError: the name is taken.
    """
    _check_model(model)
    _refuse_parallel_wrapper(model, "wrap")
    _check_name(name)
    state = get_state(model, required=False)
    if state is not None and name in state.adapters:
        raise AdapterStateError(
            f"the model already has an adapter named {name!r}; pass another name=..., or remove it "
            f"first with peftcore.delete(model, {name!r})"
        )
    method_obj = registry.get_method(method)
    config = _make_config(method_obj, options)
    spec = targeting.TargetSpec(targets=targets, exclude=exclude, layers=layers)
    paths = method_obj.resolve_targets(model, config, spec)
    method_obj.check_targets(model, config, paths)
    trainable_paths = resolve_trainable(model, trainable, paths)
    attach(model, method_obj, name, config, paths, trainable_paths)
    return model


def resolve_trainable(model: nn.Module, trainable: targeting.Selection, targets: list[str]) -> list[str]:
    """Paths of the ``trainable=`` modules; they may not be adapter targets themselves."""
    if trainable is None:
        return []
    paths = targeting.matching(model, trainable, what="trainable")
    clash = [p for p in paths if p in targets]
    if clash:
        raise TargetError(
            f"{clash[0]!r} is both an adapter target and trainable=; a module either gets an adapter "
            "or trains in full. Drop it from one of the two"
        )
    return paths


def attach(model: nn.Module, method: Any, name: str, config: Any, paths: list[str], trainable: list[str]) -> None:
    """Attaches adapter ``name`` to resolved paths and records it; all or nothing.

    Every module the method adds takes the training mode of the module it stands in for (see
    :func:`match_training_mode`), whatever mode its constructor left it in.
    """
    state = get_state(model, required=False)
    with transaction(model):
        if state is None:
            state = PeftState({}, [], {n: p.requires_grad for n, p in model.named_parameters()})
            model.__dict__[STATE_ATTR] = state
            hf_integration.install(model)  # its save_pretrained (and Trainer's saves) write the adapter too
            routing.install(model)  # model(..., adapter_names=[...]) routes per example
        before = {id(m) for m in model.modules()}
        method.attach(model, name, config, paths)
        match_training_mode(model, before)
        provider = registry.method_provider(method.name)
        state.adapters[name] = AdapterRecord(name, method.name, config, list(paths), list(trainable), provider)
        state.active = [name] + [n for n in state.active if state.adapters[n].merged]
        _apply_active(model, state)


def match_training_mode(model: nn.Module, before: set[int]) -> None:
    """Puts every module of ``model`` not in ``before`` (ids) into the training mode it should have.

    A module that keeps an original module as ``base_layer`` (an adapter layer) takes that
    module's mode; any other new module takes its parent's. Original modules keep their own, so a
    model in eval mode stays in eval mode after ``wrap``/``load`` (no dropout at inference), and
    one in training mode trains its adapters with dropout.
    """

    def visit(module: nn.Module, mode: bool) -> None:
        for child in module.children():
            if id(child) in before:
                visit(child, child.training)
                continue
            base = child._modules.get("base_layer")
            child.training = base.training if base is not None and id(base) in before else mode
            visit(child, child.training)

    visit(model, model.training)


def adapters(model: nn.Module) -> "AdapterTable":
    """The adapters on ``model``: name -> :class:`AdapterInfo` (empty for a plain model)."""
    state = get_state(model, required=False)
    table = AdapterTable()
    if state is None:
        return table
    for name, record in state.adapters.items():
        table[name] = AdapterInfo(name, record.method, name in state.active, record.merged, len(record.targets), record.config)
    return table


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One adapter as :func:`adapters` reports it."""

    name: str
    method: str
    active: bool
    merged: bool
    num_targets: int
    config: Any

    def __str__(self) -> str:
        flags = ", ".join(f for f, on in (("active", self.active), ("merged", self.merged)) if on) or "inactive"
        return f"{self.name:<12} {self.method:<8} {self.num_targets:>4} modules  {flags}"


class AdapterTable(dict):
    """name -> :class:`AdapterInfo`, printable as a table."""

    def __str__(self) -> str:
        return "\n".join(str(info) for info in self.values()) or "(no adapters)"


def activate(model: nn.Module, name: str | Sequence[str]) -> None:
    """Makes the named adapter(s) the active ones: they run in forward and their parameters train.

    Several names run together (their effects add up). Inactive adapters stay attached, frozen.

    Raises:
        AdapterNotFoundError: an unknown name.
        AdapterStateError: a merged adapter would become inactive (unmerge it first).
    """
    state = get_state(model)
    names = [name] if isinstance(name, str) else list(name)
    for n in names:
        _record(state, n)
    merged = [n for n, r in state.adapters.items() if r.merged and n not in names]
    if merged:
        raise AdapterStateError(
            f"adapter {merged[0]!r} is merged into the base weights and would keep acting while inactive; "
            "call peftcore.unmerge(model) first"
        )
    with transaction(model):
        state.active = list(dict.fromkeys(names))
        _apply_active(model, state)


def delete(model: nn.Module, name: str) -> None:
    """Removes adapter ``name`` (unmerging it first). Removing the last adapter unwraps the model."""
    state = get_state(model)
    record = _record(state, name)
    if len(state.adapters) == 1:
        unwrap(model)
        return
    method = registry.get_method(record.method)
    unmerged = [name] if record.merged else []
    _fold(model, state, unmerged, merging=False)
    try:
        with transaction(model):
            method.detach(model, name)
            del state.adapters[name]
            state.active = [n for n in state.active if n != name]
            _apply_active(model, state)
    except BaseException:
        _fold(model, state, unmerged, merging=True)
        raise


def _fold(model: nn.Module, state: PeftState, names: Sequence[str], merging: bool) -> None:
    """Merges (``merging``) or unmerges the named adapters; all or nothing.

    Merging writes base weights in place, which :func:`transaction` cannot undo, so a failure
    is undone by the inverse operation on every adapter this call touched, the failing one
    included (a method's ``unmerge`` takes back whatever part of a failed ``merge`` it folded in;
    :class:`~peftcore.tuners.base.LayerMethod` tracks this per layer). The weights then hold
    what they held before, up to float rounding.
    """
    touched: list[str] = []
    try:
        for name in names:
            record = state.adapters[name]
            method = registry.get_method(record.method)
            touched.append(name)
            (method.merge if merging else method.unmerge)(model, name)
            record.merged = merging
    except BaseException as exc:
        for name in reversed(touched):
            record = state.adapters[name]
            method = registry.get_method(record.method)
            try:
                (method.unmerge if merging else method.merge)(model, name)
            except Exception as undo:
                raise AdapterStateError(
                    f"{'merging' if merging else 'unmerging'} adapter {touched[-1]!r} failed ({type(exc).__name__}: {exc}), "
                    f"and taking adapter {name!r} back failed too ({type(undo).__name__}: {undo}); the base weights may "
                    "hold part of an adapter: reload the base model"
                ) from exc
            record.merged = not merging
        raise


def merge(model: nn.Module, name: str | None = None) -> None:
    """Folds an adapter (default: every active one) into the base weights.

    A merged adapter costs nothing at inference; its parameters stay, so :func:`unmerge` can
    take it back out (up to float rounding). All or nothing: if merging one of several adapters
    fails, the ones already merged are taken back out and the error is raised.

    Raises:
        AdapterStateError: nothing active, or the method does not merge.
    """
    state = get_state(model)
    names = [name] if name is not None else list(state.active)
    if not names:
        raise AdapterStateError("no adapter is active; pass name=... or peftcore.activate(model, name) first")
    records = [_record(state, n) for n in names]
    for record in records:
        if not registry.get_method(record.method).merges:
            raise AdapterStateError(
                f"adapter {record.name!r} uses {record.method!r}, which cannot be merged into base weights"
            )
    _fold(model, state, [r.name for r in records if not r.merged], merging=True)
    for record in records:
        if record.name not in state.active:
            state.active.append(record.name)
    _apply_active(model, state)


def unmerge(model: nn.Module) -> None:
    """Takes every merged adapter back out of the base weights (adapters stay attached and active).

    All or nothing: if one adapter fails to unmerge, those already unmerged are merged again.
    """
    state = get_state(model)
    _fold(model, state, [n for n, r in state.adapters.items() if r.merged], merging=False)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Runs the base model inside the block: every adapter is switched off, then back on.

    Raises:
        AdapterStateError: an adapter is merged (its delta is in the weights; unmerge first).
    """
    state = get_state(model)
    merged = [n for n, r in state.adapters.items() if r.merged]
    if merged:
        raise AdapterStateError(f"adapter {merged[0]!r} is merged into the base weights; call peftcore.unmerge(model) first")
    methods = [registry.get_method(m) for m in dict.fromkeys(r.method for r in state.adapters.values())]
    for method in methods:
        method.set_enabled(model, False)
    try:
        yield model
    finally:
        for method in methods:
            method.set_enabled(model, True)


def unwrap(model: nn.Module, merge: bool = False) -> nn.Module:
    """Removes every adapter and puts the original modules back; returns the same model object.

    Args:
        model: a wrapped model.
        merge: fold the active adapters into the base weights first (a plain model that
            computes what the adapted one did); otherwise merged adapters are unmerged, and the
            model computes exactly what it did before ``wrap``.

    Raises:
        AdapterStateError: ``merge=True`` with an active adapter whose method cannot merge.
    """
    state = get_state(model)
    if merge:
        for name in state.active:
            record = state.adapters[name]
            if not registry.get_method(record.method).merges:
                raise AdapterStateError(f"adapter {name!r} uses {record.method!r}, which cannot be merged; unwrap without merge=True")
    if merge:
        folded, merging = [n for n in state.active if not state.adapters[n].merged], True
    else:
        folded, merging = [n for n, r in state.adapters.items() if r.merged], False
    _fold(model, state, folded, merging)
    try:
        with transaction(model):
            for name, record in list(state.adapters.items()):
                registry.get_method(record.method).detach(model, name)
            for param_name, param in model.named_parameters():
                param.requires_grad_(state.base_requires_grad.get(param_name, param.requires_grad))
            del model.__dict__[STATE_ATTR]
            hf_integration.uninstall(model)
            routing.uninstall(model)
    except BaseException:
        _fold(model, state, folded, not merging)
        raise
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that train: adapter parameters and ``trainable=`` modules of active adapters."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def adapter_parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per adapter: ``(adapter parameters, trainable= module parameters)``."""
    state = get_state(model)
    adapter_params = _all_adapter_params(model, state)
    adapter_ids = {id(p) for ps in adapter_params.values() for p in ps}
    counts = {}
    for name, record in state.adapters.items():
        own = sum(p.numel() for p in adapter_params[name])
        extra = {id(p): p for path in record.trainable for p in targeting.get_module(model, path).parameters() if id(p) not in adapter_ids}
        counts[name] = (own, sum(p.numel() for p in extra.values()))
    return counts


def _no_grad_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
