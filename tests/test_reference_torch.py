"""The NumPy reference against PyTorch's ops and autograd (skipped without torch)."""

import numpy as np
import pytest

from _assert import assert_close
from cases import BATCH_NORM, GROUP_NORM, INSTANCE_NORM, LAYER_NORM, RMS_NORM

# --------------------------------------------------------------------------- PyTorch

torch = pytest.importorskip("torch", reason="PyTorch cross-checks need torch")
F = torch.nn.functional


def _t(a, grad=False):
    return None if a is None else torch.tensor(np.ascontiguousarray(a), requires_grad=grad)


def _torch_grads(y_t, cot, tensors):
    y_t.backward(torch.tensor(cot))
    return [None if t is None else t.grad.numpy() for t in tensors]


def _check_against_torch(op, d, y_t, inputs_t, cot, case):
    saved = op.forward(d, "reference")
    assert_close(saved[0], y_t.detach().numpy(), rtol=1e-10, atol=1e-10, case=f"{case} y")
    grads = op.backward(d, saved, cot, "reference")
    tgrads = _torch_grads(y_t, cot, inputs_t)
    for name, g, tg in zip(("dx", "dweight", "dbias"), grads, tgrads):
        if tg is not None:
            assert_close(g, tg, rtol=1e-9, atol=1e-9, case=f"{case} {name}")
    return saved


def test_reference_layer_norm_matches_torch(rng):
    d = LAYER_NORM.make(rng, (4, 3, 5), np.float64, {"normalized_ndim": 2})
    x, w, b = _t(d["x"], True), _t(d["weight"], True), _t(d["bias"], True)
    y = F.layer_norm(x, (3, 5), w, b, 1e-5)
    _check_against_torch(LAYER_NORM, d, y, [x, w, b], rng.standard_normal((4, 3, 5)), "layer_norm")


def test_reference_rms_norm_matches_torch(rng):
    d = RMS_NORM.make(rng, (6, 7), np.float64, {})
    x, w = _t(d["x"], True), _t(d["weight"], True)
    y = F.rms_norm(x, (7,), w, 1e-6)
    _check_against_torch(RMS_NORM, d, y, [x, w], rng.standard_normal((6, 7)), "rms_norm")


@pytest.mark.parametrize("training", [True, False])
def test_reference_batch_norm_matches_torch_with_running_stats(training, rng):
    d = BATCH_NORM.make(rng, (5, 4, 3, 2), np.float64, {"training": training})
    d["running_mean"] = d["running_mean"].astype(np.float64)
    d["running_var"] = d["running_var"].astype(np.float64)
    rm, rv = _t(d["running_mean"]), _t(d["running_var"])
    x, w, b = _t(d["x"], True), _t(d["weight"], True), _t(d["bias"], True)
    y = F.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-5)
    _check_against_torch(BATCH_NORM, d, y, [x, w, b], rng.standard_normal(x.shape), "batch_norm")
    assert_close(d["running_mean"], rm.numpy(), rtol=1e-12, atol=1e-12, case="running_mean")
    assert_close(d["running_var"], rv.numpy(), rtol=1e-12, atol=1e-12, case="running_var")


def test_reference_batch_norm_nhwc_and_relu_match_torch(rng):
    d = BATCH_NORM.make(rng, (5, 3, 2, 4), np.float64, {"axis": -1, "activation": "relu"})
    xn = torch.tensor(d["x"].transpose(0, 3, 1, 2).copy(), requires_grad=True)
    w, b = _t(d["weight"], True), _t(d["bias"], True)
    y = F.relu(F.batch_norm(xn, None, None, w, b, training=True, eps=1e-5))
    d["running_mean"] = d["running_var"] = None
    saved = BATCH_NORM.forward(d, "reference")
    assert_close(saved[0], y.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-10, atol=1e-10,
                 case="batch_norm nhwc relu y")
    cot = rng.standard_normal(d["x"].shape)
    grads = BATCH_NORM.backward(d, saved, cot, "reference")
    y.backward(torch.tensor(cot.transpose(0, 3, 1, 2).copy()))
    assert_close(grads[0], xn.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-9, atol=1e-9, case="dx")
    assert_close(grads[1], w.grad.numpy(), rtol=1e-9, atol=1e-9, case="dweight")


def test_reference_group_norm_matches_torch(rng):
    d = GROUP_NORM.make(rng, (3, 6, 4, 5), np.float64, {"G": 3})
    x, w, b = _t(d["x"], True), _t(d["weight"], True), _t(d["bias"], True)
    y = F.group_norm(x, 3, w, b, 1e-5)
    _check_against_torch(GROUP_NORM, d, y, [x, w, b], rng.standard_normal(x.shape), "group_norm")


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_reference_instance_norm_matches_torch_with_running_stats(use_input_stats, rng):
    d = INSTANCE_NORM.make(rng, (3, 4, 5, 2), np.float64, {"use_input_stats": use_input_stats})
    d["running_mean"] = d["running_mean"].astype(np.float64)
    d["running_var"] = d["running_var"].astype(np.float64)
    rm, rv = _t(d["running_mean"]), _t(d["running_var"])
    x, w, b = _t(d["x"], True), _t(d["weight"], True), _t(d["bias"], True)
    y = F.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats, momentum=0.3, eps=1e-5)
    _check_against_torch(INSTANCE_NORM, d, y, [x, w, b], rng.standard_normal(x.shape),
                         "instance_norm")
    assert_close(d["running_mean"], rm.numpy(), rtol=1e-12, atol=1e-12, case="running_mean")
    assert_close(d["running_var"], rv.numpy(), rtol=1e-12, atol=1e-12, case="running_var")
