"""Where bottleneck adapters go: transformer blocks found from module structure, and module widths.

A block is any module that has three submodules at known relative paths (one layout per model
family); nothing here reads a ``forward`` or a config class, so renamed classes and new model
classes with the same layout are found too:

==========  ==========================  ===============  ================
family      attention output            FFN output       FFN input from
==========  ==========================  ===============  ================
bert        ``attention.output.dense``  ``output.dense``  ``intermediate``
gpt2        ``attn.c_proj``             ``mlp.c_proj``    ``mlp``
llama       ``self_attn.o_proj``        ``mlp.down_proj`` ``mlp``
==========  ==========================  ===============  ================

(MiniLM and RoBERTa have the ``bert`` layout; Mistral and Qwen2 the ``llama`` one.) The attention and FFN outputs are the projections whose outputs enter the
residual stream; the FFN input is the module whose (first) input is the feed-forward block's input,
which a parallel adapter reads.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from peftcore import targeting
from peftcore.tuners.modules import is_hf_conv1d


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """The relative paths of one family's insertion points inside a block."""

    family: str
    attn_out: str
    ffn_out: str
    ffn_in: str


LAYOUTS = (
    BlockLayout("bert", attn_out="attention.output.dense", ffn_out="output.dense", ffn_in="intermediate"),
    BlockLayout("gpt2", attn_out="attn.c_proj", ffn_out="mlp.c_proj", ffn_in="mlp"),
    BlockLayout("llama", attn_out="self_attn.o_proj", ffn_out="mlp.down_proj", ffn_in="mlp"),
)


@dataclasses.dataclass(frozen=True)
class Block:
    """A transformer block found in a model: its path and layout."""

    path: str
    layout: BlockLayout

    def at(self, relative: str) -> str:
        return f"{self.path}.{relative}" if self.path else relative


def _has(module: nn.Module, relative: str) -> bool:
    try:
        module.get_submodule(relative)
    except AttributeError:
        return False
    return True


def find_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of ``model`` whose layout is in :data:`LAYOUTS`, in model order."""
    blocks = []
    for path, module in targeting.iter_modules(model):
        if not module._modules:
            continue
        for layout in LAYOUTS:
            if all(_has(module, rel) for rel in (layout.attn_out, layout.ffn_out, layout.ffn_in)):
                blocks.append(Block(path, layout))
                break
    return blocks


def insertion_points(model: nn.Module, placement: str) -> list[str]:
    """Paths of the modules whose output receives an adapter, for ``placement``, in model order.

    Houlsby: each block's attention output and FFN output; Pfeiffer and parallel: the FFN output.
    Empty when no block has a known layout.
    """
    points = []
    for block in find_blocks(model):
        if placement == "houlsby":
            points.append(block.at(block.layout.attn_out))
        points.append(block.at(block.layout.ffn_out))
    return points


def parallel_input(target: str, blocks: list[Block]) -> str:
    """The module whose input a parallel adapter at ``target`` reads.

    For a block's FFN output projection that is the block's FFN input module (``intermediate`` in
    BERT, ``mlp`` in GPT-2 and Llama); for any other target, the target itself.
    """
    for block in blocks:
        if target == block.at(block.layout.ffn_out):
            return block.at(block.layout.ffn_in)
    return target


# -- widths -----------------------------------------------------------------------------------------
def _linear_widths(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear-like leaf (``nn.Linear``, transformers ``Conv1D``), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_hf_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)  # weight stored (in, out)
    return None


def _unwrapped(module: nn.Module) -> nn.Module:
    from peftcore.tuners.base import AdapterLayer

    return module.base_layer if isinstance(module, AdapterLayer) else module


def _linear_leaves(module: nn.Module) -> list[tuple[int, int]]:
    leaves = []
    for _, sub in targeting.iter_modules(module):
        widths = _linear_widths(_unwrapped(sub))
        if widths is not None:
            leaves.append(widths)
    return leaves


def output_width(module: nn.Module) -> int | None:
    """Width of ``module``'s output: its own for a linear-like layer, else its last linear-like layer's."""
    module = _unwrapped(module)
    widths = _linear_widths(module)
    if widths is not None:
        return widths[1]
    leaves = _linear_leaves(module)
    return leaves[-1][1] if leaves else None


def input_width(module: nn.Module) -> int | None:
    """Width of ``module``'s input: its own for a linear-like layer, else its first linear-like layer's."""
    module = _unwrapped(module)
    widths = _linear_widths(module)
    if widths is not None:
        return widths[0]
    leaves = _linear_leaves(module)
    return leaves[0][0] if leaves else None
