"""LoRA factors initialised from the quantization error, so that base + adapter starts near the original.

Quantizing a weight ``W`` to ``Q`` moves every layer's output by ``x (W - deq(Q))^T``. A LoRA adapter
adds ``s x A^T B^T``; choosing ``s B A`` as the best rank-``r`` approximation of the error
``E = W - deq(Q)`` starts training from a model closer to the full-precision one than the quantized
base is (LoftQ, Li et al. 2023, one alternation). Which approximation is best depends on the norm:

* without calibration data, the Frobenius norm of ``E - s B A`` (the truncated SVD of ``E``);
* with calibration data, the error of the layer's *outputs* on those inputs,
  ``||X (E - s B A)^T||``: with ``H = X^T X + damping`` and its Cholesky factor ``H = R^T R``, the
  truncated SVD of ``E R^T`` mapped back by ``R^{-T}`` (as CLoQ, Deng et al. 2025, does). The
  inputs of a transformer layer are far from isotropic (a few channels carry most of the energy),
  so rank 8 removes about half of the output error of all-MiniLM-L6-v2's nf4 layers here against
  under a tenth of the weight error.

The adapter file then holds factors that only make sense with the same quantized base, which a
fresh quantization of the same weights reproduces exactly (``quantize_model`` and bitsandbytes'
quantization are deterministic): saving and loading need no base weights, as for any adapter.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftcore.errors import AdapterStateError, ConfigError

from peftcore_quant.layers import QuantLoraLinear


@dataclasses.dataclass(frozen=True)
class LayerError:
    """One layer's relative error against its full-precision weight, before and after the init.

    ``before = ||E R^T|| / ||W R^T||`` and ``after = ||(E - s B A) R^T|| / ||W R^T||``, with
    ``R = I`` without calibration (weight error) and ``H = R^T R`` with it (output error on the
    calibration inputs).
    """

    before: float
    after: float


def init_from_quantization_error(
    model: nn.Module,
    original: Mapping[str, torch.Tensor] | str | os.PathLike,
    calibration: Iterable[Any] | None = None,
    *,
    adapter: str = "default",
    damping: float = 0.01,
) -> dict[str, LayerError]:
    """Sets ``adapter``'s LoRA factors on every quantized layer so that base + adapter approximates
    the full-precision weights (replacing the factors it had).

    Args:
        model: a model wrapped with LoRA (``peftcore.wrap(model, "lora", ...)``) whose targets
            include quantized layers (this plugin's layers: bitsandbytes 4-/8-bit, torchao).
        original: the full-precision weights: a mapping from module path (or state-dict key
            ``"<path>.weight"``) to the ``(out, in)`` weight, e.g. the model's ``state_dict()``
            taken before ``quantize_model``; or a ``.safetensors`` file, or a directory holding
            ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (the model's
            own checkpoint, as loaded with a quantization config). Keys may lack the model's
            ``base_model_prefix`` (``bert.``, ``model.``), as in a base model's checkpoint.
        calibration: optional inputs to weight the error by: an iterable of model inputs (a dict
            of keyword arguments, a tuple of positional ones, or one tensor each). The model runs
            on them once, in eval mode without gradients; every quantized layer's input Gram
            matrix ``X^T X`` is kept (float32, ``in_features^2`` each; layers fed the same tensor
            share one).
        adapter: the LoRA adapter to initialise.
        damping: added to ``H``'s diagonal, as a fraction of its mean (keeps ``H`` invertible
            where the calibration inputs span fewer directions than ``in_features``).

    Returns:
        Per layer path, its :class:`LayerError` before and after (layers that are not quantized
        keep their factors and are not listed).

    Raises:
        ConfigError: no quantized layer holds ``adapter``, a weight is missing from ``original``
            or has the wrong shape, or ``damping`` is negative. Nothing is changed then.
        AdapterStateError: ``adapter`` is merged into a layer.
    """
    if damping < 0:
        raise ConfigError(f"damping must be >= 0, got {damping}")
    layers = {path: layer for path, layer in model.named_modules() if isinstance(layer, QuantLoraLinear) and adapter in layer.lora_A}
    if not layers:
        raise ConfigError(f"no quantized LoRA layer holds adapter {adapter!r}: wrap the quantized model with "
                          f"peftcore.wrap(model, 'lora', name={adapter!r}) first")
    for path, layer in layers.items():
        if adapter in layer.merged_adapters:
            raise AdapterStateError(f"adapter {adapter!r} is merged into {path!r}; unmerge it before initialising its factors")
    weights = _original_weights(model, original, layers)
    grams = _gram_matrices(model, layers, calibration) if calibration is not None else {}
    factors, report = {}, {}
    for path, layer in layers.items():
        factors[path], report[path] = _factors(layer, weights[path], grams.get(path), adapter, damping)
    with torch.no_grad():  # every layer computed before any is changed
        for path, (A, B) in factors.items():
            layer = layers[path]
            layer.lora_A[adapter].copy_(A)
            layer.lora_B[adapter].copy_(B)
    return report


def _factors(layer: QuantLoraLinear, weight: torch.Tensor, gram: torch.Tensor | None, adapter: str,
             damping: float) -> tuple[tuple[torch.Tensor, torch.Tensor], LayerError]:
    """``(A, B)`` with ``s B A`` the best rank-``r`` approximation of the layer's quantization error."""
    rank, scale = layer.lora_A[adapter].shape[0], layer.lora_config[adapter].scale
    W = weight.double()
    E = W - layer.dequantized().to(W.device, torch.float64)
    if gram is None:
        R = None
        M = E
    else:
        H = gram.double()
        H = H + damping * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.shape[0], dtype=H.dtype)
        R = torch.linalg.cholesky(H).mT  # H = R^T R, R upper triangular
        M = E @ R.mT
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = torch.sqrt(S[:rank] / scale)
    right = Vh[:rank] if R is None else torch.linalg.solve_triangular(R, Vh[:rank].mT, upper=True).mT  # Vh_r R^{-T}
    A = root[:, None] * right
    B = U[:, :rank] * root
    reference = W if R is None else W @ R.mT
    norm = reference.norm().clamp_min(1e-30)
    # ||M - M_r|| of the truncated SVD is the norm of the singular values it drops (Eckart-Young)
    error = LayerError(before=float(M.norm() / norm), after=float(S[rank:].norm() / norm))
    dtype = layer.lora_A[adapter].dtype
    return (A.to(dtype), B.to(dtype)), error


def _original_weights(model: nn.Module, original: Any, layers: Mapping[str, QuantLoraLinear]) -> dict[str, torch.Tensor]:
    prefix = getattr(model, "base_model_prefix", "") or ""
    if isinstance(original, (str, os.PathLike)):
        lookup = _safetensors_lookup(Path(original))
    elif isinstance(original, Mapping):
        lookup = original.get
    else:
        raise ConfigError(f"original must be a mapping of weights or a safetensors file/directory, got {type(original).__name__}")
    weights = {}
    for path, layer in layers.items():
        candidates = [f"{path}.weight", path]
        if prefix and path.startswith(prefix + "."):
            short = path[len(prefix) + 1:]
            candidates += [f"{short}.weight", short]
        found = next((w for w in (lookup(k) for k in candidates) if w is not None), None)
        if found is None:
            raise ConfigError(f"the original weights have no {candidates[0]!r} (nor {', '.join(repr(c) for c in candidates[1:])}); "
                              "pass the full-precision state dict taken before quantizing, or the model's checkpoint")
        expected = (layer.base_layer.out_features, layer.base_layer.in_features)
        if tuple(found.shape) != expected:
            raise ConfigError(f"the original weight of {path!r} has shape {tuple(found.shape)}, the layer {expected}")
        weights[path] = found
    return weights


def _safetensors_lookup(path: Path):
    from safetensors import safe_open

    if path.is_dir():
        single, index = path / "model.safetensors", path / "model.safetensors.index.json"
        if single.is_file():
            files = {None: single}
        elif index.is_file():
            import json

            shards = json.loads(index.read_text())["weight_map"]
            files = {key: path / shard for key, shard in shards.items()}
        else:
            raise ConfigError(f"{str(path)!r} holds neither model.safetensors nor model.safetensors.index.json")
    elif path.is_file():
        files = {None: path}
    else:
        raise ConfigError(f"no such file or directory: {str(path)!r}")
    handles: dict[Path, Any] = {}

    def lookup(key: str) -> torch.Tensor | None:
        file = files.get(key, files.get(None))  # a sharded checkpoint's index, or its one file
        if file is None:
            return None
        handle = handles.get(file)
        if handle is None:
            handle = handles[file] = safe_open(str(file), framework="pt")
        return handle.get_tensor(key) if key in handle.keys() else None

    return lookup


def _gram_matrices(model: nn.Module, layers: Mapping[str, QuantLoraLinear], calibration: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Each layer's ``X^T X`` over the calibration inputs (layers fed the same tensor share one)."""
    grams: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}  # layer -> the layer whose Gram matrix it shares (decided on the first batch)
    seen: dict[int, tuple[torch.Tensor, str]] = {}  # this forward's inputs (kept alive, so ids stay unique)
    first = True

    def hook(path: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            owner = seen.setdefault(id(x), (x, path))[1]
            if first and owner != path:
                shared[path] = owner
            if path in shared:
                if owner != shared[path]:
                    raise ConfigError(f"calibration: {path!r} was fed {shared[path]!r}'s input in the first batch but not "
                                      "in a later one (inputs routed per batch?); calibrate on one batch")
                return  # the same tensor as another layer's input: one Gram matrix for both
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if path in grams:
                grams[path].addmm_(x2.mT, x2)
            else:
                grams[path] = x2.mT @ x2

        return pre_hook

    handles = [layer.register_forward_pre_hook(hook(path)) for path, layer in layers.items()]
    was_training = model.training
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in calibration:
                seen.clear()
                if isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    model(batch)
                batches += 1
                first = False
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ConfigError("calibration is empty: pass at least one batch of model inputs, or calibration=None")
    for path, owner in shared.items():
        grams[path] = grams[owner]
    return grams
