"""The conformance kit: the checks every adapter method, built-in or plugin, must pass.

Typical use in a method's test file::

    from peftcore.testing import check_method, tiny_model

    def test_ia3_conforms():
        report = check_method("ia3", lambda: tiny_model("gpt2"))
        assert "merge" in report.passed

:func:`check_method` wraps fresh models from ``model_factory`` with the method and checks, in
float32 and eval mode (so dropout is off):

==================  =========================================================================
check               what must hold
==================  =========================================================================
identity_at_init    a freshly wrapped model computes what the base does (only where the
                    method declares ``identity_at_init``)
training_mode       every module that ``wrap`` or ``load`` adds takes the training mode of the
                    model it joins (eval model: eval adapters, so two forwards agree; train
                    model: train adapters), and ``model.train()``/``eval()`` reach them
disable             after perturbing the adapter, its outputs differ from the base, and inside
                    ``peftcore.disabled`` they are the base's again
save_load           ``peftcore.save`` then ``peftcore.load`` on a fresh model reproduces the
                    outputs bit for bit; ``adapter_config.json`` records method and provider
merge               ``merge`` keeps outputs (rtol = atol = 1e-5), ``unmerge`` restores outputs
                    and base weights, ``unwrap(merge=True)`` gives a plain model computing the
                    same; a method with ``merges = False`` must make ``merge`` refuse
gradients           one backward pass: every parameter that gets a gradient (and every one that
                    requires it) is an adapter parameter, and some adapter gradient is non-zero
unwrap              ``unwrap`` restores the base exactly: outputs, state-dict keys and values,
                    module objects, ``requires_grad``
dtype               ``.to(torch.float64)`` moves outputs and adapter parameters to float64 (and
                    keeps outputs within 1e-4); ``.to(torch.bfloat16)`` runs to finite outputs
==================  =========================================================================

The first failing check raises ``AssertionError`` naming the method, the check and what differed.

Routing (many adapters in one batch) has :func:`check_routing`: a routed call equals each
adapter alone, example by example, forward and gradients.

Kernels have a kit of their own, :func:`check_kernel` (from :mod:`peftcore.testing_kernels`,
re-exported here): ``check_kernel("lora_linear", "mybackend")``.
Where a check needs an informative adapter (not the identity), every adapter parameter ``p`` is
perturbed by ``perturb * rms(p) * N(0, 1)`` (absolute ``perturb * N(0, 1)`` where ``p`` is all
zeros), with a fixed seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

import peftcore
from peftcore import registry
from peftcore.errors import AdapterStateError, ConfigError, PeftcoreError
from peftcore.tuners.base import AdapterLayer
from peftcore.testing_kernels import KERNEL_CHECKS, KernelReport, check_kernel  # noqa: F401  (the kernel kit, re-exported)

#: Every check :func:`check_method` runs, in order.
CHECKS = ("identity_at_init", "training_mode", "disable", "save_load", "merge", "gradients", "unwrap", "dtype")
#: Model families :func:`tiny_model` builds.
TINY_FAMILIES = ("bert", "gpt2", "llama")

ADAPTER = "conformance"  # the adapter name the kit uses
_MERGE_TOL = 1e-5  # fp32 merge / unmerge equivalence (absolute and relative)
_FLOAT64_TOL = 1e-4  # float64 outputs against float32 ones


@dataclasses.dataclass
class ConformanceReport:
    """What :func:`check_method` found.

    Attributes:
        method: the method's registry name.
        model: the class of the model that ``model_factory`` returns.
        provider: the method's distribution and version (``None`` values when registered in code).
        results: check name -> ``"passed"``, ``"passed: <note>"`` or ``"skipped: <reason>"``.
        num_targets: how many modules the method attached to (0 for methods that attach to
            the model itself).
        num_adapter_parameters: number of scalars in the adapter's parameters.
        max_abs_diff: for each comparison made with a tolerance, the largest absolute difference
            measured (e.g. ``"merge"`` -> 3e-7).
    """

    method: str
    model: str
    provider: dict[str, str | None]
    results: dict[str, str] = dataclasses.field(default_factory=dict)
    num_targets: int = 0
    num_adapter_parameters: int = 0
    max_abs_diff: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> list[str]:
        """Names of the checks that ran and passed."""
        return [name for name, result in self.results.items() if result.startswith("passed")]

    @property
    def skipped(self) -> dict[str, str]:
        """Check name -> why it did not run."""
        return {name: r.removeprefix("skipped: ") for name, r in self.results.items() if r.startswith("skipped")}

    def __str__(self) -> str:
        dist = self.provider.get("distribution") or "registered in code"
        lines = [f"{self.method} ({dist} {self.provider.get('version') or ''}".rstrip() + f") on {self.model}: "
                 f"{self.num_targets} targets, {self.num_adapter_parameters} adapter parameters"]
        for name, result in self.results.items():
            diff = f"  (max abs diff {self.max_abs_diff[name]:.2e})" if name in self.max_abs_diff else ""
            lines.append(f"  {name:<17} {result}{diff}")
        return "\n".join(lines)


class _Failure(AssertionError):
    pass


def check_method(
    method: str | Any,
    model_factory: Callable[[], nn.Module],
    *,
    inputs_factory: Callable[[], Any] | None = None,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    targets: Any = None,
    exclude: Any = None,
    layers: int | Iterable[int] | None = None,
    skip: Iterable[str] = (),
    perturb: float = 0.1,
    seed: int = 0,
    **options: Any,
) -> ConformanceReport:
    """Runs the checks every adapter method must pass (see the module docstring for the list).

    Args:
        method: a registered method name such as ``"lora"``, or a method object (or class)
            following :class:`peftcore.tuners.base.Method`; an object not yet registered is
            registered for the duration of the checks only.
        model_factory: returns a fresh base model, with the same weights on every call (seed it).
            The kit converts it to float32 and eval mode.
        inputs_factory: returns example inputs: a tensor (``model(x)``), a tuple
            (``model(*args)``) or a mapping (``model(**kwargs)``). Called once (under the kit's
            seed); every forward gets a copy of the same inputs. Default, for models with
            ``config.vocab_size`` (transformers models): ``input_ids`` of shape ``(2, 8)`` and
            an all-ones ``attention_mask``. Floating tensors are cast to the model's dtype in the
            dtype check.
        output_fn: picks the tensor to compare from the model's output. Default: the output
            itself if a tensor, else its ``logits``, else its first tensor.
        targets, exclude, layers: passed to :func:`peftcore.wrap` (default: the method's own
            default targets).
        skip: names of checks not to run (from :data:`CHECKS`); they are reported as skipped.
        perturb: relative size of the random perturbation of adapter parameters (see above).
        seed: seeds adapter initialisation, perturbations and default inputs.
        **options: the method's options, passed to :func:`peftcore.wrap`, e.g. ``rank=4``.

    Returns:
        A :class:`ConformanceReport`; ``str(report)`` prints one line per check.

    Raises:
        AssertionError: the first check that fails, naming the method, the check and what differed.
        ConfigError: bad arguments to the kit: unknown check names, a factory that returns no
            ``nn.Module`` or different weights on each call, no way to build inputs, bad method
            options (other :class:`peftcore.PeftcoreError` from :func:`peftcore.wrap`, such as
            ``TargetError``, pass through as well).
        PluginError: ``method`` is an unknown name or fails to load.
    """
    skip = set(skip)
    unknown = sorted(skip - set(CHECKS))
    if unknown:
        raise ConfigError(f"check_method: unknown check(s) {', '.join(map(repr, unknown))} in skip=; checks are {', '.join(CHECKS)}")
    if not (isinstance(perturb, (int, float)) and math.isfinite(perturb) and perturb > 0):
        raise ConfigError(f"check_method: perturb must be a positive number, got {perturb!r}")
    # fork_rng: the kit (and factories that reseed) leave the caller's global RNG as it was.
    with _method_available(method) as (name, method_obj), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            kit = _Kit(name, method_obj, model_factory, inputs_factory, output_fn,
                       dict(targets=targets, exclude=exclude, layers=layers, **options), perturb, seed)
        except PeftcoreError:
            raise  # bad arguments (ConfigError, TargetError, ...): the caller's to fix
        except _Failure as exc:
            raise AssertionError(f"check_method({name!r}): setting up (wrapping a fresh model) failed: {exc}") from exc.__cause__
        except Exception as exc:
            raise AssertionError(f"check_method({name!r}): setting up (wrapping a fresh model) failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        for check in CHECKS:
            if check in skip:
                kit.report.results[check] = "skipped: skip= asked for it"
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                try:
                    kit.report.results[check] = getattr(kit, f"check_{check}")()
                except _Failure as exc:
                    message = f"check_method({name!r}) on {kit.report.model}: check '{check}' failed: {exc}"
                    raise AssertionError(message) from exc.__cause__
                except Exception as exc:  # the method itself raised: a failure of this check too
                    message = (f"check_method({name!r}) on {kit.report.model}: check '{check}' failed: "
                               f"{type(exc).__name__}: {exc}")
                    raise AssertionError(message) from exc
        return kit.report


# -- models --------------------------------------------------------------------------------------
def _comparable(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor ``torch.equal`` can compare: quantized tensor subclasses (torchao) dequantized."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "dequantize"):
        return tensor.dequantize()
    return tensor


def tiny_model(family: str = "gpt2", seed: int = 0) -> nn.Module:
    """A tiny randomly initialised transformers model, the same for the same ``seed``.

    Meant as ``model_factory`` for :func:`check_method` in plugin tests (hidden size 32, 2 blocks,
    vocabulary 128); global RNG state is left untouched.

    Args:
        family: ``"bert"`` (``BertForSequenceClassification``, 3 labels), ``"gpt2"``
            (``GPT2LMHeadModel``) or ``"llama"`` (``LlamaForCausalLM``, grouped-query attention).
        seed: seeds the weights.

    Returns:
        The model in eval mode.
    """
    import transformers

    if family == "bert":
        config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, num_labels=3)
        cls = transformers.BertForSequenceClassification
    elif family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    elif family == "llama":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
        cls = transformers.LlamaForCausalLM
    else:
        raise ConfigError(f"tiny_model: unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


# -- helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _method_available(method: Any) -> Iterator[tuple[str, Any]]:
    """Yields ``(name, method object)``; registers an object for the duration if needed."""
    if isinstance(method, str):
        yield method, registry.get_method(method)
        return
    obj = method() if isinstance(method, type) else method
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"check_method: {method!r} is neither a method name nor a method object with a 'name'")
    with registry.METHODS.temporarily(name, obj) as registered:
        yield name, registered


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _default_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ConfigError(
        f"check_method: cannot find a tensor in the model's output ({type(out).__name__}); pass "
        "output_fn=lambda out: <the tensor to compare>"
    )


def _clone_inputs(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.clone()
    if isinstance(inputs, Mapping):
        return {k: _clone_inputs(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_clone_inputs(v) for v in inputs)
    return inputs


def _cast_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping):
        return {k: _cast_inputs(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_cast_inputs(v, dtype) for v in inputs)
    return inputs


class _Kit:
    """State shared by the checks of one :func:`check_method` call."""

    def __init__(self, name: str, method: Any, model_factory: Callable[[], nn.Module], inputs_factory: Any,
                 output_fn: Any, wrap_kwargs: dict[str, Any], perturb: float, seed: int):
        self.name, self.method = name, method
        self.model_factory, self.output_fn = model_factory, output_fn or _default_output
        self.wrap_kwargs, self.perturb_size, self.seed = wrap_kwargs, float(perturb), seed
        first, second = self.fresh(), self.fresh()
        self._check_same_weights(first, second)
        # Called once: every forward of every check reads (a copy of) the same inputs, so a factory
        # that draws random tensors without a seed is fine.
        self.inputs = (inputs_factory or self._token_inputs_factory(first))()
        self.report = ConformanceReport(name, f"{type(first).__module__}.{type(first).__qualname__}",
                                        registry.method_provider(name))
        self.base_keys = list(first.state_dict())
        self.base_out = self.run(first)
        probe = self.wrap(second)
        self.report.num_targets = len(probe._peftcore.adapters[ADAPTER].targets)
        self.report.num_adapter_parameters = sum(p.numel() for _, p in self.adapter_params(probe))

    # -- building blocks ---------------------------------------------------------------------------
    def fresh(self) -> nn.Module:
        model = self.model_factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"check_method: model_factory() must return a torch.nn.Module, got {type(model).__name__}")
        if peftcore.adapters(model):
            raise ConfigError("check_method: model_factory() returned a model that already holds peftcore adapters; return a plain base model")
        return model.float().eval()

    @staticmethod
    def _check_same_weights(a: nn.Module, b: nn.Module) -> None:
        sa, sb = a.state_dict(), b.state_dict()
        if a is b or list(sa) != list(sb) or any(not torch.equal(_comparable(sa[k]), _comparable(sb[k])) for k in sa):
            raise ConfigError(
                "check_method: model_factory() must return a new model with the same weights on every call "
                "(seed it, e.g. torch.manual_seed(0) before building, or deep-copy a cached model)"
            )

    def _token_inputs_factory(self, model: nn.Module) -> Callable[[], Any]:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(vocab, int) or vocab <= 0:
            raise ConfigError(
                f"check_method: {type(model).__name__} has no config.vocab_size to make token ids from; pass "
                "inputs_factory=lambda: <a tensor, a tuple of arguments or a dict of keyword arguments>"
            )
        seed = self.seed

        def token_inputs() -> dict[str, torch.Tensor]:
            ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        return token_inputs

    def run(self, model: nn.Module, dtype: torch.dtype | None = None, grad: bool = False) -> torch.Tensor:
        inputs = _clone_inputs(self.inputs)  # a model that writes into its inputs cannot change later checks
        if dtype is not None:
            inputs = _cast_inputs(inputs, dtype)
        with torch.set_grad_enabled(grad):
            if isinstance(inputs, Mapping):
                out = model(**inputs)
            elif isinstance(inputs, (tuple, list)):
                out = model(*inputs)
            else:
                out = model(inputs)
        out = self.output_fn(out)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"check_method: output_fn returned {type(out).__name__}, not a tensor")
        return out if grad else out.detach().clone()

    def wrap(self, model: nn.Module) -> nn.Module:
        returned = peftcore.wrap(model, self.name, name=ADAPTER, **self.wrap_kwargs)
        if returned is not model:
            raise _Failure("peftcore.wrap returned another object than the model it was given")
        self._check_layer_methods(model)
        return model

    def _check_layer_methods(self, model: nn.Module) -> None:
        """Adapter layers holding the kit's adapter must say they belong to this method: the
        method finds its layers by their ``method`` attribute, so a mismatch hides them."""
        for path, module in model.named_modules():
            if not isinstance(module, AdapterLayer) or module.method == self.name:
                continue
            try:
                holds = ADAPTER in module.adapter_names()
            except Exception:
                continue
            if holds:
                raise _Failure(
                    f"the adapter layer at {path!r} ({type(module).__qualname__}) has method = {module.method!r}, "
                    f"but the method is {self.name!r}: set the class attribute method = {self.name!r} on the layer "
                    "class, or the method cannot find its layers (no parameters, state or merging)"
                )

    def adapter_params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return list(self.method.adapter_parameters(model, ADAPTER))

    def perturb(self, model: nn.Module) -> None:
        generator = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            for _, param in sorted(self.adapter_params(model), key=lambda item: item[0]):
                rms = float(param.detach().double().pow(2).mean().sqrt()) if param.numel() else 0.0
                size = self.perturb_size * (rms if rms > 0 else 1.0)
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_(size * noise.to(dtype=param.dtype, device=param.device))

    def wrapped_perturbed(self) -> nn.Module:
        model = self.wrap(self.fresh())
        self.perturb(model)
        return model

    def close(self, check: str, actual: torch.Tensor, expected: torch.Tensor, what: str,
              rtol: float | None = None, atol: float | None = None) -> None:
        diff = _max_diff(actual, expected)
        self.report.max_abs_diff[check] = max(self.report.max_abs_diff.get(check, 0.0), diff)
        try:
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_dtype=False)
        except AssertionError as exc:
            raise _Failure(f"{what} (max abs diff {diff:.3e}; shapes {tuple(actual.shape)} vs {tuple(expected.shape)})\n{exc}") from None

    def equal(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        actual, expected = _comparable(actual), _comparable(expected)
        if actual.shape != expected.shape or actual.dtype != expected.dtype or not torch.equal(actual, expected):
            raise _Failure(f"{what} (max abs diff {_max_diff(actual, expected):.3e})")

    # -- checks --------------------------------------------------------------------------------------
    def check_identity_at_init(self) -> str:
        if not getattr(self.method, "identity_at_init", False):
            return "skipped: the method declares identity_at_init = False"
        model = self.wrap(self.fresh())
        if ADAPTER not in peftcore.adapters(model):
            raise _Failure("peftcore.adapters(model) does not list the adapter after wrap")
        self.close("identity_at_init", self.run(model), self.base_out,
                   "a freshly wrapped model does not compute what the base model does, though the method declares identity_at_init")
        return "passed"

    def _modes(self, model: nn.Module, mode: bool, how: str) -> None:
        wrong = [n or "<model>" for n, m in model.named_modules() if m.training != mode]
        if wrong:
            raise _Failure(f"after {how}, modules {wrong[:5]} have training={not mode}, expected training={mode}: "
                           "adapter modules must follow the model's train/eval mode")

    def check_training_mode(self) -> str:
        model = self.wrapped_perturbed()  # fresh() returns eval-mode models
        self._modes(model, False, "peftcore.wrap on a model in eval mode")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 3)
            first = self.run(model)
            torch.manual_seed(self.seed + 4)
            self.equal(self.run(model), first, "two forwards of a wrapped model in eval mode differ (dropout or other "
                                               "training-only behaviour runs at inference)")
        model.train()
        self._modes(model, True, "model.train() on the wrapped model")
        model.eval()
        self._modes(model, False, "model.eval() on the wrapped model")
        trained = self.wrap(self.fresh().train())
        self._modes(trained, True, "peftcore.wrap on a model in training mode")
        with tempfile.TemporaryDirectory(prefix="peftcore-conformance-") as tmp:
            peftcore.save(model, Path(tmp) / "adapter")
            loaded = peftcore.load(self.fresh(), Path(tmp) / "adapter")
        self._modes(loaded, False, "peftcore.load onto a model in eval mode")
        self.equal(self.run(loaded), first, "outputs of a fresh eval-mode model after peftcore.load differ from the saved model's")
        return "passed"

    def check_disable(self) -> str:
        model = self.wrapped_perturbed()
        adapted = self.run(model)
        if _max_diff(adapted, self.base_out) <= 1e-6:
            raise _Failure("after perturbing every adapter parameter the outputs still equal the base model's: "
                           "the adapter has no effect (or adapter_parameters() misses its parameters)")
        with peftcore.disabled(model):
            self.close("disable", self.run(model), self.base_out, "inside peftcore.disabled(model) the outputs are not the base model's")
        self.equal(self.run(model), adapted, "after peftcore.disabled(model) ends the adapter does not act again as before")
        return "passed"

    def check_save_load(self) -> str:
        model = self.wrapped_perturbed()
        adapted = self.run(model)
        with tempfile.TemporaryDirectory(prefix="peftcore-conformance-") as tmp:
            path = Path(tmp) / "adapter"
            peftcore.save(model, path)
            config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
            config = config.get("peftcore", config)  # HF PEFT's format (the default for LoRA) keeps them there
            if config.get("method") != self.name:
                raise _Failure(f"adapter_config.json records method {config.get('method')!r}, expected {self.name!r}")
            if config.get("provider") != self.report.provider:
                raise _Failure(f"adapter_config.json records provider {config.get('provider')!r}, expected {self.report.provider!r}")
            fresh = self.fresh()
            returned = peftcore.load(fresh, path)
        if returned is not fresh:
            raise _Failure("peftcore.load returned another object than the model it was given")
        saved = dict(self.adapter_params(model))
        loaded = dict(self.adapter_params(fresh))
        if sorted(saved) != sorted(loaded):
            raise _Failure(f"the loaded adapter has parameters {sorted(loaded)[:4]}..., the saved one {sorted(saved)[:4]}...")
        for key, param in saved.items():
            self.equal(loaded[key].detach(), param.detach(), f"adapter parameter {key} differs after save and load")
        self.equal(self.run(fresh), adapted, "outputs of a fresh model after peftcore.load differ from the saved model's")
        return "passed"

    def check_merge(self) -> str:
        model = self.wrapped_perturbed()
        adapted = self.run(model)
        if not getattr(self.method, "merges", False):
            try:
                peftcore.merge(model)
            except AdapterStateError:
                self.equal(self.run(model), adapted, "a refused merge changed the outputs")
                return "passed: merge refused as declared (merges = False)"
            raise _Failure("the method declares merges = False, but peftcore.merge did not refuse")
        base_before = {k: v.clone() for k, v in model.state_dict().items() if k in self.base_keys}
        if len(base_before) != len(self.base_keys):
            raise _Failure(f"the wrapped model's state_dict lacks base keys: {sorted(set(self.base_keys) - set(base_before))[:5]}")
        peftcore.merge(model)
        if not peftcore.adapters(model)[ADAPTER].merged:
            raise _Failure("peftcore.adapters(model) does not report the adapter as merged after peftcore.merge")
        self.close("merge", self.run(model), adapted, "outputs after merge differ from the unmerged adapter's",
                   rtol=_MERGE_TOL, atol=_MERGE_TOL)
        peftcore.unmerge(model)
        self.close("merge", self.run(model), adapted, "outputs after merge then unmerge differ from before the merge",
                   rtol=_MERGE_TOL, atol=_MERGE_TOL)
        after = model.state_dict()
        for key, value in base_before.items():
            self.close("merge", after[key], value, f"base tensor {key} after merge then unmerge differs from before",
                       rtol=_MERGE_TOL, atol=_MERGE_TOL)
        peftcore.unwrap(model, merge=True)
        leftovers = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
        if leftovers or "_peftcore" in model.__dict__:
            raise _Failure(f"unwrap(merge=True) left adapter layers behind: {leftovers[:3]}")
        self.close("merge", self.run(model), adapted, "the plain model from unwrap(merge=True) does not compute what the adapter did",
                   rtol=_MERGE_TOL, atol=_MERGE_TOL)
        return "passed"

    def check_gradients(self) -> str:
        model = self.fresh()
        base_ids = {id(p) for p in model.parameters()}
        self.wrap(model)
        if getattr(self.method, "identity_at_init", False):
            self.perturb(model)  # an identity adapter can have zero gradients by construction (LoRA's A)
        adapter = {id(p): n for n, p in self.adapter_params(model)}
        if not adapter:
            raise _Failure("adapter_parameters() lists no parameter")
        shared = [n for pid, n in adapter.items() if pid in base_ids]
        if shared:
            raise _Failure(f"adapter_parameters() lists parameters of the base model: {shared[:5]}")
        model_params = dict(model.named_parameters())
        outside = [n for pid, n in adapter.items() if pid not in {id(p) for p in model_params.values()}]
        if outside:
            raise _Failure(f"adapter parameters {outside[:3]} are not parameters of the model (they would not move with .to())")
        model.zero_grad(set_to_none=True)
        out = self.run(model, grad=True)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(self.seed + 2), dtype=torch.float32)
        (out.float() * weights.to(out.device)).sum().backward()
        requires = [n for n, p in model_params.items() if p.requires_grad and id(p) not in adapter]
        if requires:
            raise _Failure(f"base parameters require grad after wrap: {requires[:5]}")
        frozen = [n for n, p in self.adapter_params(model) if not p.requires_grad]
        if frozen:
            raise _Failure(f"adapter parameters do not require grad after wrap: {frozen[:5]}")
        with_grad = [n for n, p in model_params.items() if p.grad is not None and id(p) not in adapter]
        if with_grad:
            raise _Failure(f"base parameters received gradients: {with_grad[:5]}")
        grads = [(n, p.grad) for n, p in self.adapter_params(model) if p.grad is not None]
        bad = [n for n, g in grads if not torch.isfinite(g).all()]
        if bad:
            raise _Failure(f"adapter gradients are not finite: {bad[:5]}")
        if not any(bool(g.abs().sum() > 0) for _, g in grads):
            raise _Failure("no adapter parameter received a non-zero gradient")
        nonzero = sum(bool(g.abs().sum() > 0) for _, g in grads)
        return f"passed: {nonzero} of {len(adapter)} adapter tensors got non-zero gradients"

    def check_unwrap(self) -> str:
        model = self.fresh()
        modules = list(model.named_modules())
        state = {k: v.clone() for k, v in model.state_dict().items()}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.wrap(model)
        self.perturb(model)
        self.run(model)
        returned = peftcore.unwrap(model)
        if returned is not model:
            raise _Failure("peftcore.unwrap returned another object than the model it was given")
        if "_peftcore" in model.__dict__ or peftcore.adapters(model):
            raise _Failure("the model still holds peftcore state after unwrap")
        after = list(model.named_modules())
        if [n for n, _ in after] != [n for n, _ in modules]:
            raise _Failure(f"module paths changed: {sorted(set(n for n, _ in after) ^ set(n for n, _ in modules))[:5]}")
        moved = [n for (n, a), (_, b) in zip(after, modules) if a is not b]
        if moved:
            raise _Failure(f"unwrap did not put the original module objects back at {moved[:5]}")
        new_state = model.state_dict()
        if list(new_state) != list(state):
            raise _Failure(f"state_dict keys changed: {sorted(set(new_state) ^ set(state))[:5]}")
        for key, value in state.items():
            self.equal(new_state[key], value, f"state_dict tensor {key} changed after unwrap")
        changed = [n for n, p in model.named_parameters() if p.requires_grad != flags[n]]
        if changed:
            raise _Failure(f"requires_grad not restored by unwrap: {changed[:5]}")
        self.equal(self.run(model), self.base_out, "outputs after unwrap differ from the base model's")
        return "passed"

    def check_dtype(self) -> str:
        model = self.wrapped_perturbed()
        reference = self.run(model)
        for dtype in (torch.float64, torch.bfloat16):
            model.to(dtype)
            wrong = [f"{n} ({p.dtype})" for n, p in self.adapter_params(model) if p.is_floating_point() and p.dtype != dtype]
            if wrong:
                raise _Failure(f"after model.to({dtype}) adapter parameters are not {dtype}: {wrong[:5]}")
            try:
                out = self.run(model, dtype=dtype)
            except Exception as exc:
                raise _Failure(f"forward after model.to({dtype}) raised {type(exc).__name__}: {exc}") from exc
            if out.is_floating_point() and out.dtype != dtype:
                raise _Failure(f"after model.to({dtype}) the output is {out.dtype}")
            if not torch.isfinite(out.float()).all():
                raise _Failure(f"after model.to({dtype}) the output has non-finite values")
            if dtype == torch.float64:
                self.close("dtype", out, reference.to(dtype), "float64 outputs are far from the float32 ones",
                           rtol=_FLOAT64_TOL, atol=_FLOAT64_TOL)
        return "passed"


def check_routing(
    model: nn.Module,
    inputs: Mapping[str, Any],
    names: Iterable[str],
    *,
    gradients: bool = True,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grad_rtol: float = 1e-4,
    grad_atol: float = 1e-5,
) -> None:
    """Checks per-example routing the way a user meets it: ``model(**inputs, adapter_names=names)``.

    * Forward: row ``i`` of the routed output equals the model run on example ``i`` alone with
      adapter ``names[i]`` active (inside ``peftcore.disabled`` for ``"__base__"``).
    * ``gradients``: the routed call's summed output gives every parameter the routed adapters own
      (what their method saves) the gradient that running each adapter alone on its own examples
      gives (summed the same way), and some of them are non-zero. Run it in eval mode (dropout off) so that the two sides draw nothing random.

    The model's active adapters and ``requires_grad`` flags are put back afterwards; gradients are
    cleared.

    Args:
        model: a wrapped model holding the adapters ``names`` uses.
        inputs: keyword inputs whose tensors have the batch in dimension 0 (one example per name).
        names: one adapter name (or ``"__base__"``) per example.
        output_fn: the tensor to compare in the model's output (default: ``logits``, the tensor
            itself, or the first tensor of a tuple or mapping).

    Raises:
        AssertionError: naming the example or parameter that differs, and by how much.
    """
    from peftcore import lifecycle
    from peftcore.routing import BASE

    names = list(names)
    output_fn = output_fn or _default_output
    state = lifecycle.get_state(model)
    active, flags = list(state.active), {n: p.requires_grad for n, p in model.named_parameters()}

    def example(rows: list[int]) -> dict[str, Any]:
        return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def alone(name: str, rows: list[int]) -> torch.Tensor:
        if name == BASE:
            with peftcore.disabled(model):
                return output_fn(model(**example(rows)))
        peftcore.activate(model, name)
        return output_fn(model(**example(rows)))

    adapters = sorted(set(names) - {BASE})
    owned = {(t.data_ptr(), t.shape) for a in adapters for t in registry.get_method(state.adapters[a].method).adapter_state(model, a).values()}
    params = {n: p for n, p in model.named_parameters() if (p.data_ptr(), p.shape) in owned}  # adapter_state detaches
    try:
        with torch.no_grad():
            routed = output_fn(model(**inputs, adapter_names=names))
            for i, name in enumerate(names):
                want = alone(name, [i])
                diff = _max_diff(routed[i:i + 1], want)
                if not diff <= atol + rtol * float(want.abs().max()):
                    raise AssertionError(f"check_routing: example {i} routed to {name!r} differs from {name!r} alone by {diff:.3g}")
        if not gradients:
            return
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        output_fn(model(**inputs, adapter_names=names)).sum().backward()
        mixed = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        for name in adapters:
            alone(name, [i for i, n in enumerate(names) if n == name]).sum().backward()
        for n, p in params.items():
            got, want = mixed[n], p.grad
            if (got is None) != (want is None):
                raise AssertionError(f"check_routing: {n} gets a gradient {'only routed' if want is None else 'only alone'}")
            if got is not None and not torch.allclose(got, want, rtol=grad_rtol, atol=grad_atol):
                raise AssertionError(f"check_routing: the gradient of {n} from the mixed batch differs from its adapter's own "
                                     f"examples run alone by {_max_diff(got, want):.3g}")
        if not any(g is not None and bool(g.abs().sum() > 0) for g in mixed.values()):
            raise AssertionError("check_routing: no adapter parameter got a non-zero gradient from the routed call")
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
        if active:
            peftcore.activate(model, active)
