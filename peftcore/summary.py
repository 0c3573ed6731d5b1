"""``peftcore.summary``: how many parameters train, in total and per adapter."""

from __future__ import annotations

import dataclasses

from torch import nn

from peftcore import lifecycle


@dataclasses.dataclass(frozen=True)
class AdapterRow:
    """One adapter's line in the summary.

    Attributes:
        name: adapter name.
        method: its method.
        active: whether it runs in forward.
        merged: whether it is folded into the base weights.
        targets: number of modules it attached to.
        adapter_params: parameters the adapter adds.
        trainable_module_params: parameters of its ``trainable=`` modules.
    """

    name: str
    method: str
    active: bool
    merged: bool
    targets: int
    adapter_params: int
    trainable_module_params: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a (wrapped) model; ``print`` it for a table.

    Attributes:
        model: the model's class name.
        total: all parameters, adapters included.
        trainable: parameters with ``requires_grad``.
        adapters: one row per adapter.
    """

    model: str
    total: int
    trainable: int
    adapters: tuple[AdapterRow, ...]

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_fraction

    def __str__(self) -> str:
        header = f"{'adapter':<12} {'method':<8} {'state':<14} {'modules':>7} {'adapter params':>15} {'+ trainable':>12} {'% of total':>10}"
        lines = [f"{self.model}", header, "-" * len(header)]
        for row in self.adapters:
            state = "merged" if row.merged else ("active" if row.active else "inactive")
            pct = 100.0 * (row.adapter_params + row.trainable_module_params) / self.total if self.total else 0.0
            lines.append(
                f"{row.name:<12} {row.method:<8} {state:<14} {row.targets:>7} {row.adapter_params:>15,} "
                f"{row.trainable_module_params:>12,} {pct:>9.3f}%"
            )
        if not self.adapters:
            lines.append("(no adapters)")
        lines.append("-" * len(header))
        lines.append(f"trainable: {self.trainable:,} of {self.total:,} parameters ({self.trainable_percent:.3f}%)")
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Trainable and total parameters, and per adapter what it adds.

    Args:
        model: any module; a plain one reports no adapters.

    Returns:
        A :class:`Summary`; ``print(peftcore.summary(model))`` shows a table.
    """
    trainable, total = lifecycle.parameter_counts(model)
    state = lifecycle.get_state(model, required=False)
    rows = []
    if state is not None:
        counts = lifecycle.adapter_parameter_counts(model)
        for name, record in state.adapters.items():
            own, extra = counts[name]
            rows.append(AdapterRow(name, record.method, name in state.active, record.merged, len(record.targets), own, extra))
    return Summary(type(model).__name__, total, trainable, tuple(rows))
