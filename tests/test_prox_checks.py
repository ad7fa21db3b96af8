"""Prox family: bad input raises TypeError/ValueError naming the function and the
argument, before any kernel runs; a failing call writes nothing."""

import numpy as np
import pytest

import fastreg

f32, f64 = np.float32, np.float64


def arr(*shape, dtype=f32, fill=0.5):
    return np.full(shape, fill, dtype)


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


W = arr(4, 6)

BAD_CALLS = [
    # prox_l1 / elastic net
    ("l1-list-w", lambda: fastreg.prox_l1([1.0, 2.0], 0.1), TypeError, "prox_l1: 'w' must be a NumPy"),
    ("l1-int-w", lambda: fastreg.prox_l1(np.ones(3, int), 0.1), TypeError, "'w' must be a floating"),
    ("l1-float16", lambda: fastreg.prox_l1(np.ones(3, np.float16), 0.1), TypeError, "float32, float64"),
    ("l1-negative", lambda: fastreg.prox_l1(W, -0.1), ValueError, "prox_l1: 'threshold' must be a finite number >= 0, got -0.1"),
    ("l1-nan", lambda: fastreg.prox_l1(W, float("nan")), ValueError, "'threshold'"),
    ("l1-str", lambda: fastreg.prox_l1(W, "0.1"), TypeError, "'threshold' must be a real number or an array"),
    ("l1-array-dtype", lambda: fastreg.prox_l1(W, arr(4, 6, dtype=f64)), TypeError, "'threshold' must be a number or an array of dtype float32"),
    ("l1-array-shape", lambda: fastreg.prox_l1(W, arr(5, 6)), ValueError, r"'threshold' must be an array that broadcasts to shape \(4, 6\)"),
    ("l1-array-enlarges", lambda: fastreg.prox_l1(W[0], arr(4, 6)), ValueError, "broadcasts to shape"),
    ("l1-array-negative", lambda: fastreg.prox_l1(W, arr(4, 1, fill=-1)), ValueError, "'threshold' must be an array of finite values >= 0"),
    ("l1-array-inf", lambda: fastreg.prox_l1(W, arr(6, fill=np.inf)), ValueError, "'threshold'"),
    ("l1-out-shape", lambda: fastreg.prox_l1(W, 0.1, out=arr(4, 5)), ValueError, r"'out' must be an array of shape \(4, 6\)"),
    ("l1-out-dtype", lambda: fastreg.prox_l1(W, 0.1, out=arr(4, 6, dtype=f64)), TypeError, "'out' must be of dtype float32"),
    ("l1-out-readonly", lambda: fastreg.prox_l1(W, 0.1, out=readonly(W)), ValueError, "'out' must be writeable"),
    ("l1-out-tuple", lambda: fastreg.prox_l1(W, 0.1, out=(W,)), TypeError, "'out' must be an array or None"),
    ("l1-out-partial-overlap", lambda: (lambda b: fastreg.prox_l1(b[:-1], 0.1, out=b[1:]))(arr(9)), ValueError, "'out' must be 'w' itself \\(in place\\) or memory separate from it"),
    ("l1-out-reversed", lambda: (lambda b: fastreg.prox_l1(b, 0.1, out=b[::-1]))(arr(9)), ValueError, "in place"),
    ("l1-out-threshold", lambda: (lambda t: fastreg.prox_l1(W, t, out=t))(arr(4, 6)), ValueError, "'out' must be memory separate from 'threshold'"),
    ("l1-backend", lambda: fastreg.prox_l1(W, 0.1, backend="gpu"), ValueError, "'backend' must be one of"),
    ("en-l2-negative", lambda: fastreg.prox_elastic_net(W, 0.1, -1.0), ValueError, "prox_elastic_net: 'l2' must be a finite number >= 0"),
    ("en-l1-none", lambda: fastreg.prox_elastic_net(W, None, 0.1), TypeError, "'l1' must be a real number or an array"),
    # group ops
    ("group-axis-range", lambda: fastreg.prox_group_l1(W, 0.1, axis=2), ValueError, "prox_group_l1: 'axis' must be axes in \\[-2, 2\\)"),
    ("group-axis-dup", lambda: fastreg.prox_group_l1(W, 0.1, axis=(1, -1)), ValueError, "'axis' must be distinct axes"),
    ("group-axis-float", lambda: fastreg.prox_group_l1(W, 0.1, axis=1.0), TypeError, "'axis' must be None, an integer axis"),
    ("group-axis-missing", lambda: fastreg.prox_group_l1(W, 0.1), TypeError, "axis"),
    ("group-threshold-shape", lambda: fastreg.prox_group_l1(W, arr(4, 6), axis=1), ValueError, r"'threshold' must be an array that broadcasts to shape \(4, 1\)"),
    ("maxnorm-zero", lambda: fastreg.max_norm(W, 0.0, axis=1), ValueError, "max_norm: 'max_value' must be a finite number > 0"),
    ("maxnorm-eps", lambda: fastreg.max_norm(W, 1.0, axis=1, eps=-1e-7), ValueError, "'eps' must be a finite number >= 0"),
    # sgd_step
    ("sgd-lr", lambda: fastreg.sgd_step(arr(3), arr(3), lr=-1.0), ValueError, "sgd_step: 'lr' must be a finite number >= 0"),
    ("sgd-lr-missing", lambda: fastreg.sgd_step(arr(3), arr(3)), TypeError, "lr"),
    ("sgd-no-buffer", lambda: fastreg.sgd_step(arr(3), arr(3), lr=0.1, momentum=0.9), ValueError, "'momentum_buffer' must be an array like 'w' when momentum > 0"),
    ("sgd-nesterov", lambda: fastreg.sgd_step(arr(3), arr(3), lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, momentum_buffer=arr(3)), ValueError, "'nesterov' requires momentum > 0 and dampening == 0"),
    ("sgd-nesterov-no-momentum", lambda: fastreg.sgd_step(arr(3), arr(3), lr=0.1, nesterov=True), ValueError, "'nesterov'"),
    ("sgd-g-shape", lambda: fastreg.sgd_step(arr(3), arr(4), lr=0.1), ValueError, r"'g' must be an array of shape \(3,\)"),
    ("sgd-g-dtype", lambda: fastreg.sgd_step(arr(3), arr(3, dtype=f64), lr=0.1), TypeError, "'g' must be of dtype float32"),
    ("sgd-buf-dtype", lambda: fastreg.sgd_step(arr(3), arr(3), lr=0.1, momentum=0.9, momentum_buffer=arr(3, dtype=f64)), TypeError, "'momentum_buffer' must be of dtype float32"),
    ("sgd-w-readonly", lambda: fastreg.sgd_step(readonly(arr(3)), arr(3), lr=0.1), ValueError, "'w' must be writeable"),
    ("sgd-buf-readonly", lambda: fastreg.sgd_step(arr(3), arr(3), lr=0.1, momentum=0.9, momentum_buffer=readonly(arr(3))), ValueError, "'momentum_buffer' must be writeable"),
    ("sgd-g-is-w", lambda: (lambda w: fastreg.sgd_step(w, w, lr=0.1))(arr(3)), ValueError, "'g' must be memory separate from 'w'"),
    ("sgd-buf-overlaps-w", lambda: (lambda b: fastreg.sgd_step(b[:4], arr(4), lr=0.1, momentum=0.9, momentum_buffer=b[3:7]))(arr(8)), ValueError, "'momentum_buffer' must be memory separate from 'w'"),
    ("sgd-first-step", lambda: fastreg.sgd_step(arr(3), arr(3), lr=0.1, first_step=1), TypeError, "'first_step' must be True or False"),
    ("sgd-maximize", lambda: fastreg.sgd_step(arr(3), arr(3), lr=0.1, maximize="yes"), TypeError, "'maximize'"),
    ("sgd-list-g-array", lambda: fastreg.sgd_step([arr(3)], arr(3), lr=0.1), TypeError, "'g' must be a list of arrays like 'w'"),
    ("sgd-array-g-list", lambda: fastreg.sgd_step(arr(3), [arr(3)], lr=0.1), TypeError, "'g' must be an array when 'w' is an array"),
    ("sgd-list-length", lambda: fastreg.sgd_step([arr(3), arr(2)], [arr(3)], lr=0.1), ValueError, r"'g' must have one array per tensor of 'w' \(2\), got 1"),
    ("sgd-list-duplicate", lambda: (lambda w: fastreg.sgd_step([w, arr(2), w], [arr(3), arr(2), arr(3)], lr=0.1))(arr(3)), ValueError, r"'w\[2\]' must be memory separate from 'w\[0\]'"),
    ("sgd-list-g-shape", lambda: fastreg.sgd_step([arr(3), arr(2)], [arr(3), arr(3)], lr=0.1), ValueError, r"'g\[1\]' must be an array of shape \(2,\)"),
    ("sgd-list-int", lambda: fastreg.sgd_step([arr(3), np.ones(2, int)], [arr(3), np.ones(2, int)], lr=0.1), TypeError, r"'w\[1\]' must be a floating"),
    ("sgd-list-buffer-alias", lambda: (lambda b: fastreg.sgd_step([arr(3), arr(3)], [arr(3), arr(3)], lr=0.1, momentum=0.5, momentum_buffer=[b, b]))(arr(3)), ValueError, r"'momentum_buffer\[1\]' must be memory separate from 'momentum_buffer\[0\]'"),
    # adam / adamw
    ("adam-step-zero", lambda: fastreg.adamw_step(arr(3), arr(3), arr(3), arr(3), step=0, lr=0.1), ValueError, "adamw_step: 'step' must be an integer >= 1"),
    ("adam-step-float", lambda: fastreg.adamw_step(arr(3), arr(3), arr(3), arr(3), step=1.0, lr=0.1), TypeError, "'step' must be an integer"),
    ("adam-betas-range", lambda: fastreg.adam_step(arr(3), arr(3), arr(3), arr(3), step=1, lr=0.1, betas=(1.0, 0.9)), ValueError, r"adam_step: 'betas\[0\]' must be a finite number >= 0 and < 1"),
    ("adam-betas-pair", lambda: fastreg.adam_step(arr(3), arr(3), arr(3), arr(3), step=1, lr=0.1, betas=0.9), TypeError, "'betas' must be a pair"),
    ("adam-eps", lambda: fastreg.adam_step(arr(3), arr(3), arr(3), arr(3), step=1, lr=0.1, eps=-1.0), ValueError, "'eps'"),
    ("adam-amsgrad-no-max", lambda: fastreg.adamw_step(arr(3), arr(3), arr(3), arr(3), step=1, lr=0.1, amsgrad=True), ValueError, "'max_exp_avg_sq' must be an array like 'w' when amsgrad=True"),
    ("adam-m-shape", lambda: fastreg.adamw_step(arr(3), arr(3), arr(4), arr(3), step=1, lr=0.1), ValueError, "'exp_avg' must be an array of shape"),
    ("adam-v-dtype", lambda: fastreg.adamw_step(arr(3), arr(3), arr(3), arr(3, dtype=f64), step=1, lr=0.1), TypeError, "'exp_avg_sq' must be of dtype float32"),
    ("adam-v-readonly", lambda: fastreg.adamw_step(arr(3), arr(3), arr(3), readonly(arr(3)), step=1, lr=0.1), ValueError, "'exp_avg_sq' must be writeable"),
    ("adam-m-is-v", lambda: (lambda m: fastreg.adamw_step(arr(3), arr(3), m, m, step=1, lr=0.1))(arr(3)), ValueError, "'exp_avg_sq' must be memory separate from 'exp_avg'"),
    ("adam-decoupled-float", lambda: fastreg.adam_step(arr(3), arr(3), arr(3), arr(3), step=1, lr=0.1, decoupled_weight_decay=0.01), TypeError, "'decoupled_weight_decay' must be True or False"),
    ("adam-wd-negative", lambda: fastreg.adamw_step(arr(3), arr(3), arr(3), arr(3), step=1, lr=0.1, weight_decay=-0.1), ValueError, "'weight_decay'"),
    # cross-entropy
    ("ce-1d", lambda: fastreg.cross_entropy_label_smoothing(arr(5), np.zeros(5, int), smoothing=0.1), ValueError, "cross_entropy_label_smoothing: 'logits' must be a 2-D array"),
    ("ce-no-classes", lambda: fastreg.cross_entropy_label_smoothing(arr(5, 0), np.zeros(5, int), smoothing=0.1), ValueError, "at least one class"),
    ("ce-target-float", lambda: fastreg.cross_entropy_label_smoothing(arr(5, 3), np.zeros(5), smoothing=0.1), TypeError, "'target' must be an integer array"),
    ("ce-target-list", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 3), [0, 1], smoothing=0.1), TypeError, "'target' must be an integer array"),
    ("ce-target-shape", lambda: fastreg.cross_entropy_label_smoothing(arr(5, 3), np.zeros(4, int), smoothing=0.1), ValueError, r"'target' must have shape \(5,\)"),
    ("ce-target-range", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 3), np.array([0, 3]), smoothing=0.1), ValueError, r"'target' must hold class indices in \[0, 3\), got 3"),
    ("ce-target-negative", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 3), np.array([0, -100]), smoothing=0.1), ValueError, "got -100"),
    ("ce-smoothing", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 3), np.zeros(2, int), smoothing=1.5), ValueError, "'smoothing' must be a finite number >= 0 and <= 1"),
    ("ce-reduction", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 3), np.zeros(2, int), smoothing=0.1, reduction="avg"), ValueError, "'reduction' must be one of 'mean', 'sum', 'none'"),
    ("ce-style", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 3), np.zeros(2, int), smoothing=0.1, style="lecture"), ValueError, "'style' must be one of 'uniform', 'others'"),
    ("ce-others-k1", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 1), np.zeros(2, int), smoothing=0.1, style="others"), ValueError, "needs K >= 2"),
    ("ce-ignore-float", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 3), np.zeros(2, int), smoothing=0.1, ignore_index=-1.0), TypeError, "'ignore_index' must be an integer"),
    ("ce-out-loss-shape", lambda: fastreg.cross_entropy_label_smoothing(arr(2, 3), np.zeros(2, int), smoothing=0.1, out=(arr(2), None)), ValueError, r"'out\[0\] \(loss\)' must be an array of shape \(\)"),
    ("ce-out-dlogits-overlap", lambda: (lambda z: fastreg.cross_entropy_label_smoothing(z, np.zeros(2, int), smoothing=0.1, out=(None, z[::-1])))(arr(2, 3)), ValueError, r"'out\[1\] \(dlogits\)' must be memory separate from 'logits'"),
    ("ce-out-loss-in-logits", lambda: (lambda z: fastreg.cross_entropy_label_smoothing(z, np.zeros(2, int), smoothing=0.1, out=(z[0, :1].reshape(()), z)))(arr(2, 3)), ValueError, r"'out\[0\] \(loss\)' must be memory separate from 'logits'"),
    # scaling
    ("std-mean-only", lambda: fastreg.standardize(W, mean=arr(6)), ValueError, "standardize: 'mean' and 'std' must be given together"),
    ("std-std-zero", lambda: fastreg.standardize(W, mean=arr(6), std=arr(6, fill=0)), ValueError, "'std' must be an array of finite values > 0"),
    ("std-mean-shape", lambda: fastreg.standardize(W, mean=arr(4), std=arr(4)), ValueError, r"'mean' must be an array of shape \(6,\)"),
    ("std-mean-dtype", lambda: fastreg.standardize(W, mean=arr(6, dtype=f64), std=arr(6)), TypeError, "'mean' must be of dtype float32"),
    ("std-eps", lambda: fastreg.standardize(W, eps=-1.0), ValueError, "'eps'"),
    ("std-axis", lambda: fastreg.standardize(W, axis=3), ValueError, "'axis'"),
    ("std-empty-fit", lambda: fastreg.standardize(arr(0, 3)), ValueError, "'x' must have at least one element along axis"),
    ("std-apply-out-stats", lambda: fastreg.standardize(W, mean=arr(6), std=arr(6), out=(None, arr(6), None)), ValueError, r"'out\[1\] \(mean\)' must be None because this output is not computed"),
    ("mm-range-order", lambda: fastreg.min_max_scale(W, feature_range=(1.0, 0.0)), ValueError, "min_max_scale: 'feature_range' must have min < max"),
    ("mm-range-type", lambda: fastreg.min_max_scale(W, feature_range=1.0), TypeError, "'feature_range' must be a pair"),
    ("mm-max-only", lambda: fastreg.min_max_scale(W, data_max=arr(6)), ValueError, "'data_min' and 'data_max' must be given together"),
    ("mm-empty-fit", lambda: fastreg.min_max_scale(arr(0, 3)), ValueError, "at least one element"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_naming_the_argument(call, exc, match):
    before = W.copy()
    with pytest.raises(exc, match=match):
        call()
    assert np.array_equal(W, before)


def test_failed_list_step_writes_nothing():
    """The third tensor's gradient has the wrong dtype: no tensor may be updated."""
    ws = [arr(5), arr(7), arr(3)]
    bufs = [arr(5), arr(7), arr(3)]
    gs = [arr(5), arr(7), arr(3, dtype=f64)]
    with pytest.raises(TypeError, match=r"'g\[2\]'"):
        fastreg.sgd_step(ws, gs, lr=0.1, momentum=0.9, momentum_buffer=bufs)
    assert all(np.all(a == 0.5) for a in ws + bufs)


def test_failed_prox_writes_nothing():
    w, out = arr(4, 6), arr(4, 6, fill=3.0)
    with pytest.raises(ValueError, match="'threshold'"):
        fastreg.prox_l1(w, arr(6, fill=-1.0), out=out)
    assert np.all(out == 3.0)


def test_interleaved_views_are_not_an_overlap():
    """w and its gradient in alternate elements of one buffer share no element."""
    buf = np.arange(10, dtype=f32)
    w, g = buf[::2], buf[1::2]
    fastreg.sgd_step(w, g, lr=0.5)
    assert np.array_equal(buf[::2], np.arange(0, 10, 2) - 0.5 * np.arange(1, 10, 2))
    assert np.array_equal(buf[1::2], np.arange(1, 10, 2))


def test_momentum_buffer_is_ignored_without_momentum():
    w, b = arr(4), arr(4, fill=9.0)
    fastreg.sgd_step(w, arr(4), lr=1.0, momentum_buffer=b)
    assert np.all(w == 0) and np.all(b == 9.0)


class _FakeCupyArray:
    __module__ = "cupy"
    dtype = np.dtype(f32)
    shape = (2, 3)
    ndim = 2


_FakeCupyArray.__name__ = "ndarray"


def test_gpu_backends_raise_a_clear_error_until_the_prox_kernels_exist():
    with pytest.raises(RuntimeError, match="prox_l1: the 'cuda' backend does not implement"):
        fastreg.prox_l1(_FakeCupyArray(), 0.1)
    with pytest.raises(RuntimeError, match="sgd_step: the 'cuda' backend does not implement"):
        fastreg.sgd_step(_FakeCupyArray(), _FakeCupyArray(), lr=0.1)
    w = arr(3)
    with pytest.raises(RuntimeError, match="adamw_step: the 'cuda_emulator' backend does not"):
        fastreg.adamw_step(w, arr(3), arr(3), arr(3), step=1, lr=0.1, backend="cuda_emulator")
    assert np.all(w == 0.5)


def test_mixed_libraries_raise_type_error():
    with pytest.raises(TypeError, match="one library"):
        fastreg.sgd_step(arr(2, 3), _FakeCupyArray(), lr=0.1)
