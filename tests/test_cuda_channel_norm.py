"""Batch, group and instance norm on the CUDA kernels, against the NumPy reference.

Targets as in test_cuda_norm.py: the host emulation always (where a C++
compiler exists), the GPU where CuPy and a device are present. The cases
reach every kernel path: batch norm's chunk kernels (NCHW, 16-byte and
scalar units, several blocks per channel) and row kernels (NHWC,
channels_last storage, (N, C), tiny maps with several columns per channel,
several row splits), group norm's per-group kernels (NCHW, 1 to 32
channels a block, G = 1 and G = C) and its row kernels (NHWC, row splits),
instance norm with and without input statistics, inference, the fused
ReLU, empty batches, size-1 dims, non-contiguous inputs, outputs poisoned
with NaN and fresh. Tolerances: tests/_cuda_targets.py (flash-attention's
rule for float16/bfloat16); running statistics are float32 arrays, held to
float32 tolerances.
"""

import numpy as np
import pytest

from _assert import assert_bitwise, assert_close
from _cuda_targets import (DTYPES, GPU, TARGETS, _check, _host, _poisoned, _references, _run,
                           _snapshot, _to, needs_emulator)
from cases import BATCH_NORM, GROUP_NORM, INSTANCE_NORM, make_array

pytestmark = pytest.mark.gpu

BN_CASES = [
    ((16, 7), {}),                                     # (N, C): rows, one column a channel
    ((4, 5, 6, 7), {}),                                # NCHW chunks, B = 42: scalar units (f16, bf16, f32)
    ((3, 4, 8, 8), {}),                                # NCHW chunks, 16-byte units
    ((4, 6, 7, 5), {"axis": -1}),                      # NHWC rows, scalar columns
    ((4, 6, 7, 8), {"axis": -1}),                      # NHWC rows, 16-byte columns
    ((3, 5, 2, 3, 4), {}),                             # 5-D
    ((37, 3), {"axis": -1, "activation": "relu"}),
    ((4, 5, 6, 7), {"layout": "channels_last"}),       # NHWC storage behind an NCHW shape
    ((8, 3, 9), {"layout": "strided"}),                # copied first
    ((4, 5, 6, 7), {"training": False}),
    ((4, 6, 7, 8), {"axis": -1, "training": False, "activation": "relu"}),
    ((5, 4, 3, 3), {"activation": "relu", "affine": False}),  # B = 9: chunks, or rows (16-bit)
    ((3, 4, 2, 2), {}),                                # B = 4: rows with 4 columns a channel
    ((2, 1, 1, 1), {}),
    ((1, 3, 1, 5), {}),
    ((0, 5), {}),                                      # empty batch
    ((0, 3, 4, 4), {"training": False}),
    ((16, 3, 32, 32), {}),                             # several blocks per channel (partials)
    ((2048, 8), {"activation": "relu"}),               # several row splits (partials)
]
GN_CASES = [
    ((4, 6, 5, 3), {"G": 3}),                          # NCHW groups, scalar units
    ((2, 8, 4, 4), {"G": 4}),                          # NCHW groups, 16-byte units
    ((4, 5, 3, 6), {"G": 2, "axis": -1}),              # NHWC rows
    ((3, 8), {"G": 4}),                                # (N, C): rows of one position
    ((2, 6, 7), {"G": 6}),                             # G = C
    ((2, 7, 6), {"G": 1, "axis": -1}),                 # G = 1, channels last
    ((3, 4, 5, 6), {"G": 2, "layout": "channels_last"}),
    ((3, 4, 5, 12), {"G": 2, "layout": "strided"}),
    ((2, 3, 2, 2, 3), {"G": 3, "axis": -1, "affine": False}),
    ((1, 4, 1, 1), {"G": 2}),
    ((0, 4, 3), {"G": 2}),                             # empty batch
    ((2, 64, 7, 7), {"G": 2}),                         # 32 channels a group, 16 at a time
    ((2, 4, 40, 40), {"G": 1}),                        # long channels: 128 threads each
    ((2, 4096, 8), {"G": 2, "axis": -1}),              # several row splits (partials)
]
IN_CASES = INSTANCE_NORM.cases + [
    ((2, 3, 33, 5), {}),
    ((2, 1, 4, 4), {"affine": False}),
    ((3, 7, 6, 5), {"axis": -1, "use_input_stats": False, "layout": "contig"}),
    ((0, 4, 5), {}),
]
PARAMS = ([(BATCH_NORM, s, v) for s, v in BN_CASES] + [(GROUP_NORM, s, v) for s, v in GN_CASES]
          + [(INSTANCE_NORM, s, v) for s, v in IN_CASES])
IDS = [f"{op.name}-{'x'.join(map(str, s))}-{','.join(f'{k}={v}' for k, v in v_.items())}"
       for op, s, v_ in PARAMS]
RUNNING = ("running_mean", "running_var")


def _inputs(d, dtype):
    """The case's inputs with x, weight and bias cast to ``dtype``; running
    statistics copied as they are (float32: updated in place by the call)."""
    out = {}
    for k, v in d.items():
        if k in RUNNING:
            out[k] = None if v is None else v.copy()
        elif isinstance(v, np.ndarray):
            out[k] = v.astype(dtype)
        else:
            out[k] = v
    return out


def _forward(op, d, target, out=None):
    """op's forward on the target with its own copies of the running statistics;
    returns (outputs on the host, the running statistics after the call)."""
    dd = {k: _to(target, v.copy() if k in RUNNING and v is not None else v)
          for k, v in d.items()}
    res = op.forward(dd, target, out)
    if out is not None:
        for g, o in zip(res, out):
            assert g is o, "the kernel must return the out= arrays it was given"
    return res, {k: _host(dd[k]) for k in RUNNING if dd.get(k) is not None}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,shape,variant", PARAMS, ids=IDS)
def test_forward_matches_reference(op, shape, variant, dtype, target, rng):
    d = op.make(rng, shape, dtype, variant)
    before = _snapshot(d)
    fresh, run_fresh = _forward(op, d, target)
    out = tuple(_poisoned(target, f) for f in fresh)
    got, run_got = _forward(op, d, target, out)
    got, fresh = [_host(g) for g in got], [_host(f) for f in fresh]
    refs = {}
    for rd in (np.float64, np.float32):
        dd = _inputs(d, rd)
        refs[rd] = op.forward(dd, "reference"), {k: dd[k] for k in RUNNING if k in dd}
    (ref64, run64), (ref32, _) = refs[np.float64], refs[np.float32]
    case = f"{op.name} fwd {np.dtype(dtype).name} {shape} {variant} on {target}"
    sd = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    for name, g, f, r, lo in zip(("y", "mean", "rstd"), got, fresh, ref64, ref32):
        if name == "y":
            lo = lo.astype(dtype)
            assert g.dtype == f.dtype == dtype, f"{case}: y dtype {g.dtype}"
        else:  # statistics: float32 (float64 for float64 x), float32 tolerances
            assert g.dtype == f.dtype == sd, f"{case}: {name} dtype {g.dtype}"
            lo = None
        _check(f"{name} (out=)", g, r, lo, dtype, "out", case)
        _check(f"{name} (fresh)", f, r, lo, dtype, "out", case)
    for k, want in run64.items():
        if want is None:
            continue
        for label, state in (("fresh", run_fresh), ("out=", run_got)):
            assert_close(state[k], want, rtol=2e-5, atol=2e-5, case=f"{case} {k} ({label})")
    if d["x"].size and "layout" in variant:  # a fresh y keeps x's memory layout
        order = np.argsort([-s for s in d["x"].strides], kind="stable").tolist()
        assert np.argsort([-s for s in fresh[0].strides], kind="stable").tolist() == order
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, d[k], equal_nan=True), f"{case}: input {k} modified"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,shape,variant", PARAMS, ids=IDS)
def test_backward_matches_reference(op, shape, variant, dtype, target, rng):
    d = op.make(rng, shape, dtype, variant)
    saved = [_host(a) for a in _forward(op, d, target)[0]]
    dy = np.empty_like(d["x"])
    dy[...] = rng.standard_normal(d["x"].shape)
    before = _snapshot(d)
    saved_before = [s.copy() for s in saved]
    got, fresh = _run(target, lambda dd, s, g, t, out=None: op.backward(dd, s, g, t, out), d,
                      tuple(saved), dy)
    ref64, low = _references(op, d, dtype, "bwd", saved, dy)
    case = f"{op.name} bwd {np.dtype(dtype).name} {shape} {variant} on {target}"
    for name, g, f, r, lo in zip(("dx", "dweight", "dbias"), got, fresh, ref64, low):
        _check(f"{name} (out=)", g, r, lo, dtype, "grad", case)
        _check(f"{name} (fresh)", f, r, lo, dtype, "grad", case)
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, d[k], equal_nan=True), f"{case}: input {k} modified"
    for s0, s1 in zip(saved_before, saved):
        assert np.array_equal(s0, s1, equal_nan=True), f"{case}: saved statistics modified"


# --------------------------------------------------------------------------- properties

def _all_outputs(target, x, w, b, dy, axis):
    """Every output of batch, group and instance norm, forward and backward."""
    import fastreg
    xs, ws, bs, dys = (_to(target, a) for a in (x, w, b, dy))
    C = x.shape[axis]
    rm, rv = _to(target, np.zeros(C, np.float32)), _to(target, np.ones(C, np.float32))
    outs = list(fastreg.batch_norm(xs, ws, bs, rm, rv, axis=axis, backend=target))
    outs += fastreg.batch_norm_backward(dys, xs, outs[1], outs[2], ws, bs, axis=axis,
                                        backend=target)
    outs += [rm, rv]
    gn = fastreg.group_norm(xs, 2, ws, bs, axis=axis, backend=target)
    outs += gn
    outs += fastreg.group_norm_backward(dys, xs, gn[1], gn[2], 2, ws, bs, axis=axis,
                                        backend=target)
    if x.ndim > 2:
        inn = fastreg.instance_norm(xs, ws, bs, axis=axis, backend=target)
        outs += inn
        outs += fastreg.instance_norm_backward(dys, xs, inn[1], inn[2], ws, bs, axis=axis,
                                               backend=target)
    return [_host(a) for a in outs]


# NCHW with several blocks per channel; NHWC and (N, C) with several row splits
DETERMINISM = [((16, 4, 32, 32), 1), ((8, 16, 16, 8), -1), ((3000, 6), 1)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape,axis", DETERMINISM, ids=lambda v: str(v))
def test_results_are_bitwise_identical_run_to_run(shape, axis, target, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    w, b = (rng.standard_normal(shape[axis]).astype(np.float32) for _ in range(2))
    dy = rng.standard_normal(shape).astype(np.float32)
    first = _all_outputs(target, x, w, b, dy, axis)
    for _ in range(2):
        for i, (a, c) in enumerate(zip(first, _all_outputs(target, x, w, b, dy, axis))):
            assert_bitwise(c, a, case=f"{shape} axis {axis} output {i} on {target}")


@needs_emulator
def test_emulated_results_do_not_depend_on_the_scheduler(rng):
    """Fibers and real threads interleave a block's threads differently; the
    merge trees and the reduction order are fixed by the code."""
    from fastreg.cuda import _emulator
    for shape, axis in (((4, 4, 12, 12), 1), ((600, 12), 1)):
        x = rng.standard_normal(shape).astype(np.float32)
        w, b = (rng.standard_normal(shape[axis]).astype(np.float32) for _ in range(2))
        dy = rng.standard_normal(shape).astype(np.float32)
        fibers = _all_outputs("cuda_emulator", x, w, b, dy, axis)
        _emulator.set_mode("threads")
        try:
            threads = _all_outputs("cuda_emulator", x, w, b, dy, axis)
        finally:
            _emulator.set_mode("fibers")
        for i, (a, c) in enumerate(zip(fibers, threads)):
            assert_bitwise(c, a, case=f"{shape} output {i}: threads vs fibers")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("layout", [{"axis": 1}, {"axis": -1}])
def test_float32_with_mean_1e4_keeps_float32_precision(layout, target, rng):
    """Shifted sums and float64 merges: data with mean 1e4 and std 1 normalize to
    float32 precision (the float32 mean itself is rounded to |mean| * 6e-8, and the
    coefficients take that rounding up)."""
    import fastreg
    shape = (8, 6, 12, 12) if layout["axis"] == 1 else (8, 12, 12, 6)
    x = make_array(rng, shape, np.float32, offset=1e4)
    for fn, args in ((fastreg.batch_norm, ()), (fastreg.group_norm, (3,))):
        got = [_host(a) for a in fn(_to(target, x), *args, backend=target, **layout)]
        ref = fn(x.astype(np.float64), *args, backend="reference", **layout)
        assert_close(got[0], ref[0], rtol=0, atol=3e-5, case=f"{fn.__name__} y")
        assert_close(got[1], ref[1], rtol=1e-7, atol=0, case=f"{fn.__name__} mean")
        assert_close(got[2], ref[2], rtol=1e-5, atol=0, case=f"{fn.__name__} rstd")


@pytest.mark.parametrize("target", TARGETS)
def test_misaligned_buffers_take_the_scalar_path(target, rng):
    """Outputs starting 4 bytes into their buffer cannot take 16-byte stores; the
    scalar bodies give the same answers within tolerance."""
    import fastreg
    from _cuda_targets import _xp
    xp = _xp(target)
    for shape, axis in (((4, 3, 8, 8), 1), ((64, 8), 1)):
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        ref = fastreg.batch_norm(x, axis=axis, backend="reference")
        refb = fastreg.batch_norm_backward(dy, x, ref[1], ref[2], axis=axis, backend="reference")
        y = xp.full(x.size + 1, np.nan, np.float32)[1:].reshape(shape)
        dx = xp.full(x.size + 1, np.nan, np.float32)[1:].reshape(shape)
        _, m, r = fastreg.batch_norm(_to(target, x), axis=axis, backend=target,
                                     out=(y, None, None))
        fastreg.batch_norm_backward(_to(target, dy), _to(target, x), m, r, axis=axis,
                                    backend=target, out=(dx, None, None))
        assert_close(_host(y), ref[0], rtol=2e-5, atol=2e-5, case=f"{shape} misaligned y")
        assert_close(_host(dx), refb[0], rtol=1e-4, atol=1e-4, case=f"{shape} misaligned dx")


@needs_emulator
def test_running_statistics_are_updated_as_on_the_cpu(rng):
    """The same host-side rule updates them on every backend: float64 arithmetic,
    the unbiased batch variance, momentum as the new batch's weight."""
    import fastreg
    x = rng.standard_normal((6, 5, 4, 3)).astype(np.float64)
    states = {}
    for be in ("cpu", "cuda_emulator"):
        rm, rv = np.full(5, 0.5), np.full(5, 2.0)
        fastreg.batch_norm(x, running_mean=rm, running_var=rv, momentum=0.25, backend=be)
        states[be] = rm, rv
    for a, b in zip(states["cpu"], states["cuda_emulator"]):
        assert_close(a, b, rtol=1e-14, atol=0, case="running statistics")
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)
    assert_close(states["cuda_emulator"][0], 0.75 * 0.5 + 0.25 * mean, rtol=1e-14, atol=0,
                 case="running_mean")
    assert_close(states["cuda_emulator"][1], 0.75 * 2.0 + 0.25 * var, rtol=1e-14, atol=0,
                 case="running_var")


@pytest.mark.parametrize("target", TARGETS)
def test_relu_backward_passes_gradient_where_the_output_was_positive(target, rng):
    import fastreg
    x = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
    y, m, r = fastreg.batch_norm(_to(target, x), activation="relu", backend=target)
    assert (_host(y) >= 0).all()
    dy = np.ones_like(x)
    dx_relu = fastreg.batch_norm_backward(_to(target, dy), _to(target, x), m, r, y=y,
                                          activation="relu", training=False, backend=target)[0]
    dx_plain = fastreg.batch_norm_backward(_to(target, dy), _to(target, x), m, r,
                                           training=False, backend=target)[0]
    mask = _host(y) > 0
    assert np.array_equal(_host(dx_relu)[~mask], np.zeros((~mask).sum(), np.float32))
    assert np.array_equal(_host(dx_relu)[mask], _host(dx_plain)[mask])


@pytest.mark.parametrize("target", TARGETS)
def test_non_contiguous_outputs_are_written_through(target, rng):
    """out= views that are not contiguous in any axis order get a temporary and a copy."""
    import fastreg
    from _cuda_targets import _xp
    xp = _xp(target)
    shape = (3, 4, 5, 6)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    for fn, bwd, args in ((fastreg.batch_norm, fastreg.batch_norm_backward, ()),
                          (fastreg.group_norm, fastreg.group_norm_backward, (2,))):
        ref = fn(x, *args, backend="reference")
        refb = bwd(dy, x, ref[1], ref[2], *args, backend="reference")
        y = xp.full((3, 4, 5, 12), np.nan, np.float32)[..., ::2]
        dx = xp.full((3, 4, 5, 12), np.nan, np.float32)[..., ::2]
        _, m, r = fn(_to(target, x), *args, backend=target, out=(y, None, None))
        bwd(_to(target, dy), _to(target, x), m, r, *args, backend=target, out=(dx, None, None))
        assert_close(_host(y), ref[0], rtol=2e-5, atol=2e-5, case=f"{fn.__name__} strided y")
        assert_close(_host(dx), refb[0], rtol=1e-4, atol=1e-4, case=f"{fn.__name__} strided dx")


# --------------------------------------------------------------------------- real hardware

@pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_matches_torch_on_the_same_device(layout, dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import cupy
    import fastreg
    F, tdt = torch.nn.functional, getattr(torch, dtype)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    xt = torch.randn(6, 32, 14, 14, device="cuda", dtype=tdt).to(memory_format=fmt)
    wt, bt = (torch.randn(32, device="cuda", dtype=tdt) for _ in range(2))
    x, w, b = (cupy.from_dlpack(t) for t in (xt, wt, bt))
    atol = {"float32": 1e-4, "bfloat16": 8e-2, "float16": 1e-2}[dtype]
    rm, rv = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    crm, crv = cupy.zeros(32, cupy.float32), cupy.ones(32, cupy.float32)
    y = fastreg.batch_norm(x, w, b, crm, crv)[0]
    yt = F.batch_norm(xt, rm, rv, wt, bt, training=True)
    assert (torch.from_dlpack(y).float() - yt.float()).abs().max().item() <= atol
    assert (torch.from_dlpack(crv) - rv).abs().max().item() <= 1e-5
    y = fastreg.group_norm(x, 8, w, b)[0]
    yt = F.group_norm(xt, 8, wt, bt)
    assert (torch.from_dlpack(y).float() - yt.float()).abs().max().item() <= atol
    y = fastreg.instance_norm(x, w, b)[0]
    yt = F.instance_norm(xt, weight=wt, bias=bt)
    assert (torch.from_dlpack(y).float() - yt.float()).abs().max().item() <= atol
