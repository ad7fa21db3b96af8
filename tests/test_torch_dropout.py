"""fastreg.torch's dropout family against PyTorch: Functions (gradcheck), modules, convert.

fastreg draws its own masks (from its Philox stream, seeded from PyTorch's
generator), so in training the comparisons are of the math: the mask fastreg
used (read back from the kernels' mask object, or from the zeros of y) is
applied to PyTorch's own ops, and the outputs and autograd gradients must
agree. In eval mode the modules must give PyTorch's results. Fresh random
data each run (the ``rng`` fixture).
"""

import copy
import warnings

import numpy as np
import pytest

from _assert import assert_close

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")

import fastreg  # noqa: E402
import fastreg.torch as ft  # noqa: E402
from fastreg.torch import _bridge  # noqa: E402

nn = torch.nn
F = nn.functional

TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-11, 1e-11)}
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-9, 1e-9)}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One PyTorch thread: its OpenMP pool otherwise spins against Numba's on the
    shared cores (see tests/test_torch_adapter.py); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    _bridge._warned.clear()
    yield
    _bridge._warned.clear()


def _np(t):
    return t.detach().cpu().to(torch.float64).numpy()


def _close(actual, expected, dtype, case, grad=False):
    rtol, atol = (GRAD_TOL if grad else TOL)[dtype]
    if grad and expected.numel():
        atol *= max(1.0, float(expected.detach().abs().max()))
    assert_close(_np(actual), _np(expected), rtol=rtol, atol=atol, case=case)


def _tensor(rng, shape, dtype=torch.float64, layout="contiguous"):
    """Random normal tensor stored "contiguous", "channels_last" ((N, *spatial, C)
    storage) or "strided" (every other element of the last axis)."""
    if layout == "contiguous":
        a = rng.standard_normal(shape)
    elif layout == "channels_last":
        a = rng.standard_normal((shape[0], *shape[2:], shape[1]))
        a = a.transpose(0, a.ndim - 1, *range(1, a.ndim - 1))
    else:
        a = rng.standard_normal((*shape[:-1], 2 * shape[-1]))[..., ::2]
    t = torch.from_numpy(a).to(dtype)
    assert tuple(t.shape) == tuple(shape)
    return t


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def spy(monkeypatch):
    """Records each call of the fastreg functions the adapter uses: (args, kwargs, result)."""
    calls = {}

    def wrap(name):
        original = getattr(fastreg, name)

        def spy_fn(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.setdefault(name, []).append((args, kwargs, result))
            return result
        monkeypatch.setattr(fastreg, name, spy_fn)

    for name in ("dropout", "dropout_backward", "drop_connect", "drop_connect_backward",
                 "dropout_add_layer_norm", "dropout_add_layer_norm_backward"):
        wrap(name)
    return calls


def _ptr(a):
    return a.__array_interface__["data"][0]


# --------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize("shape,layout,mask", [((5, 7), "contiguous", "bits"),
                                                ((5, 7), "contiguous", "seed"),
                                                ((2, 3, 2, 2), "channels_last", "bits"),
                                                ((3, 4), "strided", "seed"),
                                                ((33,), "contiguous", "bits")])
def test_dropout_function_gradcheck(shape, layout, mask, rng):
    x = _tensor(rng, shape, layout=layout).requires_grad_()
    seed = int(rng.integers(2**63))
    assert torch.autograd.gradcheck(lambda t: ft.DropoutFunction.apply(t, 0.3, seed, mask, False),
                                    (x,))


@pytest.mark.parametrize("x_shape,bias,per_example", [((4, 5), True, False),
                                                      ((4, 5), True, True),
                                                      ((2, 3, 5), False, True),
                                                      ((5,), True, False)])
def test_drop_connect_function_gradcheck(x_shape, bias, per_example, rng):
    x = _tensor(rng, x_shape).requires_grad_()
    w = _tensor(rng, (3, 5)).requires_grad_()
    b = _tensor(rng, (3,)).requires_grad_() if bias else None
    seed = int(rng.integers(2**63))
    assert torch.autograd.gradcheck(
        lambda *a: ft.DropConnectFunction.apply(*a, 0.4, seed, per_example), (x, w, b))


@pytest.mark.parametrize("shape,k,affine,mask,training", [((3, 8), 1, True, "seed", True),
                                                          ((3, 8), 1, True, "bits", True),
                                                          ((2, 3, 4), 2, True, "bits", True),
                                                          ((4, 6), 1, False, "seed", True),
                                                          ((3, 8), 1, True, "seed", False)])
def test_dropout_add_layer_norm_function_gradcheck(shape, k, affine, mask, training, rng):
    x, r = _tensor(rng, shape).requires_grad_(), _tensor(rng, shape).requires_grad_()
    pshape = shape[len(shape) - k:]
    w = (_tensor(rng, pshape) * 0.5 + 1).requires_grad_() if affine else None
    b = _tensor(rng, pshape).requires_grad_() if affine else None
    seed = int(rng.integers(2**63))
    assert torch.autograd.gradcheck(  # both outputs: y and the residual sum s
        lambda *a: ft.DropoutAddLayerNormFunction.apply(*a, k, 1e-5, 0.25, seed, training, mask),
        (x, r, w, b))


def test_double_backward_raises_a_clear_error(rng):
    x = _tensor(rng, (4, 6)).requires_grad_()
    y = ft.functional.dropout(x, 0.5)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


# --------------------------------------------------------------------------- Dropout

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_is_torchs_math_with_fastregs_mask(p, layout, dtype, rng):
    shape = (3, 5, 4, 7)
    ours, ref = ft.Dropout(p), nn.Dropout(p)
    x = _tensor(rng, shape, dtype, layout)  # normal: no zeros, so y == 0 marks the dropped
    g = _tensor(rng, shape, dtype, layout)
    xo = x.clone(memory_format=torch.preserve_format).requires_grad_()
    y = ours(xo)
    y.backward(g)
    keep = (y != 0).to(dtype)
    assert y.stride() == xo.stride(), "the output does not keep the input's layout"
    expected = x * keep * (1.0 / (1.0 - p))
    _close(y, expected, dtype, f"y p={p} {layout}")
    _close(xo.grad, g * keep * (1.0 / (1.0 - p)), dtype, f"dx p={p} {layout}", grad=True)
    assert abs(float(keep.mean()) - (1 - p)) < 0.08, f"kept {float(keep.mean())} for p={p}"
    ours.eval(), ref.eval()
    assert ours(x) is x and torch.equal(ours(x), ref(x)), "eval mode is not the identity"


@pytest.mark.parametrize("mask", ["bits", "seed"])
def test_dropout_keeps_one_bit_or_nothing(mask, spy, rng):
    x = _tensor(rng, (7, 45), torch.float32).requires_grad_()
    y = ft.Dropout(0.3, mask=mask)(x)
    g = _tensor(rng, x.shape, torch.float32)
    y.backward(g)
    (args, kwargs, (_, m)), = spy["dropout"]
    assert m.kind == mask and m.nbytes == (4 * ((x.numel() + 31) // 32) if mask == "bits" else 0)
    assert np.array_equal(m.to_bool(), (y != 0).numpy()), "the mask object is not y's mask"
    assert _ptr(args[0]) == x.data_ptr() and _ptr(kwargs["out"][0]) == y.data_ptr()
    (bargs, bkwargs, _), = spy["dropout_backward"]
    assert _ptr(bargs[0]) == g.data_ptr() and _ptr(bkwargs["out"]) == x.grad.data_ptr()
    assert bargs[1] is m


def test_dropout_channels_last_runs_in_memory_order_without_copies(spy, rng):
    x = _tensor(rng, (2, 6, 3, 5), torch.float32, "channels_last").requires_grad_()
    y = ft.functional.dropout(x, 0.5)
    (args, kwargs, _), = spy["dropout"]
    assert _ptr(args[0]) == x.data_ptr() and args[0].flags.c_contiguous
    assert args[0].shape == (2, 3, 5, 6), "not the (N, H, W, C) storage order"
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = _tensor(rng, x.shape, torch.float32, "channels_last")
    y.backward(g)
    (bargs, bkwargs, _), = spy["dropout_backward"]
    assert _ptr(bargs[0]) == g.data_ptr() and _ptr(bkwargs["out"]) == x.grad.data_ptr()


def test_torch_manual_seed_makes_runs_reproducible(rng):
    x = _tensor(rng, (64, 33), torch.float32)
    m = ft.Dropout(0.5)
    torch.manual_seed(123)
    a, b = m(x), m(x)
    torch.manual_seed(123)
    a2, b2 = m(x), m(x)
    assert torch.equal(a, a2) and torch.equal(b, b2), "torch.manual_seed does not fix the masks"
    assert not torch.equal(a, b), "two calls drew the same mask"
    torch.manual_seed(124)
    assert not torch.equal(m(x), a)
    # the functional form takes a generator; the same seed gives the same mask either way
    y1 = ft.functional.dropout(x, 0.5, generator=_gen(7))
    y2 = ft.functional.dropout(x, 0.5, generator=_gen(7), mask="seed")
    assert torch.equal(y1, y2)
    seed = ft.dropout.draw_seed(_gen(7))
    assert torch.equal(y1, torch.from_numpy(fastreg.dropout(x.numpy(), 0.5, rng=seed)[0]))


def test_bits_and_seed_masks_give_the_same_gradients(rng):
    x = _tensor(rng, (9, 31), torch.float32)
    g = _tensor(rng, x.shape, torch.float32)
    grads = []
    for mask in ("bits", "seed"):
        xo = x.clone().requires_grad_()
        ft.functional.dropout(xo, 0.4, mask=mask, generator=_gen(3)).backward(g)
        grads.append(xo.grad)
    assert torch.equal(*grads)


def test_inplace_writes_into_the_input_as_torch(rng):
    x = _tensor(rng, (6, 10), torch.float32)
    expected = ft.functional.dropout(x, 0.3, generator=_gen(5))
    # no autograd: the input's memory holds the result
    x1 = x.clone()
    y1 = ft.functional.dropout(x1, 0.3, inplace=True, generator=_gen(5))
    assert y1 is x1 and torch.equal(x1, expected)
    # a non-leaf under autograd: marked dirty, the graph goes through it
    leaf = x.clone().requires_grad_()
    h = leaf * 2
    version = h._version
    y2 = ft.functional.dropout(h, 0.3, inplace=True, generator=_gen(5))
    assert y2 is h and h._version > version
    y2.sum().backward()
    _close(leaf.grad, 2 * (expected != 0).float() / 0.7, torch.float32, "inplace dx", grad=True)
    # a leaf that requires grad cannot be modified in place, as with PyTorch
    with pytest.raises(RuntimeError, match="leaf Variable"):
        nn.Dropout(0.3, inplace=True)(x.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="leaf Variable"):
        ft.Dropout(0.3, inplace=True)(x.clone().requires_grad_())


def test_dropout_p_zero_one_and_no_grad(rng):
    x = _tensor(rng, (5, 6), torch.float32)
    assert ft.functional.dropout(x, 0.0) is x  # PyTorch returns the input itself
    assert torch.equal(ft.functional.dropout(x, 1.0), F.dropout(x, 1.0))
    with torch.no_grad():
        y = ft.Dropout(0.5)(x.clone().requires_grad_())
    assert y.grad_fn is None and ((y == 0) | (y == 2 * x)).all()
    with torch.inference_mode():
        assert ft.Dropout(0.5)(x).shape == x.shape


def test_dropout_module_matches_torchs_interface(rng):
    ours, ref = ft.Dropout(0.2, True), nn.Dropout(0.2, True)
    assert isinstance(ours, nn.Dropout) and repr(ours) == repr(ref)
    assert "mask='seed'" in repr(ft.Dropout(0.2, mask="seed"))
    assert ours.state_dict() == ref.state_dict() == {}
    with pytest.raises(ValueError, match="between 0 and 1"):
        ft.Dropout(1.5)
    with pytest.raises(ValueError, match="'mask' must be 'bits' or 'seed'"):
        ft.Dropout(0.5, mask="bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.FallbackWarning)
        with pytest.raises(ValueError, match="between 0 and 1"):
            ft.functional.dropout(_tensor(rng, (3,), torch.float32), -0.1)


# --------------------------------------------------------------------------- DropConnectLinear

def _drop_connect_reference(x, weight, bias, keep, p, per_example):
    scale = 1.0 / (1.0 - p)
    masked = weight * keep * scale
    if not per_example:
        return F.linear(x, masked, bias)
    y = torch.einsum("...oi,...i->...o", masked, x)
    return y if bias is None else y + bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("x_shape,bias,per_example", [((8, 13), True, False),
                                                      ((8, 13), True, True),
                                                      ((2, 5, 13), False, False),
                                                      ((2, 3, 13), True, True)])
def test_drop_connect_linear_is_torchs_math_with_fastregs_mask(x_shape, bias, per_example,
                                                               dtype, spy, rng):
    p = 0.35
    torch.manual_seed(int(rng.integers(2**31)))
    ref = nn.Linear(13, 6, bias=bias, dtype=dtype)
    ours = ft.DropConnectLinear(13, 6, bias=bias, dtype=dtype, p=p, per_example=per_example)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _tensor(rng, x_shape, dtype)
    g = _tensor(rng, x_shape[:-1] + (6,), dtype)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(xo)
    y.backward(g)
    (_, _, (_, mask)), = spy["drop_connect"]
    assert mask.nbytes == 0 and mask.per_example == per_example
    keep = torch.from_numpy(mask.to_bool()).to(dtype)
    expected = _drop_connect_reference(xr, ref.weight, ref.bias, keep, p, per_example)
    expected.backward(g)
    case = f"{x_shape} bias={bias} per_example={per_example}"
    _close(y, expected, dtype, f"{case} y")
    _close(xo.grad, xr.grad, dtype, f"{case} dx", grad=True)
    _close(ours.weight.grad, ref.weight.grad, dtype, f"{case} dweight", grad=True)
    if bias:
        _close(ours.bias.grad, ref.bias.grad, dtype, f"{case} dbias", grad=True)
    ours.eval()
    assert torch.equal(ours(x), ref(x)), "eval mode is not nn.Linear"


def test_drop_connect_linear_is_a_linear(rng):
    ours = ft.DropConnectLinear(4, 3, p=0.2, per_example=True)
    ref = nn.Linear(4, 3)
    assert isinstance(ours, nn.Linear)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert "p=0.2, per_example=True" in repr(ours)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ft.DropConnectLinear(4, 3, p=2.0)
    # p = 0 in training is nn.Linear
    zero = ft.DropConnectLinear(4, 3, p=0.0)
    zero.load_state_dict(ref.state_dict())
    x = _tensor(rng, (5, 4), torch.float32)
    assert torch.equal(zero(x), ref(x))


# --------------------------------------------------------------------------- DropoutAddLayerNorm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,normalized,affine,mask", [((4, 7, 32), 32, True, "seed"),
                                                          ((4, 7, 32), 32, True, "bits"),
                                                          ((6, 3, 10), (3, 10), True, "seed"),
                                                          ((5, 24), 24, False, "bits")])
def test_dropout_add_layer_norm_is_torchs_math_with_fastregs_mask(shape, normalized, affine,
                                                                  mask, dtype, spy, rng):
    p = 0.2
    torch.manual_seed(int(rng.integers(2**31)))
    ref = nn.LayerNorm(normalized, elementwise_affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(_tensor(rng, ref.weight.shape, dtype) * 0.5 + 1)
            ref.bias.copy_(_tensor(rng, ref.bias.shape, dtype))
    ours = ft.DropoutAddLayerNorm(normalized, elementwise_affine=affine, dtype=dtype, p=p,
                                  prenorm=True, mask=mask)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, r = _tensor(rng, shape, dtype), _tensor(rng, shape, dtype)
    gy, gs = _tensor(rng, shape, dtype), _tensor(rng, shape, dtype)
    xo, ro = x.clone().requires_grad_(), r.clone().requires_grad_()
    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, s = ours(xo, ro)
    torch.autograd.backward((y, s), (gy, gs))  # the residual stream carries a gradient too
    (_, _, result), = spy["dropout_add_layer_norm"]
    m = result[4]
    assert m.kind == mask and m.nbytes == (4 * ((x.numel() + 31) // 32) if mask == "bits" else 0)
    keep = torch.from_numpy(m.to_bool()).to(dtype)
    s_ref = rr + xr * keep * (1.0 / (1.0 - p))
    y_ref = ref(s_ref)
    torch.autograd.backward((y_ref, s_ref), (gy, gs))
    case = f"{shape} {normalized} affine={affine} mask={mask}"
    _close(s, s_ref, dtype, f"{case} s")
    _close(y, y_ref, dtype, f"{case} y")
    _close(xo.grad, xr.grad, dtype, f"{case} dx", grad=True)
    _close(ro.grad, rr.grad, dtype, f"{case} dresidual", grad=True)
    for (name, pr), po in zip(ref.named_parameters(), ours.parameters()):
        _close(po.grad, pr.grad, dtype, f"{case} d{name}", grad=True)
    ours.eval()
    with torch.no_grad():
        y_eval, s_eval = ours(x, r)
        assert torch.equal(s_eval, x + r)
        _close(y_eval, ref(x + r), dtype, f"{case} eval y")


def test_dropout_add_layer_norm_post_norm_and_no_residual(rng):
    ours = ft.DropoutAddLayerNorm(16, p=0.1)
    ref = nn.LayerNorm(16)
    assert isinstance(ours, nn.LayerNorm) and list(ours.state_dict()) == ["weight", "bias"]
    assert "p=0.1, prenorm=False" in repr(ours)
    x, r = _tensor(rng, (3, 16), torch.float32), _tensor(rng, (3, 16), torch.float32)
    ours.eval()
    y = ours(x, r)  # post-norm: y only
    assert isinstance(y, torch.Tensor)
    _close(y, ref(x + r), torch.float32, "post-norm eval")
    _close(ours(x), ref(x), torch.float32, "no residual")
    ours.train()
    xo = x.clone().requires_grad_()
    y = ours(xo)  # no residual, only y used: the unused s gets no gradient
    y.sum().backward()
    assert xo.grad is not None and torch.isfinite(xo.grad).all()
    # the functional form returns (y, s) and agrees with the module for the same seed
    y1, s1 = ft.functional.dropout_add_layer_norm(x, r, (16,), ours.weight, ours.bias, 0.3,
                                                  generator=_gen(11))
    keep = (s1 - r) != 0
    _close(s1, r + x * keep / 0.7, torch.float32, "functional s")


def test_drop_connect_and_dropout_add_layer_norm_pass_views(spy, rng):
    x = _tensor(rng, (4, 6, 16), torch.float32).requires_grad_()
    r = _tensor(rng, (4, 6, 16), torch.float32).requires_grad_()
    layer = ft.DropConnectLinear(16, 8, p=0.3)
    y = layer(x)
    (args, kwargs, _), = spy["drop_connect"]
    assert _ptr(args[0]) == x.data_ptr() and _ptr(args[1]) == layer.weight.data_ptr()
    assert _ptr(kwargs["out"]) == y.data_ptr()
    g = _tensor(rng, y.shape, torch.float32)
    y.backward(g)
    (args, kwargs, _), = spy["drop_connect_backward"]
    assert _ptr(args[0]) == g.data_ptr() and _ptr(kwargs["out"][0]) == x.grad.data_ptr()
    assert _ptr(kwargs["out"][1]) == layer.weight.grad.data_ptr()
    norm = ft.DropoutAddLayerNorm(16, p=0.2, prenorm=True, mask="bits")
    y, s = norm(x, r)
    (args, kwargs, _), = spy["dropout_add_layer_norm"]
    assert _ptr(args[0]) == x.data_ptr() and _ptr(args[1]) == r.data_ptr()
    assert _ptr(kwargs["out"][0]) == y.data_ptr() and _ptr(kwargs["out"][1]) == s.data_ptr()
    x.grad = None
    gy = _tensor(rng, y.shape, torch.float32)
    torch.autograd.backward((y, s), (gy, gy))
    (args, kwargs, _), = spy["dropout_add_layer_norm_backward"]
    assert _ptr(args[0]) == gy.data_ptr() and _ptr(args[1]) == s.data_ptr()
    assert _ptr(kwargs["out"][0]) == x.grad.data_ptr()
    assert _ptr(kwargs["out"][1]) == r.grad.data_ptr()


# --------------------------------------------------------------------------- convert

class _Block(nn.Module):
    """A post-norm transformer block with dropout after attention and the MLP."""

    def __init__(self, d=32, heads=4, p=0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.drop1 = nn.Dropout(p)
        self.norm1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(p),
                                 nn.Linear(4 * d, d))
        self.drop2 = nn.Dropout(p)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x):
        x = self.norm1(x + self.drop1(self.attn(x, x, x, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.mlp(x)))


class _Replay(nn.Module):
    """Applies recorded keep masks in call order: PyTorch's math with fastreg's masks."""

    def __init__(self, p, masks):
        super().__init__()
        self.p, self.masks = p, masks

    def forward(self, x):
        return x * self.masks.pop(0).to(x.dtype) / (1 - self.p) if self.training else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_convert_transformer_block_with_dropout(dtype, spy, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    ref = _Block().to(dtype)
    ours = ft.convert(copy.deepcopy(ref))
    for name in ("drop1", "drop2"):
        assert type(getattr(ours, name)) is ft.Dropout
    assert type(ours.mlp[2]) is ft.Dropout and type(ours.norm1) is ft.LayerNorm
    x = _tensor(rng, (3, 7, 32), dtype)
    g = _tensor(rng, (3, 7, 32), dtype)
    perms = []  # the attention's output is a transposed view: its mask is in memory order
    for m in (ours.drop1, ours.mlp[2], ours.drop2):
        m.register_forward_hook(lambda mod, inputs, out: perms.append(_bridge.dense(inputs[0])[1]))
    y = ours(x)
    y.backward(g)
    masks = [_bridge.unpermuted(torch.from_numpy(r[1].to_bool()), perm)
             for (_, _, r), perm in zip(spy["dropout"], perms)]
    assert len(masks) == 3 and perms[0] is not None
    for name in ("drop1", "drop2"):
        setattr(ref, name, _Replay(0.1, masks))
    ref.mlp[2] = _Replay(0.1, masks)
    y_ref = ref(x)
    y_ref.backward(g)
    tol = dict(out=(2e-4, 2e-4), grad=(1e-3, 1e-3)) if dtype == torch.float32 else \
        dict(out=(1e-9, 1e-9), grad=(1e-8, 1e-8))
    assert_close(_np(y), _np(y_ref), rtol=tol["out"][0], atol=tol["out"][1], case="train y")
    for (name, pr), po in zip(ref.named_parameters(), ours.parameters()):
        scale = max(1.0, float(pr.grad.abs().max()))
        assert_close(_np(po.grad), _np(pr.grad), rtol=tol["grad"][0],
                     atol=tol["grad"][1] * scale, case=f"grad {name}")
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert_close(_np(ours(x)), _np(ref(x)), rtol=tol["out"][0], atol=tol["out"][1],
                     case="eval y")


def test_convert_swaps_dropout_only_for_the_exact_class():
    class MyDropout(nn.Dropout):
        pass

    model = nn.Sequential(nn.Dropout(0.2), MyDropout(0.3), nn.Dropout1d(0.1), nn.AlphaDropout())
    ft.convert(model)
    assert [type(m) for m in model] == [ft.Dropout, MyDropout, nn.Dropout1d, nn.AlphaDropout]
    assert model[0].p == 0.2 and repr(model[0]) == repr(nn.Dropout(0.2))


# --------------------------------------------------------------------------- fallback

def _fallbacks(record):
    return [w for w in record if issubclass(w.category, ft.FallbackWarning)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu_falls_back_once_and_matches_torch(dtype, rng):
    x = _tensor(rng, (6, 16), dtype)
    r = _tensor(rng, (6, 16), dtype)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.manual_seed(5)
            got = ft.Dropout(0.3)(x)
            torch.manual_seed(5)
            assert torch.equal(got, nn.Dropout(0.3)(x)), "not PyTorch's dropout"
            norm = ft.DropoutAddLayerNorm(16, dtype=dtype, p=0.3)
            ref = nn.LayerNorm(16, dtype=dtype)
            torch.manual_seed(6)
            got = norm(x, r)
            torch.manual_seed(6)
            assert torch.equal(got, ref(r + F.dropout(x, 0.3))), "not PyTorch's composite"
            dc = ft.DropConnectLinear(16, 4, dtype=dtype, p=0.3)
            assert dc(x).shape == (6, 4)
            dc.eval()
            assert torch.equal(dc(x), F.linear(x, dc.weight, dc.bias))
    messages = [str(w.message) for w in _fallbacks(record)]
    assert len(messages) == 3, messages  # once per layer type
    assert all(str(dtype)[6:] in m for m in messages)
    assert {m.split()[1] for m in messages} == {"Dropout", "DropoutAddLayerNorm",
                                                "DropConnectLinear"}


def test_dropout_runs_fastreg_under_autocast(spy, rng):
    """Autocast leaves dropout in its input's dtype, so fastreg runs it there."""
    x = _tensor(rng, (4, 8), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.FallbackWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ft.Dropout(0.5)(x)
    assert y.dtype == torch.float32 and len(spy["dropout"]) == 1


def test_other_devices_fall_back(rng):
    with pytest.warns(ft.FallbackWarning, match="device type 'meta'"):
        y = ft.Dropout(0.5)(torch.empty(3, 6, device="meta"))
    assert y.device.type == "meta"


def test_missing_cuda_kernels_are_named(monkeypatch):
    """On CUDA, a function the CUDA backend lists as unsupported falls back by name."""
    _bridge._cuda_lacks.cache_clear()
    reason = _bridge._cuda_lacks("dropout", "dropout")
    if "failed to import" in (reason or ""):
        pytest.skip(f"fastreg.cuda does not import here: {reason}")
    import fastreg.cuda.dropout as cuda_dropout
    if "dropout" in cuda_dropout.UNSUPPORTED:
        assert reason == "fastreg's CUDA backend has no dropout kernel in this version"
    else:
        assert reason is None
    assert _bridge._cuda_lacks("norm", "layer_norm") is None


# --------------------------------------------------------------------------- CUDA
# Where PyTorch sees a GPU with CuPy and fastreg's CUDA backend (bench/gpu_check.py
# runs this file there): fastreg's kernels where the backend has them, PyTorch's
# ops (a FallbackWarning naming the missing kernel) where not; the math is the
# same either way.

def _cuda_missing():
    if not torch.cuda.is_available():
        return "no CUDA device (this PyTorch build or machine has none)"
    cupy, reason = _bridge._cuda_support()
    return None if cupy is not None else reason


@pytest.mark.skipif(_cuda_missing() is not None, reason=f"CUDA path: {_cuda_missing()}")
def test_dropout_family_on_cuda(rng):
    x = _tensor(rng, (6, 5, 32), torch.float32).cuda()
    r = _tensor(rng, (6, 5, 32), torch.float32).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.FallbackWarning)
        xo = x.clone().requires_grad_()
        y = ft.Dropout(0.3)(xo)
        y.backward(torch.ones_like(y))
        keep = (y != 0).float()
        _close(y, x * keep / 0.7, torch.float32, "cuda dropout y")
        _close(xo.grad, keep / 0.7, torch.float32, "cuda dropout dx", grad=True)
        norm = ft.DropoutAddLayerNorm(32, p=0.2, prenorm=True).cuda()
        y, s = norm(x, r)
        keep = ((s - r) != 0).float()
        _close(s, r + x * keep / 0.8, torch.float32, "cuda dropout+add s")
        norm.eval()
        _close(norm(x, r)[0], F.layer_norm(x + r, (32,), norm.weight, norm.bias),
               torch.float32, "cuda dropout+add+LN eval")
