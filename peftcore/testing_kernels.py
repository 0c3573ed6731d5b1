"""The kernel conformance kit: :func:`check_kernel`, the kernel twin of ``check_method``.

A kernel (entry point ``<op>.<backend>`` in ``peftcore.kernels``, see docs/plugins.md) must
compute what its op's reference computes. :func:`check_kernel` calls the kernel object directly,
the way :func:`peftcore.ops.lora.lora_linear` does (``x`` flattened to ``(M, K)``, the result
``(M, N)``, the seed a 0-dim int64 tensor if the kernel sets ``seed_tensor = True``, else an int),
and compares it with ``reference_lora_linear``:

=============  =============================================================================
check          what must hold
=============  =============================================================================
forward        outputs within the dtype's tolerance of the reference (computed in float64),
               for every dtype and odd shape, with and without bias and dropout
gradients      the gradients of ``x``, ``weight``, ``bias``, ``A`` and ``B`` likewise
dropout_mask   the dropout mask, forward and backward, equals ``philox.keep_mask`` bit for bit
seeds          the same for several seeds, negative and above 2**32 included
noncontiguous  a transposed ``x`` and a transposed ``weight`` view give the same results
empty_batch    ``M = 0`` gives a ``(0, N)`` output and zero gradients of ``A`` and ``B``
opcheck        ``torch.library.opcheck`` on every ``torch.library`` op the kernel calls
               (skipped for kernels that call none)
compile        ``torch.compile(fullgraph=True)`` of the kernel gives the eager results
=============  =============================================================================

Every check runs (a failure does not stop the others); if any failed, one ``AssertionError``
lists each failed check with what differed. Only ``lora_linear`` is covered so far.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterable, Sequence

import torch

from peftcore.errors import BackendUnavailableError, ConfigError

#: Every check :func:`check_kernel` runs, in order.
KERNEL_CHECKS = ("forward", "gradients", "dropout_mask", "seeds", "noncontiguous", "empty_batch", "opcheck", "compile")

#: (rtol, atol) per dtype, against the reference computed in float64 from the same inputs; atol is
#: relative to the largest magnitude of the expected tensor (gradients of A and B sum over rows).
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}
#: (M, K, N, r) of the forward and gradient checks: single elements, primes, ragged tiles.
SHAPES = ((1, 1, 1, 1), (3, 7, 5, 2), (37, 61, 29, 4), (6, 42, 123, 16))
#: Seeds of the ``seeds`` check: small, past 32 bits, negative (two's complement), the extremes.
SEEDS = (0, 1, 2**32 + 7, 2**62 + 3, -1, -(2**40) - 7, 2**63 - 1, -(2**63))
_SCALE = 1.5
_DROPOUT = 0.25


@dataclasses.dataclass
class KernelReport:
    """What :func:`check_kernel` found.

    Attributes:
        op, backend: the kernel checked.
        device: the device type the checks ran on.
        dtypes: the dtypes checked.
        results: check name -> ``"passed"``, ``"passed: <note>"``, ``"skipped: <reason>"`` or
            ``"failed: <what differed>"``.
        max_abs_diff: per check, the largest absolute difference from the reference measured.
    """

    op: str
    backend: str
    device: str
    dtypes: tuple[str, ...]
    results: dict[str, str] = dataclasses.field(default_factory=dict)
    max_abs_diff: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> list[str]:
        """Names of the checks that ran and passed."""
        return [name for name, result in self.results.items() if result.startswith("passed")]

    @property
    def failed(self) -> dict[str, str]:
        """Check name -> what differed."""
        return {name: r.removeprefix("failed: ") for name, r in self.results.items() if r.startswith("failed")}

    @property
    def skipped(self) -> dict[str, str]:
        """Check name -> why it did not run."""
        return {name: r.removeprefix("skipped: ") for name, r in self.results.items() if r.startswith("skipped")}

    def __str__(self) -> str:
        lines = [f"{self.op}.{self.backend} on {self.device} ({', '.join(self.dtypes)})"]
        for name, result in self.results.items():
            diff = f"  (max abs diff {self.max_abs_diff[name]:.2e})" if name in self.max_abs_diff else ""
            lines.append(f"  {name:<14} {result.splitlines()[0]}{diff}")
        return "\n".join(lines)


class _Failure(AssertionError):
    pass


def check_kernel(
    op: str,
    backend: str | Any,
    *,
    device: str | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shapes: Sequence[tuple[int, int, int, int]] = SHAPES,
    seeds: Sequence[int] = SEEDS,
    skip: Iterable[str] = (),
    compile_backend: str = "aot_eager",
) -> KernelReport:
    """Checks one kernel of ``op`` against the op's reference (see the module docstring).

    Args:
        op: the op, ``"lora_linear"``.
        backend: a registered backend name such as ``"cpp"`` (looked up as ``<op>.<backend>``),
            or a kernel object (with ``op``, ``backend``, ``devices``, ``available``, ``__call__``).
        device: the device type to test on; default: ``"cpu"`` if the kernel runs there, else
            the first of its ``devices``.
        dtypes: default: float32, float64 and bfloat16, or the kernel's ``dtypes`` attribute.
        shapes: ``(M, K, N, r)`` tuples for the forward and gradient checks.
        seeds: dropout seeds of the ``seeds`` check (ints in the int64 range).
        skip: names of checks not to run (from :data:`KERNEL_CHECKS`), reported as skipped.
        compile_backend: the ``torch.compile`` backend of the ``compile`` check (``"inductor"``
            also generates code; ``"aot_eager"``, the default, traces fake tensors and autograd
            in seconds).

    Returns:
        A :class:`KernelReport` in which every check passed or was skipped.

    Raises:
        AssertionError: one or more checks failed; the message names each failed check and what
            differed (the report is the exception's ``report`` attribute).
        ConfigError: an op the kit does not cover, unknown check names, bad shapes.
        BackendUnavailableError: the kernel cannot run here (with its reason).
        PluginError: ``backend`` names a kernel plugin that fails to load, or no such kernel.
    """
    if op != "lora_linear":
        raise ConfigError(f"check_kernel: op {op!r} is not covered; the kit checks 'lora_linear' kernels")
    skip = set(skip)
    unknown = sorted(skip - set(KERNEL_CHECKS))
    if unknown:
        raise ConfigError(f"check_kernel: unknown check(s) {', '.join(map(repr, unknown))} in skip=; checks are {', '.join(KERNEL_CHECKS)}")
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise ConfigError(f"check_kernel: shapes must be (M, K, N, r) tuples of positive sizes, got {shapes!r}")
    kernel = _resolve(op, backend)
    devices = tuple(getattr(kernel, "devices", ("cpu",)))
    device = device or ("cpu" if "cpu" in devices else devices[0])
    if device not in devices:
        raise BackendUnavailableError(f"check_kernel: the {kernel.backend!r} kernel of {op} runs on {', '.join(devices)}, not on {device}")
    ok, reason = kernel.available()
    if not ok:
        raise BackendUnavailableError(f"check_kernel: the {kernel.backend!r} kernel of {op} is unavailable: {reason}")
    dtypes = tuple(dtypes or getattr(kernel, "dtypes", None) or (torch.float32, torch.float64, torch.bfloat16))
    report = KernelReport(op, kernel.backend, device, tuple(str(d).removeprefix("torch.") for d in dtypes))
    kit = _KernelKit(kernel, device, dtypes, tuple(shapes), tuple(seeds), compile_backend, report)
    first_error: BaseException | None = None
    with torch.random.fork_rng(devices=[]):
        for check in KERNEL_CHECKS:
            if check in skip:
                report.results[check] = "skipped: skip= asked for it"
                continue
            torch.manual_seed(0)
            try:
                report.results[check] = getattr(kit, f"check_{check}")()
            except _Failure as exc:
                report.results[check] = f"failed: {exc}"
                first_error = first_error or exc
            except Exception as exc:  # the kernel raised: a failure of this check
                report.results[check] = f"failed: {type(exc).__name__}: {exc}"
                first_error = first_error or exc
    if report.failed:
        listing = "\n".join(f"  check '{name}' failed: {what}" for name, what in report.failed.items())
        error = AssertionError(f"check_kernel({op!r}, {kernel.backend!r}) on {device}: "
                               f"{len(report.failed)} check(s) failed:\n{listing}")
        error.report = report  # type: ignore[attr-defined]
        raise error from first_error
    return report


def _resolve(op: str, backend: Any) -> Any:
    if not isinstance(backend, str):
        missing = [a for a in ("op", "backend", "available") if not hasattr(backend, a)]
        if missing or not callable(backend):
            raise ConfigError(f"check_kernel: {backend!r} is neither a backend name nor a kernel object "
                              f"(lacks {', '.join(missing) or '__call__'})")
        if backend.op != op:
            raise ConfigError(f"check_kernel: the kernel implements {backend.op!r}, not {op!r}")
        return backend
    from peftcore import registry

    return registry.KERNELS.get(f"{op}.{backend}")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


class _KernelKit:
    """State shared by the checks of one :func:`check_kernel` call (``lora_linear``)."""

    def __init__(self, kernel: Any, device: str, dtypes: tuple[torch.dtype, ...], shapes: tuple, seeds: tuple,
                 compile_backend: str, report: KernelReport):
        self.kernel, self.device, self.dtypes, self.shapes = kernel, device, dtypes, shapes
        self.seeds, self.compile_backend, self.report = seeds, compile_backend, report
        self.seed_tensor = bool(getattr(kernel, "seed_tensor", False))

    # -- building blocks ---------------------------------------------------------------------------
    def seed(self, value: int) -> int | torch.Tensor:
        return torch.tensor(value, dtype=torch.int64) if self.seed_tensor else value

    def inputs(self, M: int, K: int, N: int, r: int, dtype: torch.dtype, bias: bool = True,
               generator_seed: int = 0) -> dict[str, torch.Tensor | None]:
        g = torch.Generator().manual_seed(generator_seed)

        def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
            return (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(self.device, dtype)

        return {"x": rand(M, K), "weight": rand(N, K, std=K ** -0.5), "bias": rand(N) if bias else None,
                "A": rand(r, K, std=K ** -0.5), "B": rand(N, r, std=r ** -0.5)}

    def call(self, fn: Callable[..., torch.Tensor], t: dict[str, Any], p: float, seed: int | torch.Tensor,
             scale: float = _SCALE) -> torch.Tensor:
        return fn(t["x"], t["weight"], t["bias"], t["A"], t["B"], scale, p, seed)

    def reference(self, t: dict[str, Any], p: float, seed: int, scale: float = _SCALE
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The reference's output and gradients (of ``sum(y * grad_y)``) in float64."""
        from peftcore.ops.lora import reference_lora_linear

        leaves = {k: (v.detach().double().requires_grad_(True) if v is not None else None) for k, v in t.items()}
        y = self.call(reference_lora_linear, leaves, p, seed, scale)
        y.backward(self.grad_out(y.shape))
        return y.detach(), {k: (v.grad if v is not None else None) for k, v in leaves.items()}

    def grad_out(self, shape: torch.Size) -> torch.Tensor:
        g = torch.Generator().manual_seed(7)
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(self.device)

    def run(self, t: dict[str, Any], p: float, seed: int, fn: Callable[..., torch.Tensor] | None = None,
            scale: float = _SCALE) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The kernel's output and gradients, every input a leaf that requires grad."""
        leaves = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in t.items()}  # strides kept
        y = self.call(fn or self.kernel, leaves, p, self.seed(seed), scale)
        if not isinstance(y, torch.Tensor):
            raise _Failure(f"the kernel returned {type(y).__name__}, not a tensor")
        if y.requires_grad:
            y.backward(self.grad_out(y.shape).to(y.dtype))
        return y.detach(), {k: (v.grad if v is not None else None) for k, v in leaves.items()}

    def close(self, check: str, actual: torch.Tensor | None, expected: torch.Tensor | None, dtype: torch.dtype,
              what: str) -> None:
        if expected is None:
            return
        if actual is None:
            raise _Failure(f"{what}: the kernel gives no gradient (None) where the reference gives one")
        if actual.shape != expected.shape:
            raise _Failure(f"{what}: shape {tuple(actual.shape)}, the reference's is {tuple(expected.shape)}")
        if actual.dtype != dtype:
            raise _Failure(f"{what}: dtype {actual.dtype}, expected {dtype}")
        diff = _max_diff(actual, expected)
        self.report.max_abs_diff[check] = max(self.report.max_abs_diff.get(check, 0.0), diff)
        rtol, atol = TOLERANCES.get(dtype, (1e-2, 1e-2))
        atol *= max(1.0, float(expected.abs().max())) if expected.numel() else 1.0  # sums grow with the shape
        try:
            torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=rtol, atol=atol)
        except AssertionError as exc:
            detail = str(exc).splitlines()
            raise _Failure(f"{what}: max abs diff {diff:.3e} (rtol {rtol}, atol {atol}); "
                           f"{' '.join(line.strip() for line in detail[1:4])}") from None

    def compare(self, check: str, t: dict[str, Any], dtype: torch.dtype, p: float, seed: int, label: str,
                grads: bool) -> None:
        expected_y, expected_g = self.reference(t, p, seed)
        y, g = self.run(t, p, seed)
        self.close(check, y, expected_y, dtype, f"output, {label}")
        if grads:
            for name in ("x", "weight", "bias", "A", "B"):
                self.close(check, g.get(name), expected_g.get(name), dtype, f"gradient of {name}, {label}")

    def cases(self) -> Iterable[tuple[torch.dtype, tuple[int, int, int, int], bool, float]]:
        for dtype, (i, shape), p in itertools.product(self.dtypes, enumerate(self.shapes), (0.0, _DROPOUT)):
            yield dtype, shape, i % 2 == 0, p

    # -- checks --------------------------------------------------------------------------------------
    def check_forward(self) -> str:
        for dtype, (M, K, N, r), bias, p in self.cases():
            t = self.inputs(M, K, N, r, dtype, bias)
            with torch.no_grad():
                y = self.call(self.kernel, t, p, self.seed(12345))
            expected, _ = self.reference(t, p, 12345)
            self.close("forward", y, expected, dtype,
                       f"output, {dtype}, (M, K, N, r) = {(M, K, N, r)}, bias={bias}, dropout_p={p}, under torch.no_grad")
        for dtype, (M, K, N, r), bias, p in self.cases():  # the same with autograd recording
            t = self.inputs(M, K, N, r, dtype, bias)
            y, _ = self.run(t, p, 12345)
            expected, _ = self.reference(t, p, 12345)
            self.close("forward", y, expected, dtype, f"output, {dtype}, (M, K, N, r) = {(M, K, N, r)}, bias={bias}, dropout_p={p}")
        return "passed"

    def check_gradients(self) -> str:
        for dtype, (M, K, N, r), bias, p in self.cases():
            t = self.inputs(M, K, N, r, dtype, bias)
            self.compare("gradients", t, dtype, p, 12345, f"{dtype}, (M, K, N, r) = {(M, K, N, r)}, bias={bias}, dropout_p={p}", True)
        return "passed"

    def _mask_case(self, M: int, K: int, p: float, seed: int, check: str) -> None:
        """``weight = 0``, ``A = B = I``, ``scale = 1``: ``y`` is the dropped-out ``x`` itself, and with
        ``grad_y = 1`` so is ``grad_x``; their zeros must be the spec's dropped elements exactly."""
        from peftcore.ops import philox

        dtype = torch.float32
        x = (1.0 + torch.rand((M, K), generator=torch.Generator().manual_seed(3), dtype=torch.float64)).to(self.device, dtype)
        eye = torch.eye(K, dtype=dtype, device=self.device)
        t = {"x": x, "weight": torch.zeros(K, K, dtype=dtype, device=self.device), "bias": None, "A": eye, "B": eye.clone()}
        leaves = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in t.items()}
        y = self.call(self.kernel, leaves, p, self.seed(seed), scale=1.0)
        y.backward(torch.ones_like(y))
        keep = philox.keep_mask(seed, (M, K), p, "cpu")
        where = f"seed {seed}, (M, K) = {(M, K)}, dropout_p={p}"
        for what, tensor in (("forward (output zeros)", y), ("backward (grad of x zeros)", leaves["x"].grad)):
            if tensor is None:
                raise _Failure(f"{what}, {where}: no gradient of x")
            got = tensor.detach().cpu() != 0
            if not torch.equal(got, keep):
                wrong = int((got != keep).sum())
                raise _Failure(f"dropout mask, {what}, {where}: {wrong} of {keep.numel()} elements differ from "
                               "peftcore.ops.philox.keep_mask (the mask must be the spec's bit for bit)")
        expected = x.double().cpu() * keep / (1.0 - p)
        diff = _max_diff(y.detach().cpu(), expected)
        self.report.max_abs_diff[check] = max(self.report.max_abs_diff.get(check, 0.0), diff)
        if diff > 1e-5 * (1.0 / (1.0 - p)) * 2:
            raise _Failure(f"dropout scaling, {where}: kept elements are not x / (1 - p) (max abs diff {diff:.3e})")

    def check_dropout_mask(self) -> str:
        for (M, K), p in itertools.product(((5, 8), (3, 37), (64, 33), (1, 1)), (0.1, 0.5, 0.9)):
            self._mask_case(M, K, p, 20250607, "dropout_mask")
        return "passed"

    def check_seeds(self) -> str:
        for seed in self.seeds:
            self._mask_case(9, 17, 0.5, seed, "seeds")
        return f"passed: {len(self.seeds)} seeds"

    def check_noncontiguous(self) -> str:
        for dtype in self.dtypes:
            M, K, N, r = 11, 19, 13, 3
            t = self.inputs(M, K, N, r, dtype)
            t["x"] = t["x"].t().contiguous().t()  # (M, K) with strides (1, M)
            t["weight"] = t["weight"].t().contiguous().t()  # GPT-2's Conv1D passes weight.t()
            for p in (0.0, _DROPOUT):
                self.compare("noncontiguous", t, dtype, p, 777, f"{dtype}, transposed x and weight, dropout_p={p}", True)
            sliced = self.inputs(M, 2 * K, N, r, dtype)
            t["x"] = sliced["x"][:, ::2]  # every other column: strides (2K, 2)
            self.compare("noncontiguous", t, dtype, _DROPOUT, 778, f"{dtype}, x = every other column, dropout_p={_DROPOUT}", True)
        return "passed"

    def check_empty_batch(self) -> str:
        for dtype, p in itertools.product(self.dtypes, (0.0, _DROPOUT)):
            t = self.inputs(0, 5, 4, 2, dtype)
            label = f"{dtype}, M = 0, dropout_p={p}"
            try:
                y, g = self.run(t, p, 99)
            except Exception as exc:
                raise _Failure(f"{label}: the kernel raised {type(exc).__name__}: {exc}") from exc
            if tuple(y.shape) != (0, 4):
                raise _Failure(f"{label}: output shape {tuple(y.shape)}, expected (0, 4)")
            for name in ("A", "B"):
                grad = g.get(name)
                if grad is not None and (grad.shape != t[name].shape or bool(grad.abs().sum() != 0)):
                    raise _Failure(f"{label}: the gradient of {name} is not zeros of shape {tuple(t[name].shape)}")
            if g.get("x") is not None and tuple(g["x"].shape) != (0, 5):
                raise _Failure(f"{label}: the gradient of x has shape {tuple(g['x'].shape)}, expected (0, 5)")
        return "passed"

    def check_opcheck(self) -> str:
        calls = self._library_calls()
        if not calls:
            return "skipped: the kernel calls no torch.library op"
        for name, (op, args, kwargs) in calls.items():
            try:
                torch.library.opcheck(op, args, kwargs)
            except Exception as exc:
                raise _Failure(f"torch.library.opcheck({name}) failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        return f"passed: {', '.join(calls)}"

    def _library_calls(self) -> dict[str, tuple[Any, tuple, dict]]:
        """The ``torch.library`` ops (namespaces other than aten/prim) the kernel calls, with the
        first arguments each was called with, recorded below autograd."""
        from torch.utils._python_dispatch import TorchDispatchMode

        calls: dict[str, tuple[Any, tuple, dict, bool]] = {}

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func.namespace not in ("aten", "prim", "prims") and str(func) not in calls:
                    # called in backward (grad mode off): its inputs are not differentiable there
                    calls[str(func)] = (func, args, kwargs, torch.is_grad_enabled())
                return func(*args, **kwargs)

        dtype = self.dtypes[0]
        for p, grad in ((0.0, False), (_DROPOUT, False), (_DROPOUT, True)):
            t = self.inputs(9, 20, 6, 4, dtype)
            with Record():
                if grad:
                    self.run(t, p, 5)
                else:
                    with torch.no_grad():
                        self.call(self.kernel, t, p, self.seed(5))
        return {name: (op, _detached(args, grad), _detached(kwargs, grad)) for name, (op, args, kwargs, grad) in calls.items()}

    def check_compile(self) -> str:
        kernel = self.kernel

        def fn(x, weight, bias, A, B, scale, p, seed):
            return kernel(x, weight, bias, A, B, scale, p, seed)

        try:
            import torch._dynamo  # noqa: F401
            compiled = torch.compile(fn, backend=self.compile_backend, fullgraph=True)
            dtype = torch.float32 if torch.float32 in self.dtypes else self.dtypes[0]
            for (M, K, N, r), p, seed in (((7, 13, 5, 3), 0.0, 1), ((7, 13, 5, 3), _DROPOUT, 2), ((7, 13, 5, 3), _DROPOUT, -3)):
                t = self.inputs(M, K, N, r, dtype)
                expected_y, expected_g = self.run(t, p, seed)
                try:
                    y, g = self.run(t, p, seed, fn=compiled)
                except Exception as exc:
                    raise _Failure(f"torch.compile(backend={self.compile_backend!r}, fullgraph=True) of the kernel failed: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
                label = f"compiled vs eager, {dtype}, dropout_p={p}, seed {seed}"
                self.close("compile", y, expected_y.double(), dtype, f"output, {label}")
                for name in ("x", "weight", "bias", "A", "B"):
                    if expected_g.get(name) is not None:
                        self.close("compile", g.get(name), expected_g[name].double(), dtype, f"gradient of {name}, {label}")
        finally:
            torch.compiler.reset()
        return f"passed: backend={self.compile_backend}"


def _detached(value: Any, grad: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(grad and value.requires_grad and value.is_floating_point())
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v, grad) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v, grad) for k, v in value.items()}
    return value
