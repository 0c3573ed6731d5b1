"""Fine-tuning strategies: which parameters train, and at which learning rate.

A strategy turns a model into a :class:`Plan`: it freezes and unfreezes parameters in place
(the freeze plan) and returns optimizer parameter groups, which any ``torch.optim`` optimizer
(and ``transformers.Trainer`` through ``optimizers=(optimizer, scheduler)``) accepts.

* ``full``: every parameter trains at one rate.
* ``feature-extraction``: only the task head trains; the encoder is a fixed feature extractor.
* ``partial``: the embeddings and the bottom ``freeze_blocks`` blocks are frozen (and any
  parameter matching ``freeze``); the rest trains.
* ``progressive``: the head trains first; one more block group, from the top down, is unfrozen
  at every epoch (or every ``unfreeze_every`` optimizer steps); the embeddings come last. Every
  stage's parameters are in the optimizer from the start (frozen ones get no gradient, so the
  optimizer skips them).
* ``discriminative``: every parameter trains; the top block gets ``lr``, each block below gets
  the rate of the one above times ``lr_decay`` (0.8), the embeddings the lowest rate.

In the layer strategies the task head has a group of its own, at ``head_lr`` (by default ``lr``;
10 x ``lr`` for ``progressive``, whose head first trains alone).
* any installed peftcore method (``lora``, ``adapter``, ``prefix``, ``prompt``, plugins):
  ``peftcore.wrap(model, method, trainable=<head>, **method_options)``.

Weight decay applies to matrices only: biases and norm weights (every parameter with fewer
than two dimensions) go to a ``*.no_decay`` group with ``weight_decay=0``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

from torch import nn

import peftcore
from peftcore.errors import ConfigError, TargetError
from peftcore.train.structure import ModelStructure, Names, find_head, model_structure

#: The strategies that freeze and set rates on the model's own parameters.
LAYER_STRATEGIES = ("full", "feature-extraction", "partial", "progressive", "discriminative")

#: Default peak learning rates (AdamW) per strategy: usual values for each, checked (not swept)
#: on the bundled dataset with all-MiniLM-L6-v2, where each reaches 95 to 99 % validation
#: accuracy in 6 epochs (feature-extraction 86 %; docs/strategies.md). The fewer and the newer
#: the trained parameters, the higher the rate: a fresh head or adapter starts from nothing,
#: while full fine-tuning moves pretrained weights that forget what they knew if pushed hard.
DEFAULT_LR = {
    "full": 1e-4,
    "partial": 2e-4,
    "progressive": 2e-4,
    "discriminative": 2e-4,
    "feature-extraction": 1e-2,
    "lora": 2e-3,
    "adapter": 2e-3,
    "prefix": 1e-2,
    "prompt": 3e-2,
    "ia3": 5e-3,  # the plugins of plugins/
    "dora": 2e-3,
}
#: Rate of a plugin method without an entry above.
FALLBACK_LR = 1e-3

#: The task head's rate as a multiple of the base rate, where it is not 1 (``head_lr`` overrides):
#: a progressive run trains the freshly initialised head alone first, and at a rate meant for
#: pretrained blocks it barely moves (measured: 0.51 validation accuracy after 2 epochs on 100
#: texts of the bundled data, against 0.70 to 0.79 for the other layer strategies).
HEAD_LR_SCALE = {"progressive": 10.0}


def default_lr(strategy: str) -> float:
    """The default learning rate of a strategy or method."""
    return DEFAULT_LR.get(strategy, FALLBACK_LR)


def strategies() -> list[str]:
    """Every strategy name usable now: installed peftcore methods, then the layer strategies."""
    return list(peftcore.methods()) + list(LAYER_STRATEGIES)


@dataclasses.dataclass
class StrategyConfig:
    """A strategy and its options.

    Attributes:
        name: a layer strategy (:data:`LAYER_STRATEGIES`) or an installed peftcore method.
        lr: base learning rate (the top block's); ``None`` = :func:`default_lr`.
        head_lr: the task head's rate in the layer strategies; ``None`` = ``lr`` times
            :data:`HEAD_LR_SCALE` (10 for ``progressive``, else 1). PEFT methods train the
            head at ``lr``.
        weight_decay: decoupled weight decay of matrices (biases and norms get none).
        blocks: override block discovery (see :func:`peftcore.train.structure.find_blocks`).
        head: override head discovery: module names or a regex; ``[]`` trains no head.
        freeze_blocks: ``partial``: bottom blocks to freeze, with the embeddings below them;
            ``None`` = half the blocks, unless ``freeze`` is given.
        freeze: ``partial``: also freeze the parameters whose names match: a regex (full match)
            or a list of names, each matching parameter names that contain it as whole dotted
            components (``"bert.embeddings"``, ``"attention"``).
        lr_decay: rate factor per block going down; ``None`` = 0.8 for ``discriminative`` and
            1 (one rate) for ``progressive``, which combines with it as in ULMFiT when given.
        unfreeze_every: ``progressive``: optimizer steps between stages; 0 = one stage per epoch.
        blocks_per_stage: ``progressive``: blocks unfrozen per stage.
        method_options: options for ``peftcore.wrap`` (PEFT methods only).
    """

    name: str = "lora"
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.01
    blocks: Names = None
    head: Names = None
    freeze_blocks: int | None = None
    freeze: Names = None
    lr_decay: float | None = None
    unfreeze_every: int = 0
    blocks_per_stage: int = 1
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.name)

    @property
    def is_peft(self) -> bool:
        return self.name not in LAYER_STRATEGIES


@dataclasses.dataclass
class Plan:
    """What a strategy decided for a model.

    Attributes:
        strategy: the strategy name.
        groups: optimizer parameter groups: dicts with ``name``, ``params``, ``lr`` and
            ``weight_decay``, each parameter in exactly one group.
        names: parameter name by ``id(parameter)``, for every parameter in ``groups``.
        stages: names of the parameters unfrozen at each stage (one stage unless progressive;
            stage 0 is what trains first).
        structure: the model structure (``None`` for PEFT methods).
        method: the peftcore method the model was wrapped with, if any.
    """

    strategy: str
    groups: list[dict[str, Any]]
    names: dict[int, str]
    stages: list[tuple[str, ...]]
    structure: ModelStructure | None = None
    method: str | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        """Fresh copies of the groups, ready for ``torch.optim.AdamW(plan.param_groups())``."""
        return [dict(group, params=list(group["params"])) for group in self.groups]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter the plan may train (all stages), with its name."""
        return [(self.names[id(p)], p) for group in self.groups for p in group["params"]]

    def learning_rates(self) -> dict[str, float]:
        """Learning rate by parameter name (as given to the optimizer, before any schedule)."""
        return {self.names[id(p)]: group["lr"] for group in self.groups for p in group["params"]}


def _decay_groups(name: str, params: Sequence[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> list[dict]:
    """One group of matrices with weight decay and one of vectors (biases, norms) without."""
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"name": f"{name}.no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def _matches(name: str, selection: Names) -> bool:
    if selection is None:
        return False
    if isinstance(selection, str):
        return re.fullmatch(selection, name) is not None
    # whole dotted components: "bert.embeddings" and "attention" match, "attent" does not
    return any(f".{s}." in f".{name}." for s in selection)


def _check(config: StrategyConfig) -> None:
    if not config.base_lr > 0 or (config.head_lr is not None and not config.head_lr > 0):
        raise ConfigError(f"learning rates must be positive, got lr={config.base_lr!r}, head_lr={config.head_lr!r}")
    if config.weight_decay < 0:
        raise ConfigError(f"weight decay must be >= 0, got {config.weight_decay!r}")
    if config.lr_decay is not None and not 0 < config.lr_decay <= 1:
        raise ConfigError(f"lr_decay must be in (0, 1], got {config.lr_decay!r}")
    if config.unfreeze_every < 0 or config.blocks_per_stage < 1:
        raise ConfigError(f"unfreeze_every must be >= 0 and blocks_per_stage >= 1, got "
                          f"{config.unfreeze_every!r} and {config.blocks_per_stage!r}")
    if isinstance(config.freeze, str):
        try:
            re.compile(config.freeze)
        except re.error as exc:
            raise ConfigError(f"freeze={config.freeze!r} is not a valid regular expression: {exc}") from exc


def apply_strategy(model: nn.Module, config: StrategyConfig | str, **overrides: Any) -> Plan:
    """Applies a strategy to ``model`` in place (freezing, or wrapping for PEFT methods).

    Args:
        model: a transformers-style model (see :mod:`peftcore.train.structure`).
        config: a :class:`StrategyConfig`, or a strategy name.
        **overrides: fields of :class:`StrategyConfig`, e.g. ``lr=1e-4, freeze_blocks=2``.

    Returns:
        The :class:`Plan`; hand ``plan.param_groups()`` to an optimizer.

    Raises:
        ConfigError: bad option values, or an unknown strategy (the message lists the known ones).
        TargetError: the model's blocks or head cannot be found (pass ``blocks=``/``head=``).
        PeftcoreError: from ``peftcore.wrap`` for PEFT methods.
    """
    if isinstance(config, str):
        config = StrategyConfig(name=config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    _check(config)
    if config.is_peft:
        if config.name not in peftcore.methods():
            raise ConfigError(f"unknown strategy {config.name!r}; available: {', '.join(strategies())}")
        return _peft_plan(model, config)
    structure = model_structure(model, blocks=config.blocks, head=config.head)
    params = dict(model.named_parameters())
    build = {"full": _full, "feature-extraction": _feature_extraction, "partial": _partial,
             "progressive": _progressive, "discriminative": _discriminative}[config.name]
    groups, stages = build(structure, config, params)
    trainable_now = set(stages[0])
    if not trainable_now:
        raise TargetError(f"strategy {config.name!r} would train no parameter of {type(model).__name__} "
                          f"(head: {', '.join(structure.head_paths) or 'none'}); pass head= or choose another strategy")
    for name, param in params.items():
        param.requires_grad_(name in trainable_now)
    in_groups = {id(p) for g in groups for p in g["params"]}
    names = {id(p): n for n, p in params.items() if id(p) in in_groups}
    return Plan(config.name, groups, names, [tuple(s) for s in stages], structure)


# -- the layer strategies: each returns (groups, stages) ------------------------------------------
def _named(params: dict[str, nn.Parameter], names: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    return [(n, params[n]) for n in names]


def _head_lr(config: StrategyConfig) -> float:
    if config.head_lr is not None:
        return config.head_lr
    return config.base_lr * HEAD_LR_SCALE.get(config.name, 1.0)


def _with_head(structure: ModelStructure, config: StrategyConfig, params: dict, body: Iterable[tuple[str, Sequence[str], float]]) -> list:
    """Groups for (name, parameter names, lr) body parts, then the head at its own rate."""
    groups = []
    for name, names, lr in body:
        groups += _decay_groups(name, _named(params, [n for n in names if n not in structure.head]), lr, config.weight_decay)
    return groups + _decay_groups("head", _named(params, structure.head), _head_lr(config), config.weight_decay)


def _full(structure: ModelStructure, config: StrategyConfig, params: dict) -> tuple[list, list]:
    return _with_head(structure, config, params, [("body", list(params), config.base_lr)]), [tuple(params)]


def _feature_extraction(structure: ModelStructure, config: StrategyConfig, params: dict) -> tuple[list, list]:
    return _with_head(structure, config, params, []), [structure.head]


def _partial(structure: ModelStructure, config: StrategyConfig, params: dict) -> tuple[list, list]:
    count = config.freeze_blocks
    if count is None:
        count = 0 if config.freeze is not None else structure.num_blocks // 2
    if not 0 <= count <= structure.num_blocks:
        raise ConfigError(f"freeze_blocks={count} but the model has {structure.num_blocks} blocks "
                          f"({structure.block_paths[0]} .. {structure.block_paths[-1]})")
    frozen = set(structure.embeddings) if count > 0 else set()
    for names in structure.blocks[:count]:
        frozen.update(names)
    frozen.update(n for n in params if _matches(n, config.freeze))
    names = [n for n in params if n not in frozen]
    head = set(structure.head)
    structure = dataclasses.replace(structure, head=tuple(n for n in structure.head if n in names))
    return _with_head(structure, config, params, [("body", [n for n in names if n not in head], config.base_lr)]), [tuple(names)]


def _layer_rates(structure: ModelStructure, config: StrategyConfig, decay: float) -> list[tuple[str, tuple[str, ...], float]]:
    """(group name, parameter names, lr) of the body from the bottom up; the top block gets the base rate."""
    top_block = structure.num_blocks - 1
    out = []
    for name, names in structure.layers():
        if name == "head":
            continue
        depth = top_block + 1 if name == "embeddings" else top_block - int(name.split(".")[1])
        out.append((name, names, config.base_lr * decay ** depth))
    return out


def _discriminative(structure: ModelStructure, config: StrategyConfig, params: dict) -> tuple[list, list]:
    decay = config.lr_decay if config.lr_decay is not None else 0.8
    return _with_head(structure, config, params, _layer_rates(structure, config, decay)), [tuple(params)]


def _progressive(structure: ModelStructure, config: StrategyConfig, params: dict) -> tuple[list, list]:
    rates = _layer_rates(structure, config, config.lr_decay if config.lr_decay is not None else 1.0)
    by_name = {name: names for name, names, _ in rates}
    blocks_top_down = [n for n, _, _ in reversed(rates) if n.startswith("block.")]
    stages = [structure.head]
    for start in range(0, len(blocks_top_down), config.blocks_per_stage):
        stages.append(tuple(n for b in blocks_top_down[start:start + config.blocks_per_stage] for n in by_name[b]))
    if by_name.get("embeddings"):
        stages.append(by_name["embeddings"])
    return _with_head(structure, config, params, rates), stages


# -- PEFT methods ---------------------------------------------------------------------------------
def _peft_plan(model: nn.Module, config: StrategyConfig) -> Plan:
    head = find_head(model, config.head) if config.head is not None or _has_head(model) else []
    # a head tied to the input embeddings (GPT-2's lm_head) owns no parameter: training it
    # would train the whole embedding matrix, so it stays frozen
    owned = [name for name, _ in model.named_parameters()]
    head = [h for h in head if any(n.startswith(h + ".") for n in owned)]
    peftcore.wrap(model, config.name, trainable=head or None, **config.method_options)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = _decay_groups(config.name, named, config.base_lr, config.weight_decay)
    return Plan(config.name, groups, {id(p): n for n, p in named}, [tuple(n for n, _ in named)], None, config.name)


def _has_head(model: nn.Module) -> bool:
    try:
        find_head(model)
    except TargetError:
        return False
    return True
