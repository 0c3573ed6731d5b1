"""Bottleneck adapter options."""

from __future__ import annotations

import dataclasses
import math

from peftcore.errors import ConfigError
from peftcore.ops.bottleneck import ACTIVATIONS

#: Where adapters go in each block (see docs/methods/adapter.md):
#: houlsby: after the attention output and after the feed-forward output;
#: pfeiffer: after the feed-forward output only;
#: parallel: beside the feed-forward block (reads its input, adds to its output).
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


@dataclasses.dataclass
class AdapterConfig:
    """Options of a bottleneck adapter ``h + scale * up(act(down(x)))``.

    Attributes:
        size: bottleneck width r: ``down`` maps the hidden size to r, ``up`` maps r back (> 0).
        placement: "houlsby", "pfeiffer" or "parallel" (see :data:`PLACEMENTS`).
        activation: between the projections: "gelu" (exact), "gelu_tanh", "relu" or "silu".
        scale: multiplier of the adapter's output (finite).
        backend: kernel backend of the bottleneck op: "auto", "reference", "cpp", "triton".
    """

    size: int = 64
    placement: str = "houlsby"
    activation: str = "gelu"
    scale: float = 1.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"adapter size must be a positive int (the bottleneck width), got {self.size!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"adapter activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ConfigError(f"adapter scale must be a finite number, got {self.scale!r}")
        self.scale = float(self.scale)
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"adapter backend must be a backend name or 'auto', got {self.backend!r}")

    @property
    def parallel(self) -> bool:
        """Whether the adapter reads the block's input instead of the target's output."""
        return self.placement == "parallel"
