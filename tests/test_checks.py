"""Bad input raises a clear TypeError/ValueError naming the argument, before any
kernel runs: nothing is written, running statistics are untouched."""

import numpy as np
import pytest

import fastreg

f32 = np.float32


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((4, 6, 3, 3)).astype(f32)


def ones(*shape, dtype=f32):
    return np.ones(shape, dtype)


BAD_CALLS = [
    # (id, call(x), exception, message fragment)
    ("list-x", lambda x: fastreg.layer_norm(x.tolist()), TypeError, "'x' must be a NumPy"),
    ("int-x", lambda x: fastreg.layer_norm(x.astype(np.int64)), TypeError, "'x' must be a floating"),
    ("complex-x", lambda x: fastreg.rms_norm(x.astype(np.complex64)), TypeError, "'x'"),
    ("float16-cpu", lambda x: fastreg.batch_norm(x.astype(np.float16)), TypeError, "float32, float64"),
    ("bool-x", lambda x: fastreg.group_norm(x.astype(bool), 2), TypeError, "'x'"),
    ("eps-negative", lambda x: fastreg.layer_norm(x, eps=-1.0), ValueError, "'eps' must be a finite number > 0, got -1.0"),
    ("eps-zero", lambda x: fastreg.rms_norm(x, eps=0), ValueError, "'eps'"),
    ("eps-nan", lambda x: fastreg.batch_norm(x, eps=float("nan")), ValueError, "'eps'"),
    ("eps-str", lambda x: fastreg.layer_norm(x, eps="1e-5"), TypeError, "'eps' must be a real number"),
    ("momentum-high", lambda x: fastreg.batch_norm(x, momentum=1.5), ValueError, "'momentum'"),
    ("momentum-neg", lambda x: fastreg.instance_norm(x, momentum=-0.1), ValueError, "'momentum'"),
    ("activation", lambda x: fastreg.batch_norm(x, activation="gelu"), ValueError, "'activation' must be one of None, 'relu'"),
    ("axis-out-of-range", lambda x: fastreg.batch_norm(x, axis=4), ValueError, "'axis'"),
    ("axis-float", lambda x: fastreg.batch_norm(x, axis=1.0), TypeError, "'axis'"),
    ("gn-axis-middle", lambda x: fastreg.group_norm(x, 2, axis=2), ValueError, r"'axis' must be 1 \(channels first\) or -1"),
    ("gn-groups-divide", lambda x: fastreg.group_norm(x, 4), ValueError, "'num_groups' must divide the number of channels 6, got 4"),
    ("gn-groups-zero", lambda x: fastreg.group_norm(x, 0), ValueError, "'num_groups'"),
    ("gn-groups-float", lambda x: fastreg.group_norm(x, 2.0), TypeError, "'num_groups'"),
    ("ln-ndim", lambda x: fastreg.layer_norm(x, normalized_ndim=5), ValueError, "'normalized_ndim'"),
    ("ln-weight-shape", lambda x: fastreg.layer_norm(x, ones(4)), ValueError, r"'weight' must be an array of shape \(3,\), got shape \(4,\)"),
    ("ln-weight-dtype", lambda x: fastreg.layer_norm(x, ones(3, dtype=np.float64)), TypeError, "'weight' must be of dtype float32"),
    ("ln-bias-shape", lambda x: fastreg.layer_norm(x, ones(3), ones(2)), ValueError, "'bias'"),
    ("rms-weight-list", lambda x: fastreg.rms_norm(x, [1.0, 1.0, 1.0]), TypeError, "'weight'"),
    ("bn-weight-shape", lambda x: fastreg.batch_norm(x, ones(3)), ValueError, "'weight'"),
    ("bn-1d", lambda x: fastreg.batch_norm(x[0, 0, 0]), ValueError, "'x' must be an array with at least 2 dimensions"),
    ("bn-running-mean-only", lambda x: fastreg.batch_norm(x, running_mean=ones(6)), ValueError, "'running_mean' and 'running_var' must be given together"),
    ("bn-eval-no-stats", lambda x: fastreg.batch_norm(x, training=False), ValueError, "'running_mean' and 'running_var' must be arrays"),
    ("bn-running-shape", lambda x: fastreg.batch_norm(x, running_mean=ones(5), running_var=ones(5)), ValueError, "'running_mean'"),
    ("bn-running-int", lambda x: fastreg.batch_norm(x, running_mean=ones(6, dtype=int), running_var=ones(6)), TypeError, "'running_mean'"),
    ("bn-running-readonly", lambda x: fastreg.batch_norm(x, running_mean=np.broadcast_to(f32(0), (6,)), running_var=ones(6)), ValueError, "'running_mean' must be writeable"),
    ("bn-one-value", lambda x: fastreg.batch_norm(x[:1, :, :1, :1]), ValueError, "more than 1 value per channel"),
    ("bn-training-flag", lambda x: fastreg.batch_norm(x, training=1), TypeError, "'training'"),
    ("in-2d", lambda x: fastreg.instance_norm(x[:, :, 0, 0]), ValueError, "at least 3 dimensions"),
    ("in-one-position", lambda x: fastreg.instance_norm(x[:, :, :1, :1]), ValueError, "more than 1 spatial element"),
    ("in-eval-no-stats", lambda x: fastreg.instance_norm(x, use_input_stats=False), ValueError, "'running_mean'"),
    ("backend-unknown", lambda x: fastreg.layer_norm(x, backend="tpu"), ValueError, "'backend' must be one of"),
    ("out-not-tuple", lambda x: fastreg.layer_norm(x, out=np.empty_like(x)), TypeError, "'out' must be a tuple of 3"),
    ("out-wrong-len", lambda x: fastreg.layer_norm(x, out=(None, None)), TypeError, "'out'"),
    ("out-shape", lambda x: fastreg.layer_norm(x, out=(np.empty((4, 6, 3, 2), f32), None, None)), ValueError, r"out\[0\] \(y\)"),
    ("out-dtype", lambda x: fastreg.layer_norm(x, out=(None, np.empty((4, 6, 3)), None)), TypeError, r"out\[1\] \(mean\)"),
    ("out-readonly", lambda x: fastreg.layer_norm(x, out=(np.broadcast_to(f32(0), x.shape), None, None)), ValueError, "writeable"),
    ("out-aliases-x", lambda x: fastreg.layer_norm(x, out=(x, None, None)), ValueError, "memory separate from 'x'"),
    ("out-aliases-out", lambda x: (lambda y: fastreg.batch_norm(x, out=(None, y[:6], y[6:])))(np.empty(12, f32)), None, None),
    ("bwd-dy-shape", lambda x: fastreg.layer_norm_backward(x[:2], x, ones(4, 6, 3), ones(4, 6, 3)), ValueError, "'dy'"),
    ("bwd-mean-shape", lambda x: fastreg.layer_norm_backward(x, x, ones(4, 6), ones(4, 6, 3)), ValueError, "'mean'"),
    ("bwd-rstd-dtype", lambda x: fastreg.rms_norm_backward(x, x, ones(4, 6, 3, dtype=np.float64)), TypeError, "'rstd'"),
    ("bwd-relu-no-y", lambda x: fastreg.batch_norm_backward(x, x, ones(6), ones(6), activation="relu"), ValueError, "'y'"),
    ("bwd-gn-stats", lambda x: fastreg.group_norm_backward(x, x, ones(4, 3), ones(4, 3), 2), ValueError, "'mean'"),
    ("bwd-dweight-not-computed", lambda x: fastreg.layer_norm_backward(x, x, ones(4, 6, 3), ones(4, 6, 3), out=(None, ones(3), None)), ValueError, r"'out\[1\] \(dweight\)' must be None"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(x, call, exc, match):
    before = x.copy()
    if exc is None:  # a valid call (distinct out buffers): must not raise
        call(x)
        return
    with pytest.raises(exc, match=match):
        call(x)
    assert np.array_equal(x, before), "x was modified by a failing call"


def test_failed_call_writes_nothing(x):
    rm, rv = np.zeros(6, f32), np.ones(6, f32)
    y = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="'activation'"):
        fastreg.batch_norm(x, running_mean=rm, running_var=rv, activation="tanh",
                           out=(y, None, None))
    assert (rm == 0).all() and (rv == 1).all() and (y == 7.0).all()


class _FakeCupyArray:
    """Looks like a cupy.ndarray to the dispatcher without CuPy installed."""
    __module__ = "cupy"
    dtype = np.dtype(np.float32)
    shape = (2, 3)
    ndim = 2


_FakeCupyArray.__name__ = "ndarray"


def test_cupy_arrays_go_to_the_cuda_backend():
    from fastreg import _backend
    assert _backend.select("norm", _FakeCupyArray()).__name__ == "fastreg.cuda.norm"
    assert _backend.select("norm", _FakeCupyArray(), caller="batch_norm").batch_norm


def test_mixed_libraries_raise_type_error(x):
    with pytest.raises(TypeError, match="one library"):
        fastreg.batch_norm(x, _FakeCupyArray())


def test_reference_backend_rejects_cupy_arrays():
    with pytest.raises(TypeError, match="'backend' 'reference' runs numpy arrays"):
        fastreg.layer_norm(_FakeCupyArray(), backend="reference")


def test_empty_batches_return_empty_outputs():
    x = np.empty((0, 4, 3), f32)
    for y, *_ in [fastreg.layer_norm(x), fastreg.batch_norm(x), fastreg.group_norm(x, 2),
                  fastreg.instance_norm(x), fastreg.rms_norm(x)]:
        assert y.shape == x.shape
    rm, rv = np.zeros(4, f32), np.ones(4, f32)
    fastreg.batch_norm(x, running_mean=rm, running_var=rv)
    assert (rm == 0).all() and (rv == 1).all(), "an empty batch must not move running stats"
