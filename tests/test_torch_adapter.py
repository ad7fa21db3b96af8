"""fastreg.torch against PyTorch: Functions (gradcheck), modules, convert, fallback, zero copy.

Fresh random data each run (the ``rng`` fixture). Each fastreg module is run
beside its PyTorch twin, loaded from the same state_dict, for several training
steps and in eval mode: outputs, input/weight/bias gradients, running
statistics and num_batches_tracked must agree within float32/float64
tolerances.
"""

import copy
import subprocess
import sys
import warnings

import pytest

from _assert import assert_close

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")

import fastreg  # noqa: E402
import fastreg.torch as ft  # noqa: E402
from fastreg.torch import _bridge  # noqa: E402

nn = torch.nn

# (rtol, atol) of fastreg against PyTorch: two float32 implementations with
# different accumulation orders (fastreg accumulates in float64).
TOL = {torch.float32: {"out": (1e-5, 2e-5), "grad": (1e-4, 1e-4)},
       torch.float64: {"out": (1e-10, 1e-10), "grad": (1e-9, 1e-9)}}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """PyTorch's OpenMP threads spin after each of its parallel regions and take
    the cores from the Numba kernels that run next (a separate OpenMP runtime):
    on a loaded 2-core machine the tests ran 3-4x longer. The comparisons do not
    depend on PyTorch's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    """Each test sees the one-time fallback warnings afresh."""
    _bridge._warned.clear()
    yield
    _bridge._warned.clear()


def _np(t):
    return t.detach().cpu().to(torch.float64).numpy()


def _close(actual, expected, kind, dtype, case, scale=False):
    rtol, atol = TOL[dtype][kind]
    if scale:  # sums over many elements: scale atol with the magnitude
        atol *= max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    assert_close(_np(actual), _np(expected), rtol=rtol, atol=atol, case=case)


def _tensor(rng, shape, dtype=torch.float64, layout="contiguous", scale=1.0, offset=0.0):
    """A tensor of ``shape`` stored as asked: "contiguous", "channels_last" ((N, *spatial, C)
    storage behind the (N, C, *spatial) shape, PyTorch's channels_last for 4-D/5-D) or
    "strided" (every other element of the last axis)."""
    if layout == "contiguous":
        a = rng.standard_normal(shape)
    elif layout == "channels_last":
        a = rng.standard_normal((shape[0], *shape[2:], shape[1]))
        a = a.transpose(0, a.ndim - 1, *range(1, a.ndim - 1))
    elif layout == "strided":
        a = rng.standard_normal((*shape[:-1], 2 * shape[-1]))[..., ::2]
    else:
        raise ValueError(layout)
    t = torch.from_numpy(a * scale + offset).to(dtype)  # .to keeps the strides
    assert tuple(t.shape) == tuple(shape)
    return t


def _is_channels_last(t):
    return t.dim() >= 3 and t.permute(0, *range(2, t.dim()), 1).is_contiguous()


# --------------------------------------------------------------------------- import

def test_import_fastreg_does_not_import_torch():
    code = "import sys, fastreg; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fastreg_torch_reexports_the_norm_family():
    for name in ft.__all__:
        assert hasattr(ft, name), name
    for name in ("layer_norm", "rms_norm", "batch_norm", "group_norm", "instance_norm"):
        assert callable(getattr(ft.functional, name))


# --------------------------------------------------------------------------- gradcheck

def _params(rng, C, affine, dtype=torch.float64):
    if not affine:
        return None, None
    w = _tensor(rng, (C,), dtype, scale=0.5, offset=1.0).requires_grad_()
    b = _tensor(rng, (C,), dtype).requires_grad_()
    return w, b


def _running(rng, C):
    return _tensor(rng, (C,)), torch.from_numpy(rng.uniform(0.5, 2.0, C))


LAYER_VARIANTS = [((3, 5), 1, True, True), ((2, 3, 4), 2, True, True), ((4, 6), 1, False, False),
                  ((3, 5), 1, True, False)]


@pytest.mark.parametrize("shape,k,weight,bias", LAYER_VARIANTS)
def test_layer_norm_function_gradcheck(shape, k, weight, bias, rng):
    x = _tensor(rng, shape).requires_grad_()
    pshape = shape[len(shape) - k:]
    w = _tensor(rng, pshape, offset=1.0).requires_grad_() if weight else None
    b = _tensor(rng, pshape).requires_grad_() if bias else None
    assert torch.autograd.gradcheck(lambda *a: ft.LayerNormFunction.apply(*a, k, 1e-5),
                                    (x, w, b))


@pytest.mark.parametrize("shape,k,weight", [((3, 5), 1, True), ((2, 3, 4), 2, True),
                                            ((4, 6), 1, False)])
def test_rms_norm_function_gradcheck(shape, k, weight, rng):
    x = _tensor(rng, shape).requires_grad_()
    w = _tensor(rng, shape[len(shape) - k:], offset=1.0).requires_grad_() if weight else None
    assert torch.autograd.gradcheck(lambda *a: ft.RMSNormFunction.apply(*a, k, 1e-6), (x, w))


# Small shapes (gradcheck perturbs every element): still odd sizes, every layout.
BN_VARIANTS = [
    # shape, layout, training, running stats, affine, activation
    ((6, 3), "contiguous", True, True, True, None),
    ((3, 2, 4), "contiguous", True, False, True, None),
    ((2, 2, 2, 3), "contiguous", True, True, True, "relu"),
    ((2, 2, 2, 3), "channels_last", True, True, True, None),
    ((2, 3, 2, 2), "channels_last", True, False, False, "relu"),
    ((2, 2, 2, 1, 3), "channels_last", True, True, True, None),
    ((3, 2, 4), "channels_last", True, True, True, None),
    ((2, 2, 2, 3), "contiguous", False, True, True, None),
    ((2, 2, 2, 3), "channels_last", False, True, True, "relu"),
    ((5, 3), "strided", True, True, True, None),
]


@pytest.mark.parametrize("shape,layout,training,running,affine,activation", BN_VARIANTS)
def test_batch_norm_function_gradcheck(shape, layout, training, running, affine, activation,
                                       rng):
    x = _tensor(rng, shape, layout=layout).requires_grad_()
    w, b = _params(rng, shape[1], affine)
    rm, rv = _running(rng, shape[1]) if running else (None, None)
    assert torch.autograd.gradcheck(
        lambda *a: ft.BatchNormFunction.apply(*a, rm, rv, training, 0.1, 1e-5, activation),
        (x, w, b))


GN_VARIANTS = [((2, 4, 3), 2, "contiguous", True), ((2, 4, 2, 2), 2, "channels_last", True),
               ((2, 2, 2, 1, 3), 1, "channels_last", False), ((3, 6), 6, "contiguous", True),
               ((2, 4, 3), 4, "channels_last", True)]


@pytest.mark.parametrize("shape,G,layout,affine", GN_VARIANTS)
def test_group_norm_function_gradcheck(shape, G, layout, affine, rng):
    x = _tensor(rng, shape, layout=layout).requires_grad_()
    w, b = _params(rng, shape[1], affine)
    assert torch.autograd.gradcheck(
        lambda xx, ww, bb: ft.GroupNormFunction.apply(xx, G, ww, bb, 1e-5), (x, w, b))


IN_VARIANTS = [((2, 2, 5), "contiguous", True, False, False),
               ((2, 2, 2, 3), "channels_last", True, True, True),
               ((2, 3, 2, 3), "contiguous", False, True, True),
               ((2, 2, 2, 1, 3), "channels_last", False, True, True)]


@pytest.mark.parametrize("shape,layout,use_input_stats,running,affine", IN_VARIANTS)
def test_instance_norm_function_gradcheck(shape, layout, use_input_stats, running, affine, rng):
    x = _tensor(rng, shape, layout=layout).requires_grad_()
    w, b = _params(rng, shape[1], affine)
    rm, rv = _running(rng, shape[1]) if running else (None, None)
    assert torch.autograd.gradcheck(
        lambda *a: ft.InstanceNormFunction.apply(*a, rm, rv, use_input_stats, 0.1, 1e-5),
        (x, w, b))


def test_double_backward_raises_a_clear_error(rng):
    x = _tensor(rng, (4, 6)).requires_grad_()
    y = ft.functional.layer_norm(x, (6,))
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


# --------------------------------------------------------------------------- modules

MODULE_SPECS = [
    # torch class, constructor kwargs, input shape, layouts to run
    ("LayerNorm", dict(normalized_shape=(16,)), (4, 7, 16), ("contiguous", "strided")),
    ("LayerNorm", dict(normalized_shape=(5, 6), elementwise_affine=False), (3, 5, 6),
     ("contiguous",)),
    ("LayerNorm", dict(normalized_shape=12, bias=False, eps=1e-6), (6, 12), ("contiguous",)),
    ("RMSNorm", dict(normalized_shape=(16,)), (4, 7, 16), ("contiguous", "strided")),
    ("RMSNorm", dict(normalized_shape=(3, 8), eps=1e-5, elementwise_affine=False), (2, 3, 8),
     ("contiguous",)),
    ("BatchNorm1d", dict(num_features=6), (8, 6), ("contiguous",)),
    ("BatchNorm1d", dict(num_features=5, momentum=None), (4, 5, 7),
     ("contiguous", "channels_last")),
    ("BatchNorm2d", dict(num_features=4), (3, 4, 5, 6), ("contiguous", "channels_last",
                                                         "strided")),
    ("BatchNorm2d", dict(num_features=4, momentum=None, affine=False), (3, 4, 5, 6),
     ("contiguous", "channels_last")),
    ("BatchNorm2d", dict(num_features=4, track_running_stats=False), (3, 4, 5, 6),
     ("contiguous", "channels_last")),
    ("BatchNorm2d", dict(num_features=4, bias=False, momentum=0.3), (2, 4, 3, 3),
     ("contiguous",)),
    ("BatchNorm3d", dict(num_features=3), (2, 3, 4, 3, 5), ("contiguous", "channels_last")),
    ("GroupNorm", dict(num_groups=2, num_channels=6), (3, 6, 5, 4),
     ("contiguous", "channels_last")),
    ("GroupNorm", dict(num_groups=3, num_channels=3, affine=False), (2, 3, 7),
     ("contiguous", "channels_last")),
    ("InstanceNorm1d", dict(num_features=4), (3, 4, 9), ("contiguous", "channels_last")),
    ("InstanceNorm2d", dict(num_features=4, affine=True, track_running_stats=True),
     (3, 4, 5, 6), ("contiguous", "channels_last")),
    ("InstanceNorm2d", dict(num_features=4, affine=True, track_running_stats=True,
                            momentum=None), (3, 4, 5, 6), ("contiguous",)),
    ("InstanceNorm3d", dict(num_features=2, affine=True), (2, 2, 3, 4, 5),
     ("contiguous", "channels_last")),
]
MODULE_CASES = [(name, kw, shape, layout, dtype)
                for name, kw, shape, layouts in MODULE_SPECS for layout in layouts
                for dtype in (torch.float32, torch.float64)]


def _case_id(c):
    name, kw, shape, layout, dtype = c
    opts = ",".join(f"{k}={v}" for k, v in kw.items())
    return f"{name}({opts})-{'x'.join(map(str, shape))}-{layout}-{str(dtype)[6:]}"


def _twins(rng, name, kwargs, dtype):
    """PyTorch's module with random parameters and statistics, and fastreg's loaded
    from its state_dict (strict)."""
    ref = getattr(nn, name)(**kwargs, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(_tensor(rng, tuple(p.shape), dtype, scale=0.5, offset=1.0))
        if getattr(ref, "running_mean", None) is not None:
            ref.running_mean.copy_(_tensor(rng, tuple(ref.running_mean.shape), dtype))
            ref.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, ref.running_var.shape)))
    ours = getattr(ft, name)(**kwargs, dtype=dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _step(rng, ref, ours, shape, layout, dtype, case):
    """One forward + backward of both twins on the same input and output gradient."""
    x = _tensor(rng, shape, dtype, layout, scale=2.0, offset=0.5)
    g = _tensor(rng, shape, dtype, layout)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    _close(yo, yr, "out", dtype, f"{case} y")
    if layout == "channels_last" and not isinstance(ours, (ft.LayerNorm, ft.RMSNorm)):
        assert _is_channels_last(yo), f"{case}: output lost the channels-last layout"
    yr.backward(g)
    yo.backward(g)
    _close(xo.grad, xr.grad, "grad", dtype, f"{case} dx", scale=True)
    for (pname, pr), po in zip(ref.named_parameters(), ours.parameters()):
        _close(po.grad, pr.grad, "grad", dtype, f"{case} d{pname}", scale=True)
    for (bname, br), bo in zip(ref.named_buffers(), ours.buffers()):
        if br.is_floating_point():
            _close(bo, br, "out", dtype, f"{case} {bname}")
        else:
            assert torch.equal(bo, br), f"{case}: {bname} {bo} != {br}"


@pytest.mark.parametrize("name,kwargs,shape,layout,dtype", MODULE_CASES,
                         ids=[_case_id(c) for c in MODULE_CASES])
def test_module_matches_torch_in_train_and_eval(name, kwargs, shape, layout, dtype, rng):
    ref, ours = _twins(rng, name, kwargs, dtype)
    case = _case_id((name, kwargs, shape, layout, dtype))
    for step in range(3):
        _step(rng, ref, ours, shape, layout, dtype, f"{case} train step {step}")
    ref.eval(), ours.eval()
    _step(rng, ref, ours, shape, layout, dtype, f"{case} eval")
    with torch.no_grad():
        x = _tensor(rng, shape, dtype, layout)
        _close(ours(x), ref(x), "out", dtype, f"{case} eval no_grad")
    with torch.inference_mode():
        x = _tensor(rng, shape, dtype, layout)
        _close(ours(x), ref(x), "out", dtype, f"{case} eval inference_mode")


@pytest.mark.parametrize("name,kwargs", [(n, k) for n, k, _, _ in MODULE_SPECS],
                         ids=[f"{n}-{i}" for i, (n, _, _, _) in enumerate(MODULE_SPECS)])
def test_state_dict_round_trips_both_ways(name, kwargs, rng):
    ref, ours = _twins(rng, name, kwargs, torch.float32)
    assert isinstance(ours, getattr(nn, name))
    assert list(ours.state_dict()) == list(ref.state_dict())
    # fastreg -> PyTorch, strict, after fastreg's state moved away from PyTorch's
    with torch.no_grad():
        for t in ours.state_dict().values():
            t.add_(1) if t.is_floating_point() else t.add_(3)
    back = getattr(nn, name)(**kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    again = getattr(ft, name)(**kwargs)
    again.load_state_dict(back.state_dict(), strict=True)
    for (k, a), b, c in zip(ours.state_dict().items(), back.state_dict().values(),
                            again.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), k
    assert repr(ours) == repr(ref)


def test_batch_norm_momentum_none_is_the_cumulative_average(rng):
    ref, ours = _twins(rng, "BatchNorm2d", dict(num_features=3, momentum=None), torch.float64)
    ref.reset_running_stats(), ours.reset_running_stats()
    batches = [_tensor(rng, (4, 3, 2, 5)) for _ in range(5)]
    for x in batches:
        ref(x), ours(x)
    assert int(ours.num_batches_tracked) == 5
    allx = torch.stack(batches)  # (5, N, C, H, W): the plain average of the batch statistics
    means = allx.mean(dim=(1, 3, 4)).mean(0)
    variances = allx.var(dim=(1, 3, 4), unbiased=True).mean(0)
    _close(ours.running_mean, means, "out", torch.float64, "running_mean")
    _close(ours.running_var, variances, "out", torch.float64, "running_var")
    _close(ours.running_var, ref.running_var, "out", torch.float64, "running_var vs torch")


def test_batch_norm_eval_without_running_stats_uses_batch_stats(rng):
    ours = ft.BatchNorm2d(3, track_running_stats=False).eval()
    x = _tensor(rng, (4, 3, 2, 2), torch.float32)
    _close(ours(x), nn.functional.batch_norm(x, None, None, training=True), "out",
           torch.float32, "eval batch stats")


def test_instance_norm_unbatched_input_and_feature_checks(rng):
    ours, ref = ft.InstanceNorm1d(4, affine=True), nn.InstanceNorm1d(4, affine=True)
    ours.load_state_dict(ref.state_dict())
    x = _tensor(rng, (4, 9), torch.float32)
    _close(ours(x), ref(x), "out", torch.float32, "unbatched")
    with pytest.raises(ValueError, match="match num_features"):
        ours(_tensor(rng, (2, 5, 9), torch.float32))
    with pytest.warns(UserWarning, match="does not match num_features"):
        ft.InstanceNorm1d(4)(_tensor(rng, (2, 5, 9), torch.float32))


@pytest.mark.parametrize("module,x_shape", [(lambda: ft.BatchNorm2d(3), (2, 3, 4)),
                                            (lambda: ft.BatchNorm1d(3), (2, 3, 4, 4)),
                                            (lambda: ft.InstanceNorm2d(3), (3, 4))])
def test_wrong_input_rank_raises_torchs_error(module, x_shape, rng):
    with pytest.raises(ValueError, match=r"expected .*D input"):
        module()(_tensor(rng, x_shape, torch.float32))


def _raised(fn):
    try:
        fn()
    except Exception as error:  # the type and text are compared, whatever they are
        return type(error), str(error)
    return None


def test_invalid_input_raises_torchs_error_without_fallback_warning(rng):
    F = nn.functional
    x = _tensor(rng, (2, 6, 3), torch.float32)
    pairs = [
        (lambda: ft.LayerNorm(8)(x), lambda: nn.LayerNorm(8)(x)),
        (lambda: ft.RMSNorm((5, 3))(x), lambda: nn.RMSNorm((5, 3))(x)),
        (lambda: ft.BatchNorm1d(6)(x[:1, :, :1]), lambda: nn.BatchNorm1d(6)(x[:1, :, :1])),
        (lambda: ft.functional.group_norm(x, 4), lambda: F.group_norm(x, 4)),
        (lambda: ft.functional.batch_norm(x, None, None), lambda: F.batch_norm(x, None, None)),
        (lambda: ft.functional.instance_norm(x[:, :, :1]), lambda: F.instance_norm(x[:, :, :1])),
        (lambda: ft.functional.layer_norm(x, (3,), torch.ones(4)),
         lambda: F.layer_norm(x, (3,), torch.ones(4))),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.FallbackWarning)
        for i, (ours, ref) in enumerate(pairs):
            expected = _raised(ref)
            assert expected is not None, f"case {i}: PyTorch accepted it"
            assert _raised(ours) == expected, f"case {i}"


def test_batch_norm_fused_relu_matches_batch_norm_then_relu(rng):
    ref = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    ours = ft.BatchNorm2d(4, activation="relu")
    ours.load_state_dict(ref[0].state_dict())
    assert "activation='relu'" in repr(ours)
    for mode in ("train", "eval"):
        getattr(ref, mode)(), getattr(ours, mode)()
        x = _tensor(rng, (3, 4, 5, 5), torch.float32, "channels_last")
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = _tensor(rng, x.shape, torch.float32)
        yr, yo = ref(xr), ours(xo)
        _close(yo, yr, "out", torch.float32, f"relu {mode} y")
        yr.backward(g), yo.backward(g)
        _close(xo.grad, xr.grad, "grad", torch.float32, f"relu {mode} dx", scale=True)
        _close(ours.weight.grad, ref[0].weight.grad, "grad", torch.float32, "dweight", True)
    _close(ours.running_var, ref[0].running_var, "out", torch.float32, "running_var")
    with pytest.raises(ValueError, match="activation"):
        ft.BatchNorm2d(4, activation="gelu")


def test_functional_matches_torch_functional(rng):
    F = nn.functional
    x = _tensor(rng, (4, 6, 5), torch.float32)
    w, b = _tensor(rng, (6,), torch.float32), _tensor(rng, (6,), torch.float32)
    rm, rv = _running(rng, 6)
    rm, rv = rm.float(), rv.float()
    rm2, rv2 = rm.clone(), rv.clone()
    pairs = [
        (ft.functional.layer_norm(x, (6, 5)), F.layer_norm(x, (6, 5))),
        (ft.functional.rms_norm(x, (5,)), F.rms_norm(x, (5,))),
        (ft.functional.group_norm(x, 3, w, b), F.group_norm(x, 3, w, b)),
        (ft.functional.instance_norm(x, weight=w, bias=b), F.instance_norm(x, weight=w, bias=b)),
        (ft.functional.batch_norm(x, rm, rv, w, b, True, 0.2),
         F.batch_norm(x, rm2, rv2, w, b, True, 0.2)),
        (ft.functional.batch_norm(x, rm, rv, w, b, activation="relu"),
         F.relu(F.batch_norm(x, rm2, rv2, w, b))),
    ]
    for i, (a, r) in enumerate(pairs):
        _close(a, r, "out", torch.float32, f"functional {i}")
    _close(rm, rm2, "out", torch.float32, "running_mean")
    _close(rv, rv2, "out", torch.float32, "running_var")


# --------------------------------------------------------------------------- convert

class _Block(nn.Module):
    """A transformer block: pre-norm attention and MLP with LayerNorm and RMSNorm."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.RMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm_out = nn.LayerNorm(d, bias=False)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.norm_out(x)


def _cnn():
    return nn.Sequential(
        # no conv bias before batch/instance norm: its exact gradient is 0 (rounding noise)
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.InstanceNorm2d(6, affine=True), nn.ReLU(),
        nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=None), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 5))


# fastreg against PyTorch through whole models. float64 checks the adapter
# exactly; in float32 the norms of small batches (4 samples into BatchNorm1d)
# amplify the two implementations' rounding differences to ~1e-3 of the
# largest gradient (measured: 5e-4 to 7e-4; float64 agrees to 3e-12).
MODEL_TOL = {torch.float64: dict(out=(1e-9, 1e-9), grad=(1e-8, 1e-8)),
             torch.float32: dict(out=(2e-4, 2e-4), grad=(1e-3, 2e-3))}


def _compare_models(rng, ref, ours, x, dtype, case, steps=3):
    ref, ours = ref.to(dtype), ours.to(dtype)
    (rtol, atol), (grtol, gatol) = MODEL_TOL[dtype]["out"], MODEL_TOL[dtype]["grad"]
    for step in range(steps):
        xs = x().to(dtype)
        for model in (ref, ours):
            model.zero_grad()
        yr, yo = ref(xs), ours(xs)
        assert_close(_np(yo), _np(yr), rtol=rtol, atol=atol, case=f"{case} train step {step} y")
        g = torch.from_numpy(rng.standard_normal(yr.shape)).to(dtype)
        yr.backward(g), yo.backward(g)
        for (name, pr), po in zip(ref.named_parameters(), ours.parameters()):
            scale = max(1.0, float(pr.grad.abs().max()))
            assert_close(_np(po.grad), _np(pr.grad), rtol=grtol, atol=gatol * scale,
                         case=f"{case} step {step} grad {name}")
    for (name, br), bo in zip(ref.named_buffers(), ours.buffers()):
        assert_close(_np(bo), _np(br), rtol=rtol, atol=atol, case=f"{case} buffer {name}")
    ref.eval(), ours.eval()
    with torch.no_grad():
        xs = x().to(dtype)
        assert_close(_np(ours(xs)), _np(ref(xs)), rtol=rtol, atol=atol, case=f"{case} eval y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fuse_relu", [False, True])
def test_convert_cnn_matches_torch(channels_last, fuse_relu, dtype, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    ref = _cnn()
    ours = copy.deepcopy(ref)
    params_before = [id(p) for p in ours.parameters()]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref, ours = ref.to(memory_format=fmt), ours.to(memory_format=fmt)
    assert ft.convert(ours, fuse_relu=fuse_relu) is ours
    assert [id(p) for p in ours.parameters()] == params_before, "parameters were replaced"
    kinds = [type(m) for m in ours]
    assert kinds[1] is ft.BatchNorm2d and kinds[4] is ft.GroupNorm
    assert kinds[7] is ft.InstanceNorm2d and kinds[14] is ft.BatchNorm1d
    assert (kinds[2] is nn.Identity) == fuse_relu and (kinds[11] is nn.Identity) == fuse_relu
    assert kinds[5] is nn.ReLU, "only ReLUs after a batch norm are fused"
    assert ours[1].activation == ("relu" if fuse_relu else None)
    assert ours[14].activation is None  # a Linear follows it
    _compare_models(rng, ref, ours, lambda: _tensor(rng, (4, 3, 8, 8), torch.float32).to(
        memory_format=fmt), dtype, f"cnn channels_last={channels_last} fuse_relu={fuse_relu}")
    assert not ours.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_convert_transformer_block_matches_torch(dtype, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    ref = _Block()
    ours = ft.convert(copy.deepcopy(ref))
    assert type(ours.norm1) is ft.LayerNorm and type(ours.norm2) is ft.RMSNorm
    assert type(ours.norm_out) is ft.LayerNorm
    _compare_models(rng, ref, ours, lambda: _tensor(rng, (3, 7, 32), torch.float32), dtype,
                    "transformer block")


def test_convert_keeps_mode_buffers_and_hooks(rng):
    model = nn.Sequential(nn.BatchNorm1d(3), nn.LayerNorm(3)).eval()
    bn_buffers = [id(b) for b in model[0].buffers()]
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    ft.convert(model)
    assert not model.training and not model[0].training
    assert [id(b) for b in model[0].buffers()] == bn_buffers
    model(_tensor(rng, (4, 3), torch.float32))
    assert seen == [ft.LayerNorm]
    # a converted module passed again is left as it is
    assert type(ft.convert(model)[0]) is ft.BatchNorm1d


def test_convert_leaves_unsupported_layers_to_torch():
    class MyNorm(nn.LayerNorm):
        pass

    model = nn.Sequential(nn.BatchNorm2d(3, dtype=torch.float16), MyNorm(4),
                          nn.LayerNorm(4, eps=0.0), nn.BatchNorm2d(3, momentum=1.5),
                          nn.LayerNorm(4, device="meta"), nn.GroupNorm(1, 3), nn.Dropout2d())
    ft.convert(model)
    assert [type(m) for m in model] == [nn.BatchNorm2d, MyNorm, nn.LayerNorm, nn.BatchNorm2d,
                                        nn.LayerNorm, ft.GroupNorm, nn.Dropout2d]
    layer = ft.convert(nn.LayerNorm(5))  # a single layer converts too
    assert type(layer) is ft.LayerNorm
    with pytest.raises(TypeError, match="convert: 'model' must be a torch.nn.Module"):
        ft.convert("model")


# --------------------------------------------------------------------------- fallback

def _fallbacks(record):
    return [w for w in record if issubclass(w.category, ft.FallbackWarning)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cpu_falls_back_with_one_warning(dtype, rng):
    ours = ft.LayerNorm(8, dtype=dtype)
    ref = nn.LayerNorm(8, dtype=dtype)
    ref.load_state_dict(ours.state_dict())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            x = _tensor(rng, (4, 8), dtype)
            assert torch.equal(ours(x), ref(x))
        ft.BatchNorm2d(3, dtype=dtype)(_tensor(rng, (2, 3, 2, 2), dtype))
        ft.BatchNorm2d(3, dtype=dtype)(_tensor(rng, (2, 3, 2, 2), dtype))
    messages = [str(w.message) for w in _fallbacks(record)]
    assert len(messages) == 2, messages  # once for LayerNorm, once for BatchNorm2d
    assert "LayerNorm" in messages[0] and str(dtype)[6:] in messages[0]
    assert "BatchNorm2d" in messages[1]


def test_autocast_falls_back_and_matches_torch(rng):
    ours, ref = ft.GroupNorm(2, 4), nn.GroupNorm(2, 4)
    x = _tensor(rng, (2, 4, 3, 3), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(ft.FallbackWarning, match="autocast"):
            y = ours(x)
        assert torch.equal(y, ref(x))


def test_other_devices_fall_back(rng):
    ours = ft.LayerNorm(6, device="meta")
    with pytest.warns(ft.FallbackWarning, match="device type 'meta'"):
        y = ours(torch.empty(3, 6, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 6)


def test_mixed_dtypes_fall_back_to_torchs_behaviour(rng):
    ours = ft.BatchNorm1d(3)  # float32 statistics
    x = _tensor(rng, (4, 3), torch.float64)
    with pytest.warns(ft.FallbackWarning, match="another dtype"):
        try:
            got = ours(x)
        except RuntimeError:  # PyTorch rejects the mix: so must we
            got = None
    try:
        expected = nn.BatchNorm1d(3)(x)
    except RuntimeError:
        expected = None
    assert (got is None) == (expected is None)


def test_unsupported_momentum_falls_back(rng):
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = rm.clone(), rv.clone()
    x = _tensor(rng, (5, 3), torch.float32)
    with pytest.warns(ft.FallbackWarning, match="momentum"):
        y = ft.functional.batch_norm(x, rm, rv, training=True, momentum=1.5)
    _close(y, nn.functional.batch_norm(x, rm2, rv2, training=True, momentum=1.5), "out",
           torch.float32, "momentum 1.5")
    assert torch.equal(rm, rm2)


def test_empty_batch_matches_torch_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.FallbackWarning)
        ours, ref = ft.BatchNorm2d(3), nn.BatchNorm2d(3)
        y = ours(torch.empty(0, 3, 4, 4))
        assert y.shape == ref(torch.empty(0, 3, 4, 4)).shape
        assert torch.equal(ours.running_mean, ref.running_mean)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 1


# --------------------------------------------------------------------------- zero copy

def test_numpy_views_share_memory(rng):
    x = _tensor(rng, (3, 4, 5, 6), torch.float32, "channels_last")
    for t in (x, x.permute(0, 2, 3, 1), _tensor(rng, (4, 5), torch.float32)):
        a = _bridge.array(t)
        assert a.__array_interface__["data"][0] == t.data_ptr()
        assert a.strides == tuple(s * t.element_size() for s in t.stride())


@pytest.fixture
def spy(monkeypatch):
    """Records the arrays each fastreg function receives (arguments and out=)."""
    calls = {}

    def wrap(name):
        original = getattr(fastreg, name)

        def spy_fn(*args, **kwargs):
            calls[name] = (args, kwargs)
            return original(*args, **kwargs)
        monkeypatch.setattr(fastreg, name, spy_fn)

    for name in ("layer_norm", "layer_norm_backward", "batch_norm", "batch_norm_backward",
                 "group_norm", "group_norm_backward", "instance_norm",
                 "instance_norm_backward", "rms_norm", "rms_norm_backward"):
        wrap(name)
    return calls


def _ptr(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["BatchNorm2d", "GroupNorm", "InstanceNorm2d"])
def test_channel_norms_pass_views_and_keep_channels_last(name, layout, spy, rng):
    module = {"BatchNorm2d": lambda: ft.BatchNorm2d(4),
              "GroupNorm": lambda: ft.GroupNorm(2, 4),
              "InstanceNorm2d": lambda: ft.InstanceNorm2d(4, affine=True)}[name]()
    op = {"BatchNorm2d": "batch_norm", "GroupNorm": "group_norm",
          "InstanceNorm2d": "instance_norm"}[name]
    x = _tensor(rng, (2, 4, 3, 5), torch.float32, layout).requires_grad_()
    y = module(x)
    args, kwargs = spy[op]
    assert _ptr(args[0]) == x.data_ptr(), "x was copied"
    assert _ptr(kwargs["out"][0]) == y.data_ptr(), "y was written elsewhere"
    if layout == "channels_last":
        assert kwargs["axis"] == -1 and args[0].shape == (2, 3, 5, 4)
        assert args[0].flags.c_contiguous and y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert kwargs["axis"] == 1 and args[0].flags.c_contiguous and y.is_contiguous()
    if isinstance(module, ft.BatchNorm2d):
        assert _ptr(args[3]) == module.running_mean.data_ptr(), "running stats not in place"
    g = _tensor(rng, x.shape, torch.float32, layout)
    y.backward(g)
    args, kwargs = spy[op + "_backward"]
    assert _ptr(args[0]) == g.data_ptr() and _ptr(args[1]) == x.data_ptr()
    assert _ptr(kwargs["out"][0]) == x.grad.data_ptr()
    assert _ptr(kwargs["out"][1]) == module.weight.grad.data_ptr()


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_row_norms_pass_views(name, spy, rng):
    module = getattr(ft, name)(6)
    op = "layer_norm" if name == "LayerNorm" else "rms_norm"
    x = _tensor(rng, (3, 5, 6), torch.float32).requires_grad_()
    y = module(x)
    args, kwargs = spy[op]
    assert _ptr(args[0]) == x.data_ptr() and _ptr(kwargs["out"][0]) == y.data_ptr()
    assert _ptr(args[1]) == module.weight.data_ptr()
    g = _tensor(rng, x.shape, torch.float32)
    y.backward(g)
    args, kwargs = spy[op + "_backward"]
    assert _ptr(args[0]) == g.data_ptr() and _ptr(kwargs["out"][0]) == x.grad.data_ptr()


def test_three_d_channels_last_storage_runs_without_copy(spy, rng):
    x = _tensor(rng, (4, 5, 7), torch.float32, "channels_last")  # (N, L, C) storage
    y = ft.BatchNorm1d(5)(x)
    args, kwargs = spy["batch_norm"]
    assert kwargs["axis"] == -1 and _ptr(args[0]) == x.data_ptr()
    assert _is_channels_last(y)


# --------------------------------------------------------------------------- CUDA
# The same comparisons on a GPU, through DLPack and CuPy on torch's stream. They
# run where PyTorch sees a CUDA device and CuPy and fastreg's CUDA backend are
# installed (bench/gpu_check.py); elsewhere they skip, naming what is missing.

def _cuda_missing():
    if not torch.cuda.is_available():
        return "no CUDA device (this PyTorch build or machine has none)"
    cupy, reason = _bridge._cuda_support()
    return None if cupy is not None else reason


needs_cuda = pytest.mark.skipif(_cuda_missing() is not None,
                                reason=f"CUDA path: {_cuda_missing()}")
CUDA_CASES = [c for c in MODULE_CASES if c[4] == torch.float32]


@needs_cuda
@pytest.mark.parametrize("name,kwargs,shape,layout,dtype", CUDA_CASES,
                         ids=[_case_id(c) for c in CUDA_CASES])
def test_module_matches_torch_on_cuda(name, kwargs, shape, layout, dtype, rng):
    ref, ours = _twins(rng, name, kwargs, dtype)
    ref, ours = ref.cuda(), ours.cuda()
    case = "cuda " + _case_id((name, kwargs, shape, layout, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.FallbackWarning)
        for step in range(2):
            x = _tensor(rng, shape, dtype, layout, scale=2.0, offset=0.5).cuda()
            g = _tensor(rng, shape, dtype, layout).cuda()
            xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yo = ref(xr), ours(xo)
            _close(yo, yr, "out", dtype, f"{case} step {step} y")
            yr.backward(g), yo.backward(g)
            _close(xo.grad, xr.grad, "grad", dtype, f"{case} step {step} dx", scale=True)
            for (pname, pr), po in zip(ref.named_parameters(), ours.parameters()):
                _close(po.grad, pr.grad, "grad", dtype, f"{case} d{pname}", scale=True)
        for (bname, br), bo in zip(ref.named_buffers(), ours.buffers()):
            if br.is_floating_point():
                _close(bo, br, "out", dtype, f"{case} {bname}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name,kwargs,shape", [("LayerNorm", dict(normalized_shape=64), (8, 64)),
                                               ("RMSNorm", dict(normalized_shape=64), (8, 64)),
                                               ("GroupNorm", dict(num_groups=2, num_channels=8),
                                                (4, 8, 5, 5))])
def test_low_precision_on_cuda_is_as_close_as_torchs(name, kwargs, shape, dtype, rng):
    """|fastreg - fp32| <= 2 |torch low precision - fp32| + atol (the flash-attention rule)."""
    ref32 = getattr(nn, name)(**kwargs).cuda()
    ours = getattr(ft, name)(**kwargs).cuda().to(dtype)
    ref = getattr(nn, name)(**kwargs).cuda().to(dtype)
    x = _tensor(rng, shape, torch.float32).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.FallbackWarning)
        got = ours(x.to(dtype)).float()
    expected, low = ref32(x), ref(x.to(dtype)).float()
    bound = 2 * (low - expected).abs() + (1e-2 if dtype == torch.float16 else 5e-2)
    assert bool(((got - expected).abs() <= bound).all()), f"{name} {dtype}"


@needs_cuda
def test_cuda_tensors_reach_the_kernels_as_views_on_torchs_stream(monkeypatch, rng):
    cupy, _ = _bridge._cuda_support()
    seen = {}
    original = fastreg.batch_norm

    def spy(x, *args, **kwargs):
        seen.update(x=x, out=kwargs["out"], stream=cupy.cuda.get_current_stream().ptr,
                    device=cupy.cuda.Device().id)
        return original(x, *args, **kwargs)
    monkeypatch.setattr(fastreg, "batch_norm", spy)
    ours, ref = ft.BatchNorm2d(4).cuda(), nn.BatchNorm2d(4).cuda()
    side = torch.cuda.Stream()
    x = _tensor(rng, (2, 4, 6, 6), torch.float32, "channels_last").cuda()
    with torch.cuda.stream(side):
        # queue work on the side stream that the norm must wait for, in stream order
        big = torch.randn(2048, 2048, device="cuda")
        for _ in range(4):
            big = big @ big / 2048
        xs = x + big[0, 0] * 0
        y = ours(xs)
        yr = ref(xs)
    torch.cuda.synchronize()
    assert seen["stream"] == side.cuda_stream and seen["device"] == x.device.index
    assert seen["x"].data.ptr == xs.data_ptr() and seen["out"][0].data.ptr == y.data_ptr()
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, yr, "out", torch.float32, "cuda side stream")


# --------------------------------------------------------------------------- example

def test_digits_example_trains_both_ways(capsys):
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "torch_convert_digits.py"
    spec = importlib.util.spec_from_file_location("torch_convert_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--quick", "--fuse-relu", "--l1", "0.05"])
    # after 4 epochs with dropout: 0.73-0.95 measured over seeds (chance is 0.1); the two
    # runs draw different dropout masks, so they differ by that noise
    for name, (accuracy, step, loss, zeros) in results.items():
        assert accuracy > 0.5, f"{name}: accuracy {accuracy} after 4 epochs"
    assert abs(results["torch"][0] - results["fastreg"][0]) < 0.3
    assert results["torch"][3] == 0 < results["fastreg"][3], "the L1 prox made no zeros"
    out = capsys.readouterr().out
    assert "step time torch / fastreg" in out and "4 epochs" in out


def test_torch_func_transforms_fall_back_and_match_torch(rng):
    ours, ref = ft.LayerNorm(4), nn.LayerNorm(4)
    x = _tensor(rng, (2, 3, 4), torch.float32)
    with pytest.warns(ft.FallbackWarning, match="torch.func"):
        got = torch.func.vmap(ours)(x)
    assert torch.equal(got, torch.func.vmap(ref)(x))
    grad = torch.func.grad(lambda t: ours(t).pow(3).sum())(x[0])
    assert torch.equal(grad, torch.func.grad(lambda t: ref(t).pow(3).sum())(x[0]))


def test_torch_compile_traces_torchs_op_without_graph_breaks(rng):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    ref = copy.deepcopy(model)
    ft.convert(model)
    compiled = torch.compile(model, backend="eager")  # dynamo only: no C++ compiler needed
    x = _tensor(rng, (5, 4), torch.float32)
    with pytest.warns(ft.FallbackWarning, match="torch.compile"):
        y = compiled(x)
    _close(y, ref(x), "out", torch.float32, "compiled")
    _close(model[2].running_mean, ref[2].running_mean, "out", torch.float32, "running_mean")
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
