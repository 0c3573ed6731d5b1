"""The bottleneck op: the reference against a hand computation, the C++ backend against the reference.

Every backend is compared with ``reference_bottleneck`` on the forward pass and on the gradient of
every input, over odd shapes, every activation, with and without biases and residual, in float32
(tight) and bfloat16 (loose). The Triton backend has its own file (it needs the interpreter).
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import peftcore
from peftcore.ops import bottleneck as bn
from peftcore.ops import bottleneck_cpp

ACTIVATIONS = list(bn.ACTIVATIONS)

#: dtype -> (rtol, atol relative to the largest magnitude of the expected tensor, at least 1).
#: bfloat16: measured worst case 1.0e-2 over the shapes below (5 seeds), from rounding h, act(h)
#: and the output at different points than the reference does.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}

#: (leading dims of x, K, r, N, residual): odd sizes, a single row, an empty batch, r > K.
SHAPES = [
    ((6, 42), 123, 17, 123, False),
    ((5,), 31, 64, 47, True),
    ((2, 3, 7), 64, 8, 64, True),
    ((1,), 1, 1, 1, False),
    ((0,), 16, 4, 16, False),
    ((9,), 5, 13, 5, False),
]

needs_cpp = pytest.mark.skipif(not bottleneck_cpp.CPP.available()[0], reason=bottleneck_cpp.CPP.available()[1])


def assert_close(got, want, dtype, what=""):
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, want.detach().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def make_args(lead, K, r, N, residual, dtype=torch.float32, bias=True, seed=0):
    """Inputs scaled like a trained layer's (weights ~ 1/sqrt(fan_in)), so outputs are O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(shape, generator=g) * std).to(dtype).requires_grad_()

    x = rand(*lead, K)
    W_down, W_up = rand(r, K, std=K ** -0.5), rand(N, r, std=r ** -0.5)
    b_down, b_up = (rand(r, std=0.1), rand(N, std=0.1)) if bias else (None, None)
    res = rand(*lead, N) if residual else None
    return x, W_down, b_down, W_up, b_up, res


def run(fn, args, scale, activation, grad_seed=1):
    """Output and the gradients of every tensor argument that requires grad."""
    x, W_down, b_down, W_up, b_up, res = args
    y = fn(x, W_down, b_down, W_up, b_up, scale, activation, res)
    inputs = [t for t in args if t is not None]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y.dtype)
    return y, torch.autograd.grad(y, inputs, g, allow_unused=False)


# -- the reference ----------------------------------------------------------------------------------
def test_reference_matches_hand_computation():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0]])  # (M=2, K=2)
    W_down = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]])  # (r=3, K)
    b_down = torch.tensor([0.0, -1.0, 0.5])
    W_up = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])  # (N=2, r)
    b_up = torch.tensor([0.25, 0.0])
    # h = [[-1, 1, 2.5], [0.5, 0, 0.5]]; relu -> [[0, 1, 2.5], [0.5, 0, 0.5]]
    # up: [[5.25, -1.5], [1.75, -0.5]]; y = x + 0.5 * up
    expected = torch.tensor([[1.0 + 2.625, -2.0 - 0.75], [0.5 + 0.875, 0.0 - 0.25]])
    got = bn.reference_bottleneck(x, W_down, b_down, W_up, b_up, 0.5, "relu")
    torch.testing.assert_close(got, expected)
    residual = torch.ones(2, 2)
    torch.testing.assert_close(
        bn.reference_bottleneck(x, W_down, b_down, W_up, b_up, 0.5, "relu", residual), expected - x + 1.0
    )


@pytest.mark.parametrize("activation, fn", [
    ("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))),
    ("gelu_tanh", lambda h: 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h ** 3)))),
    ("silu", lambda h: h * torch.sigmoid(h)),
    ("relu", lambda h: h.clamp_min(0)),
])
def test_reference_activations(activation, fn):
    h = torch.linspace(-4, 4, 41, dtype=torch.float64)
    torch.testing.assert_close(bn.ACTIVATIONS[activation](h), fn(h))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_gradcheck_float64(activation):
    args = make_args((3, 2), 5, 3, 4, True, dtype=torch.float64)
    fn = lambda x, Wd, bd, Wu, bu, r: bn.reference_bottleneck(x, Wd, bd, Wu, bu, 0.7, activation, r)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_zero_up_projection_is_exactly_the_residual():
    x, W_down, b_down, W_up, b_up, res = make_args((4, 3), 8, 4, 8, False)
    with torch.no_grad():
        W_up.zero_()
        b_up.zero_()
    for backend in ("reference", "cpp") if bottleneck_cpp.CPP.available()[0] else ("reference",):
        y = bn.bottleneck(x, W_down, b_down, W_up, b_up, 3.0, "gelu", backend=backend)
        assert torch.equal(y, x), backend


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "activation": "tanh"}, "activation must be one of"),
    (lambda a: {**a, "x": a["x"][..., :-1]}, "x has 7 features"),
    (lambda a: {**a, "W_up": a["W_up"][:, :-1]}, "W_up .* must have 3 columns"),
    (lambda a: {**a, "b_up": a["b_up"][:-1]}, r"b_up has shape \(7,\), expected \(8,\)"),
    (lambda a: {**a, "W_up": a["W_up"][:5], "b_up": None}, "without a residual"),
    (lambda a: {**a, "residual": torch.zeros(2, 8)}, "residual has shape"),
    (lambda a: {**a, "W_down": a["W_down"].double()}, "share one dtype"),
])
def test_bad_arguments_raise_config_error(change, match):
    x, W_down, b_down, W_up, b_up, _ = make_args((2, 3), 8, 3, 8, False)
    args = dict(x=x, W_down=W_down, b_down=b_down, W_up=W_up, b_up=b_up, scale=1.0, activation="gelu", residual=None)
    with pytest.raises(peftcore.ConfigError, match=match):
        bn.bottleneck(**change(args))


def test_dispatch_by_name_and_unknown_backend():
    args = make_args((2,), 4, 2, 4, False)
    torch.testing.assert_close(
        bn.bottleneck(*args[:5], 1.0, "silu", backend="reference"), bn.reference_bottleneck(*args[:5], 1.0, "silu")
    )
    with pytest.raises(peftcore.BackendUnavailableError, match="no backend 'nope' for bottleneck"):
        bn.bottleneck(*args[:5], 1.0, "silu", backend="nope")


def test_backends_lists_every_bottleneck_backend():
    table = {s.backend: s for s in peftcore.backends("bottleneck")}
    assert {"reference", "cpp", "triton"} <= set(table)
    assert table["reference"].available
    if not torch.cuda.is_available():
        assert not table["triton"].available and "CUDA" in table["triton"].reason


# -- the C++ backend -----------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-r{s[2]}-N{s[3]}{'-res' if s[4] else ''}")
def test_cpp_matches_reference_forward_and_every_gradient(shape, activation, dtype):
    args = make_args(*shape, dtype=dtype)
    y_ref, grads_ref = run(bn.reference_bottleneck, args, 0.8, activation)
    y, grads = run(bottleneck_cpp.cpp_bottleneck, args, 0.8, activation)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "output")
    names = [n for n, t in zip(("x", "W_down", "b_down", "W_up", "b_up", "residual"), args) if t is not None]
    for name, got, want in zip(names, grads, grads_ref):
        assert_close(got, want, dtype, f"grad {name}")


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_without_biases_and_with_frozen_inputs(bias):
    x, W_down, b_down, W_up, b_up, _ = make_args((3, 5), 12, 6, 12, False, bias=bias)
    x = x.detach()  # a frozen input (as in an adapter whose input needs no gradient)
    params = [p for p in (W_down, b_down, W_up, b_up) if p is not None]
    results = []
    for fn in (bn.reference_bottleneck, bottleneck_cpp.cpp_bottleneck):
        y = fn(x, W_down, b_down, W_up, b_up, 1.5, "gelu_tanh")
        results.append((y, torch.autograd.grad(y.square().sum(), params)))
    (y_ref, g_ref), (y, g) = results
    assert_close(y, y_ref, torch.float32, "output")
    for got, want in zip(g, g_ref):
        assert_close(got, want, torch.float32, "grad")


@needs_cpp
def test_cpp_non_contiguous_inputs():
    x, W_down, b_down, W_up, b_up, res = make_args((4, 10), 9, 3, 6, True)
    x_t = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # (4, 10, 9), strided
    W_down_t = W_down.detach().t().contiguous().t().requires_grad_()
    args = (x_t, W_down_t, b_down, W_up, b_up, res)
    assert not x_t.is_contiguous() and not W_down_t.is_contiguous()
    y_ref, g_ref = run(bn.reference_bottleneck, args, 0.5, "gelu")
    y, g = run(bottleneck_cpp.cpp_bottleneck, args, 0.5, "gelu")
    assert_close(y, y_ref, torch.float32, "output")
    for got, want in zip(g, g_ref):
        assert_close(got, want, torch.float32, "grad")


@needs_cpp
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual, bias", [(True, True), (False, False)])
def test_cpp_gradcheck_float64(activation, residual, bias):
    args = tuple(t for t in make_args((3, 2), 5, 3, 5, residual, dtype=torch.float64, bias=bias))
    present = [t for t in args if t is not None]

    def fn(*tensors):
        it = iter(tensors)
        full = [next(it) if t is not None else None for t in args]
        x, Wd, bd, Wu, bu, r = full
        return bottleneck_cpp.cpp_bottleneck(x, Wd, bd, Wu, bu, 0.7, activation, r)

    assert torch.autograd.gradcheck(fn, tuple(present))


@needs_cpp
@pytest.mark.parametrize("residual, bias", [(True, True), (False, True), (True, False)])
def test_cpp_opcheck(residual, bias):
    x, W_down, b_down, W_up, b_up, res = make_args((7,), 6, 3, 4 if residual else 6, residual, bias=bias)
    args = (x, W_down, b_down, W_up, b_up, 0.5, "gelu", res)
    torch.library.opcheck(torch.ops.peftcore.bottleneck.default, args)


@needs_cpp
@pytest.mark.parametrize("residual, bias, frozen_x", [(True, True, False), (False, False, False), (True, False, True)])
def test_cpp_eager_and_registered_autograd_agree(residual, bias, frozen_x):
    """Eager training runs the C++ autograd Function (bottleneck_autograd); torch.compile traces the
    op's registered Python formula. Both give the same gradients, whichever inputs need them."""
    x, W_down, b_down, W_up, b_up, res = make_args((3, 4), 9, 5, 9, residual, dtype=torch.float64, bias=bias)
    if frozen_x:
        x = x.detach()
    y = bottleneck_cpp.cpp_bottleneck(x, W_down, b_down, W_up, b_up, 0.8, "silu", res)
    assert "BottleneckFunction" in y.grad_fn.next_functions[0][0].name()  # under the reshape to (3, 4, N)
    flat_res = None if res is None else res.reshape(-1, 9)
    y_reg, _ = torch.ops.peftcore.bottleneck(x.reshape(-1, 9), W_down, b_down, W_up, b_up, 0.8, "silu", flat_res)
    torch.testing.assert_close(y.reshape(-1, 9), y_reg, rtol=0, atol=0)
    leaves = [t for t in (x, W_down, b_down, W_up, b_up, res) if t is not None and t.requires_grad]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(y_reg, leaves, g.reshape(-1, 9))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@needs_cpp
def test_cpp_second_differentiation_is_refused_clearly():
    x, W_down, b_down, W_up, b_up, _ = make_args((4,), 6, 3, 6, False)
    y = bottleneck_cpp.cpp_bottleneck(x, W_down, b_down, W_up, b_up, 1.0, "gelu")
    grad_x, = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="bottleneck is differentiable once.*backend='reference'"):
        grad_x.sum().backward()


@needs_cpp
def test_cpp_op_rejects_bad_shapes_with_a_clear_message():
    x, W_down, b_down, W_up, b_up, _ = make_args((4,), 6, 3, 6, False)
    with pytest.raises(RuntimeError, match="W_down .* does not fit x"):
        torch.ops.peftcore.bottleneck(x.detach(), W_down[:, :5].detach(), None, W_up.detach(), None, 1.0, "gelu", None)
    with pytest.raises(RuntimeError, match="unknown activation 'tanh'"):
        torch.ops.peftcore.bottleneck(x.detach(), W_down.detach(), None, W_up.detach(), None, 1.0, "tanh", None)


@needs_cpp
def test_cpp_saves_only_inputs_and_the_pre_activation():
    """Memory-lean backward: autograd keeps x, the weights and h (M, r): nothing of shape (M, N)."""
    M, K, r, N = 12, 10, 3, 7
    x, W_down, b_down, W_up, b_up, res = make_args((M,), K, r, N, True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bottleneck_cpp.cpp_bottleneck(x, W_down, b_down, W_up, b_up, 1.0, "gelu", res)
    assert sorted(saved) == sorted([(M, K), (r, K), (N, r), (M, r)])


@needs_cpp
def test_cpp_under_torch_compile_fullgraph():
    args = make_args((2, 5), 8, 4, 8, False)
    fn = lambda *a: bottleneck_cpp.cpp_bottleneck(*a[:5], 0.5, "silu", a[5])  # noqa: E731
    y_ref, g_ref = run(bn.reference_bottleneck, args, 0.5, "silu")
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x, Wd, bd, Wu, bu, _ = args
    y = compiled(x, Wd, bd, Wu, bu, None)
    grads = torch.autograd.grad(y, [x, Wd, bd, Wu, bu], torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    assert_close(y, y_ref, torch.float32, "output")
    for got, want in zip(grads, g_ref):
        assert_close(got, want, torch.float32, "grad")


@needs_cpp
def test_auto_picks_cpp_on_cpu():
    from peftcore.ops import dispatch

    assert dispatch.select("bottleneck", "cpu", "auto").backend == "cpp"


@needs_cpp
@settings(max_examples=25, deadline=None)
@given(
    M=st.integers(0, 20), K=st.integers(1, 40), r=st.integers(1, 24), N=st.integers(1, 40),
    residual=st.booleans(), bias=st.booleans(), activation=st.sampled_from(ACTIVATIONS),
    scale=st.floats(-2.0, 2.0, allow_nan=False),
)
def test_cpp_matches_reference_on_random_shapes(M, K, r, N, residual, bias, activation, scale):
    if not residual:
        N = K
    args = make_args((M,), K, r, N, residual, bias=bias)
    y_ref, g_ref = run(bn.reference_bottleneck, args, scale, activation)
    y, g = run(bottleneck_cpp.cpp_bottleneck, args, scale, activation)
    assert_close(y, y_ref, torch.float32, "output")
    for got, want in zip(g, g_ref):
        assert_close(got, want, torch.float32, "grad")
