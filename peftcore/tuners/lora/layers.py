"""LoRA adapter layers and the handlers that attach them.

One layer class per kind of original module; each keeps the original as ``base_layer`` and
holds named adapters as ``lora_A[name]`` / ``lora_B[name]``. Shapes follow HF PEFT, so that a
saved adapter converts by renaming keys:

=================  ======================  =======================
original           ``lora_A``              ``lora_B``
=================  ======================  =======================
Linear (out, in)   (r, in)                 (out, r)
HF Conv1D (in, out)  (r, in)               (out, r)
Embedding (n, d)   (r, n)                  (d, r)
ConvNd (out, in, *k)  (r, in, *k)          (out, r, 1, ...)
=================  ======================  =======================
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftcore.errors import AdapterStateError, ConfigError, PeftcoreError
from peftcore.tuners.base import AdapterLayer
from peftcore.tuners.lora import routed
from peftcore.tuners.lora.config import LoraConfig
from peftcore.tuners.modules import Handler, is_conv, is_hf_conv1d, is_linear, plain_subclass
from peftcore.ops import dispatch, philox
from peftcore.ops.lora import OP, lora_linear, new_seed_tensor
from peftcore.ops.lora_add import lora_add_


class _TensorStore(nn.Module):
    """Named tensors as buffers (``persistent`` chooses whether they are in the state dict)."""

    def __init__(self, persistent: bool):
        super().__init__()
        self.persistent = persistent

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor, persistent=self.persistent)

    def get(self, name: str) -> torch.Tensor | None:
        return self._buffers.get(name)

    def drop(self, name: str) -> None:
        self._buffers.pop(name, None)
        self._non_persistent_buffers_set.discard(name)


class LoraLayer(AdapterLayer):
    """Common part of the LoRA layers: adapter bookkeeping, init, merge.

    Subclasses define the factor shapes, how the delta folds into the base weight, and forward.
    """

    method = "lora"
    supports_routing = True  # per-example adapters: peftcore/tuners/lora/routed.py

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_config: dict[str, LoraConfig] = {}

    # PiSSA only, created on first use: the initial factors ``lora_init_A/B`` (saved, so a fresh
    # base can be turned into the same residual) and the untouched base weight
    # ``lora_pissa_base`` (not saved; restores the base exactly on removal).
    _STORES = {"lora_init_A": True, "lora_init_B": True, "lora_pissa_base": False}

    def _store(self, key: str, create: bool = False) -> _TensorStore | None:
        store = self._modules.get(key)
        if store is None and create:
            store = _TensorStore(persistent=self._STORES[key])
            self.add_module(key, store)
        return store

    def _stored(self, key: str, name: str) -> torch.Tensor | None:
        store = self._store(key)
        return None if store is None else store.get(name)

    # -- shapes and weights, per kind ------------------------------------------------------------
    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base weight in ``(out, in, ...)`` layout (a view for transposed storage)."""
        return self.base_layer.weight

    def factor_dtype(self) -> torch.dtype:
        """The dtype of new factors: the base weight's (a quantized base returns its compute dtype)."""
        return self.base_layer.weight.dtype

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` in :meth:`base_weight` layout, in float32 (for merging)."""
        cfg = self.lora_config[name]
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        return cfg.scale * (B @ A)

    # -- adapters --------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, config: Any) -> None:
        if name in self.lora_A:
            raise AdapterStateError(f"this layer already holds a LoRA adapter named {name!r}")
        weight = self.base_layer.weight
        a_shape, b_shape = self.factor_shapes(config.rank)
        factory = {"dtype": self.factor_dtype(), "device": weight.device}
        A = torch.empty(a_shape, **factory)
        B = torch.empty(b_shape, **factory)
        if config.init == "pissa":
            self._init_pissa(name, config, A, B)
        else:
            self._init_factors(config, A, B)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_config[name] = config

    def _init_factors(self, config: LoraConfig, A: torch.Tensor, B: torch.Tensor) -> None:
        with torch.no_grad():
            if config.init == "gaussian":
                nn.init.normal_(A, std=1.0 / config.rank)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def _init_pissa(self, name: str, config: LoraConfig, A: torch.Tensor, B: torch.Tensor) -> None:
        if any(self.lora_config[n].init == "pissa" for n in self.lora_config):
            raise ConfigError("a layer holds at most one init='pissa' adapter; use another init for the second")
        weight = self.base_weight()
        W = weight.detach().float().reshape(weight.shape[0], -1)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = config.rank
        if r > S.numel():
            raise ConfigError(f"init='pissa' needs rank <= min(out, in) = {S.numel()}, got rank {r}")
        root = torch.sqrt(S[:r] / config.scale)
        with torch.no_grad():
            A.copy_((root[:, None] * Vh[:r]).reshape(A.shape))
            B.copy_((U[:, :r] * root[None, :]).reshape(B.shape))
        self._store("lora_init_A", create=True).put(name, A.detach().clone())
        self._store("lora_init_B", create=True).put(name, B.detach().clone())
        self._store("lora_pissa_base", create=True).put(name, self.base_layer.weight.data)
        self._apply_pissa_residual(name, config)

    def _apply_pissa_residual(self, name: str, config: LoraConfig) -> None:
        # Rebind (never write in place) so the original tensor stays intact for unwrap/rollback.
        original = self._stored("lora_pissa_base", name)
        A0, B0 = self._stored("lora_init_A", name), self._stored("lora_init_B", name)
        delta = config.scale * (B0.float().reshape(B0.shape[0], -1) @ A0.float().reshape(A0.shape[0], -1))
        residual = self._from_out_in(original.float() if not self._transposed else original.float().t(), delta)
        self.base_layer.weight.data = residual.to(original.dtype).contiguous()

    _transposed = False

    def _from_out_in(self, weight_out_in: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        result = weight_out_in - delta.reshape(weight_out_in.shape)
        return result.t() if self._transposed else result

    def after_load(self, name: str) -> None:
        """Re-derives the PiSSA residual from the loaded initial factors (exact, from the original weight)."""
        if self.lora_config[name].init == "pissa":
            self._apply_pissa_residual(name, self.lora_config[name])

    def remove_adapter(self, name: str) -> None:
        original = self._stored("lora_pissa_base", name)
        if name in self.merged_adapters:
            self.merged_adapters.remove(name)  # its delta stays folded into the base weight
        elif original is not None:
            self.base_layer.weight.data = original
        for key in self._STORES:
            store = self._store(key)
            if store is not None:
                store.drop(name)
                if not store._buffers:
                    delattr(self, key)
        del self.lora_A[name]
        del self.lora_B[name]
        del self.lora_config[name]

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {"lora_A": self.lora_A[name], "lora_B": self.lora_B[name]}
        if self._stored("lora_init_A", name) is not None:
            tensors["lora_init_A"] = self._stored("lora_init_A", name)
            tensors["lora_init_B"] = self._stored("lora_init_B", name)
        return tensors

    # -- merge -----------------------------------------------------------------------------------
    def _fold(self, name: str, sign: float) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight(name).to(weight.dtype)
            if self._transposed:
                delta = delta.t()
            weight.add_(delta.reshape(weight.shape), alpha=sign)

    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            return
        self._fold(name, 1.0)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        if name not in self.merged_adapters:
            return
        self._fold(name, -1.0)
        self.merged_adapters.remove(name)

    # -- forward helpers ---------------------------------------------------------------------------
    def _dropout(self, x: torch.Tensor, cfg: LoraConfig) -> torch.Tensor:
        if not self.training or cfg.dropout == 0.0:
            return x
        keep = philox.keep_mask(new_seed_tensor(), x.shape, cfg.dropout, x.device)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - cfg.dropout))

    def extra_repr(self) -> str:
        ranks = {n: c.rank for n, c in self.lora_config.items()}
        return f"ranks={ranks}, active={list(self.active_adapters)}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear``: ``y = base(x) + scale * dropout(x) A^T B^T`` through :func:`lora_linear`.

    The class to build on for LoRA on another linear-like module type (a layer plugin, see
    docs/plugins.md). It reads ``base_layer.bias`` and, through :meth:`weight_for_op`, the base
    weight; ``factor_shapes`` reads :meth:`base_weight`'s ``(out, in)`` shape. Override
    :meth:`weight_for_op` and ``base_weight`` for a module that stores its weight otherwise.
    """

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_features, in_features = self.base_weight().shape
        return (rank, in_features), (out_features, rank)

    def weight_for_op(self) -> torch.Tensor:
        """The base weight as the op reads it: ``(N, K)`` = (out, in), any strides (a transposed
        view of a weight stored ``(in, out)`` is read in place, without a copy).

        Returns:
            The weight, shape ``(out_features, in_features)``.
        """
        return self.base_layer.weight

    def _weight_for_op(self) -> torch.Tensor:
        # The old, private name: forward calls it, so overriding either name works.
        return self.weight_for_op()

    def base_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The base layer's output computed by the layer itself, or ``None`` (the default).

        ``None`` lets the ``lora_linear`` op compute the base from :meth:`weight_for_op` fused with
        the low-rank path. A base whose matmul is its own (a quantized layer) returns
        ``self.base_layer(x)``; forward then adds the low-rank path into that output in place
        (:func:`peftcore.ops.lora_add.lora_add_`, seeded dropout, no stored mask).

        Args:
            x: input, shape ``(*, in_features)``.

        Returns:
            ``(*, out_features)`` (a fresh tensor: it is written in place), or ``None``.
        """
        return None

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        # The op's kernel per (backend, device type, dtype), resolved once rather than at every
        # forward (dispatch.select reads PEFTCORE_BACKEND and the registry); see docs/kernels.md.
        self._kernels = dispatch.KernelCache(OP)

    def add_adapter(self, name: str, config: Any) -> None:
        dispatch.check_backend(OP, config.backend, "lora backend")
        super().add_adapter(name, config)
        # Resolve the kernel now (eagerly) so torch.compile finds it in the layer's cache rather
        # than tracing the plugin registry (which would break the graph). A backend that cannot
        # run on this device yet (the model may move to a GPU later) is reported at forward.
        weight = self.base_layer.weight
        try:
            self._kernels(config.backend, weight.device.type, weight.dtype)
        except PeftcoreError:
            pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:  # one adapter per example: the grouped op
            return routed.linear_forward(self, x, self.routing)
        running = self.running_adapters()
        if not running:
            return self.base_layer(x)
        first, *rest = running
        cfg = self.lora_config[first]
        p = cfg.dropout if self.training else 0.0
        base = self.base_output(x)
        if base is not None:  # the base computed its own output: add every adapter's path into it
            for name in running:
                cfg = self.lora_config[name]
                p = cfg.dropout if self.training else 0.0
                base = lora_add_(base, x, self.lora_A[name], self.lora_B[name], cfg.scale, p, new_seed_tensor() if p > 0.0 else 0)
            return base
        # One op computes base + low-rank path. The seed is a fresh 0-dim tensor per call (drawn
        # from torch's generator, so torch.manual_seed fixes it); the op keeps it to regenerate
        # the mask in backward. x goes in as is: layers sharing an input (q, k, v) save it once.
        y = lora_linear(
            x, self._weight_for_op(), self.base_layer.bias, self.lora_A[first], self.lora_B[first],
            cfg.scale, p, new_seed_tensor() if p > 0.0 else 0, backend=cfg.backend, cache=self._kernels,
        )
        for name in rest:
            cfg = self.lora_config[name]
            h = F.linear(self._dropout(x, cfg), self.lora_A[name])  # (*, r)
            y = y + cfg.scale * F.linear(h, self.lora_B[name])
        return y


class LoraHFConv1D(LoraLinear):
    """LoRA on transformers' ``Conv1D`` (GPT-2), whose weight is stored ``(in, out)``."""

    _transposed = True

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.t()

    def weight_for_op(self) -> torch.Tensor:
        return self.base_layer.weight.t()


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: ``y = base(ids) + scale * A^T[ids] B^T`` (no dropout on ids).

    ``A`` starts at zero and ``B`` Gaussian, so the delta is zero at init as for linear layers.
    """

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num, dim = self.base_layer.weight.shape
        return (rank, num), (dim, rank)

    def _init_factors(self, config: LoraConfig, A: torch.Tensor, B: torch.Tensor) -> None:
        with torch.no_grad():
            nn.init.zeros_(A)
            nn.init.normal_(B, std=1.0 if config.init == "default" else 1.0 / config.rank)

    def delta_weight(self, name: str) -> torch.Tensor:
        cfg = self.lora_config[name]
        return cfg.scale * (self.lora_B[name].float() @ self.lora_A[name].float()).t()  # (num, dim)

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            return routed.looped_forward(self, ids, self.routing)
        y = self.base_layer(ids)
        for name in self.running_adapters():
            cfg = self.lora_config[name]
            h = self._embed(ids, self.lora_A[name].t())  # (*, r)
            y = y + cfg.scale * F.linear(h, self.lora_B[name])
        return y


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base's kernel, B a 1x1 conv."""

    def factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out_ch, in_ch, *kernel = self.base_layer.weight.shape
        return (rank, in_ch, *kernel), (out_ch, rank, *([1] * len(kernel)))

    def delta_weight(self, name: str) -> torch.Tensor:
        cfg = self.lora_config[name]
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        return cfg.scale * (B.flatten(1) @ A.flatten(1)).reshape(self.base_layer.weight.shape)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, stride: Any, padding: Any, dilation: Any) -> torch.Tensor:
        fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        return fn(x, weight, None, stride, padding, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is not None:
            return routed.looped_forward(self, x, self.routing)
        y = self.base_layer(x)
        base = self.base_layer
        for name in self.running_adapters():
            cfg = self.lora_config[name]
            h = self._conv(self._dropout(x, cfg), self.lora_A[name], base.stride, base.padding, base.dilation)
            y = y + cfg.scale * self._conv(h, self.lora_B[name], 1, 0, 1)
        return y


# The layer handlers of entry-point group peftcore.layers (entries lora.<name>).
LINEAR = Handler("torch.nn.Linear", is_linear, LoraLinear, method="lora", linear_like=True)
HF_CONV1D = Handler("transformers Conv1D", is_hf_conv1d, LoraHFConv1D, method="lora", linear_like=True)
EMBEDDING = Handler("torch.nn.Embedding", lambda m: plain_subclass(m, nn.Embedding), LoraEmbedding, method="lora")
CONV1D = Handler("torch.nn.Conv1d (groups=1, zero padding)", lambda m: is_conv(m) and isinstance(m, nn.Conv1d), LoraConv, method="lora")
CONV2D = Handler("torch.nn.Conv2d (groups=1, zero padding)", lambda m: is_conv(m) and isinstance(m, nn.Conv2d), LoraConv, method="lora")
CONV3D = Handler("torch.nn.Conv3d (groups=1, zero padding)", lambda m: is_conv(m) and isinstance(m, nn.Conv3d), LoraConv, method="lora")
