"""The prox family's NumPy reference against definitions (float64).

Proximal operators: optimality conditions (0 in y - v + t * subdifferential)
and the argmin property against random perturbations; optimizer steps: an
independent scalar transcription of PyTorch's documented algorithms, and
proximal gradient reaching the lasso's optimality conditions with exact
zeros; cross-entropy: finite differences and the explicit soft-target sum;
scaling: the statistics of the result. The PyTorch cross-checks are in
test_prox_torch.py. Each check runs on both backends where that is cheap.
"""

import math

import numpy as np
import pytest

import fastreg
from _assert import assert_close

BACKENDS = ["reference", "cpu"]


def _objective(x, v, penalty):
    return 0.5 * np.sum((x - v) ** 2) + penalty(x)


def _assert_argmin(y, v, penalty, rng, case, trials=200, scale=1e-3):
    """No random nearby point has a lower objective than y."""
    fy = _objective(y, v, penalty)
    for _ in range(trials):
        d = rng.standard_normal(y.shape) * scale * rng.choice([1.0, 10.0, 100.0])
        assert _objective(y + d, v, penalty) >= fy - 1e-12, f"{case}: not the minimizer"


# --------------------------------------------------------------------------- prox L1 / elastic net

@pytest.mark.parametrize("backend", BACKENDS)
def test_prox_l1_optimality_and_argmin(backend, rng):
    v = rng.standard_normal(200) * 2
    t = rng.uniform(0, 2, 200)
    y = fastreg.prox_l1(v, t, backend=backend)
    nz = y != 0
    assert 0 < nz.sum() < y.size, "want both zero and nonzero coordinates"
    # 0 in y - v + t * d|y|: equality where y != 0, |v| <= t where y == 0
    assert np.allclose((y - v + t * np.sign(y))[nz], 0, atol=1e-12)
    assert np.all(np.abs(v[~nz]) <= t[~nz])
    _assert_argmin(y, v, lambda x: np.sum(t * np.abs(x)), rng, f"prox_l1 {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prox_elastic_net_optimality_and_argmin(backend, rng):
    v = rng.standard_normal(200) * 2
    l1, l2 = rng.uniform(0, 1.5, 200), 0.7
    y = fastreg.prox_elastic_net(v, l1, l2, backend=backend)
    nz = y != 0
    assert 0 < nz.sum() < y.size
    assert np.allclose((y - v + l1 * np.sign(y) + l2 * y)[nz], 0, atol=1e-12)
    assert np.all(np.abs(v[~nz]) <= l1[~nz])
    _assert_argmin(y, v, lambda x: np.sum(l1 * np.abs(x)) + 0.5 * l2 * np.sum(x * x), rng,
                   f"prox_elastic_net {backend}")


def test_prox_elastic_net_without_l2_is_prox_l1(rng):
    v = rng.standard_normal(100)
    for backend in BACKENDS:
        assert np.array_equal(fastreg.prox_elastic_net(v, 0.4, 0.0, backend=backend),
                              fastreg.prox_l1(v, 0.4, backend=backend))


# --------------------------------------------------------------------------- group lasso / max-norm

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [1, 0, (1, 2)])
def test_prox_group_l1_block_optimality_and_argmin(axis, backend, rng):
    v = rng.standard_normal((6, 5, 4))
    ax = (axis,) if isinstance(axis, int) else axis
    norms = np.sqrt(np.sum(v * v, axis=ax, keepdims=True))
    t = np.full(norms.shape, float(np.median(norms)))    # about half the groups vanish
    y = fastreg.prox_group_l1(v, t, axis=axis, backend=backend)
    yn = np.sqrt(np.sum(y * y, axis=ax, keepdims=True))
    zero = (yn == 0)
    assert zero.any() and (~zero).any()
    # y_g != 0: y_g - v_g + t y_g / |y_g| = 0;  y_g == 0: |v_g| <= t
    with np.errstate(invalid="ignore", divide="ignore"):
        resid = np.where(zero, 0.0, y - v + t * y / yn)
    assert np.allclose(resid, 0, atol=1e-12)
    assert np.all(norms[zero] <= t[zero])
    assert np.all(y[np.broadcast_to(zero, y.shape)] == 0), "vanishing groups must be exact zeros"
    _assert_argmin(y, v, lambda x: np.sum(t * np.sqrt(np.sum(x * x, axis=ax, keepdims=True))),
                   rng, f"prox_group_l1 {backend} axis={axis}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_norm_is_the_projection_onto_the_ball(backend, rng):
    v = rng.standard_normal((8, 10)) * rng.uniform(0.1, 2, (8, 1))
    c = 3.0
    y = fastreg.max_norm(v, c, axis=1, eps=0.0, backend=backend)
    vn = np.linalg.norm(v, axis=1)
    yn = np.linalg.norm(y, axis=1)
    inside = vn <= c
    assert inside.any() and (~inside).any()
    assert np.array_equal(y[inside], v[inside]), "groups inside the ball must not change"
    assert np.allclose(yn[~inside], c, rtol=1e-14)
    assert np.allclose(y[~inside] * vn[~inside, None] / c, v[~inside], rtol=1e-13)
    # no point of the ball is closer to v than its projection
    for _ in range(200):
        z = rng.standard_normal(y.shape)
        z *= np.minimum(1, c / np.linalg.norm(z, axis=1))[:, None] * rng.uniform(0, 1, (8, 1))
        assert np.all(np.linalg.norm(z - v, axis=1) >= np.linalg.norm(y - v, axis=1) - 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_norm_default_matches_keras_formula(backend, rng):
    """Keras: w * clip(n, 0, c) / (epsilon + n), epsilon = 1e-7, norms over ``axis``."""
    w = rng.standard_normal((3, 3, 4, 6))          # Keras conv kernel (kh, kw, in, out)
    n = np.sqrt(np.sum(w * w, axis=(0, 1, 2), keepdims=True))
    keras = w * (np.clip(n, 0, 2.0) / (1e-7 + n))
    assert_close(fastreg.max_norm(w, 2.0, axis=(0, 1, 2), backend=backend), keras,
                 rtol=1e-14, atol=1e-15, case="max_norm vs Keras formula")


# --------------------------------------------------------------------------- optimizer steps

def _torch_sgd_scalar(w, g, buf, *, lr, momentum, dampening, nesterov, maximize, weight_decay,
                      first):
    """torch.optim.SGD's documented algorithm for one scalar."""
    g = -g if maximize else g
    if weight_decay:
        g = g + weight_decay * w
    if momentum:
        buf = g if first else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return w - lr * g, buf


def _torch_adam_scalar(w, g, m, v, vmax, *, step, lr, beta1, beta2, eps, weight_decay,
                       decoupled, amsgrad, maximize):
    """torch.optim.Adam/AdamW's documented algorithm for one scalar."""
    g = -g if maximize else g
    if decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1 ** step)
    if amsgrad:
        vmax = max(vmax, v)
        vhat = vmax / (1 - beta2 ** step)
    else:
        vhat = v / (1 - beta2 ** step)
    return w - lr * mhat / (math.sqrt(vhat) + eps), m, v, vmax


def _soft(x, t):
    return math.copysign(max(abs(x) - t, 0.0), x)


@pytest.mark.parametrize("variant", [
    dict(momentum=0.0, dampening=0.0, nesterov=False, maximize=False, weight_decay=0.0),
    dict(momentum=0.9, dampening=0.2, nesterov=False, maximize=True, weight_decay=0.1),
    dict(momentum=0.8, dampening=0.0, nesterov=True, maximize=False, weight_decay=0.05),
])
def test_reference_sgd_follows_the_documented_algorithm(variant, rng):
    n, lr, dwd, l1 = 50, 0.05, 0.3, 0.2
    w, buf = rng.standard_normal(n), np.zeros(n)
    ws, bufs = w.copy(), buf.copy()
    for step in range(1, 30):
        g = rng.standard_normal(n)
        fastreg.sgd_step(w, g, lr=lr, momentum_buffer=buf if variant["momentum"] else None,
                         first_step=step == 1, decoupled_weight_decay=dwd, l1=l1,
                         backend="reference", **variant)
        for i in range(n):
            # the decoupled decay and the prox wrap torch's update: the gradient's
            # L2 term sees w before the decay
            wi, bufs[i] = _torch_sgd_scalar(ws[i], g[i], bufs[i], lr=lr, first=step == 1,
                                            **variant)
            wi -= ws[i] * lr * dwd
            ws[i] = _soft(wi, lr * l1)
        assert_close(w, ws, rtol=1e-12, atol=1e-14, case=f"sgd step {step}")


@pytest.mark.parametrize("op,variant", [
    ("adamw_step", dict(weight_decay=0.1, amsgrad=False, maximize=False)),
    ("adamw_step", dict(weight_decay=0.0, amsgrad=True, maximize=True)),
    ("adam_step", dict(weight_decay=0.1, amsgrad=True, maximize=False)),
])
def test_reference_adam_follows_the_documented_algorithm(op, variant, rng):
    n, lr, l1, betas, eps = 40, 0.01, 0.05, (0.8, 0.95), 1e-6
    w = rng.standard_normal(n)
    m, v, vmax = np.zeros(n), np.zeros(n), np.zeros(n)
    s = [w.copy(), m.copy(), v.copy(), vmax.copy()]
    for step in range(1, 40):
        g = rng.standard_normal(n)
        getattr(fastreg, op)(w, g, m, v, step=step, lr=lr, betas=betas, eps=eps,
                             max_exp_avg_sq=vmax, l1=l1, backend="reference", **variant)
        for i in range(n):
            wi, s[1][i], s[2][i], s[3][i] = _torch_adam_scalar(
                s[0][i], g[i], s[1][i], s[2][i], s[3][i], step=step, lr=lr, beta1=betas[0],
                beta2=betas[1], eps=eps, decoupled=op == "adamw_step", **variant)
            s[0][i] = _soft(wi, lr * l1)
        for name, a, b in zip(("w", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), (w, m, v, vmax), s):
            assert_close(a, b, rtol=1e-12, atol=1e-15, case=f"{op} step {step} {name}")


def test_adamw_is_adam_with_decoupled_weight_decay(rng):
    for backend in BACKENDS:
        w, g = rng.standard_normal(100), rng.standard_normal(100)
        states = [[w.copy(), np.zeros(100), np.zeros(100)] for _ in range(2)]
        fastreg.adamw_step(*states[0][:1], g, *states[0][1:], step=1, lr=0.1, weight_decay=0.3,
                           backend=backend)
        fastreg.adam_step(*states[1][:1], g, *states[1][1:], step=1, lr=0.1, weight_decay=0.3,
                          decoupled_weight_decay=True, backend=backend)
        for a, b in zip(*states):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_proximal_sgd_solves_the_lasso_with_exact_zeros(backend, dtype, rng):
    """sgd_step with l1 = lambda is ISTA on 1/2 |Ax - b|^2 + lambda |x|_1: it reaches the
    optimality conditions, with exact zeros; the subgradient method does not."""
    A = rng.standard_normal((40, 60)) / np.sqrt(40)
    x_true = np.where(rng.random(60) < 0.15, rng.standard_normal(60) * 3, 0.0)
    b = A @ x_true + 0.01 * rng.standard_normal(40)
    lam, lr = 0.1, 1.0 / np.linalg.norm(A, 2) ** 2
    x = np.zeros(60, dtype)
    x_sub = np.zeros(60, dtype)
    for _ in range(3000):
        fastreg.sgd_step(x, (A.T @ (A @ x - b)).astype(dtype), lr=lr, l1=lam, backend=backend)
        g_sub = A.T @ (A @ x_sub - b) + lam * np.sign(x_sub)
        fastreg.sgd_step(x_sub, g_sub.astype(dtype), lr=lr, backend=backend)
    grad = A.T @ (A @ x.astype(np.float64) - b)
    zero = x == 0
    tol_ = 1e-4 if dtype == np.float32 else 1e-8
    assert zero.sum() >= 20, "the L1 prox should leave many exact zeros"
    assert np.all(np.abs(grad[zero]) <= lam + tol_), "0 in grad + lambda * [-1, 1] where x = 0"
    assert np.allclose(grad[~zero], -lam * np.sign(x[~zero]), atol=tol_)
    assert (x_sub == 0).sum() <= 1, "sign subgradients oscillate around 0 instead"


# --------------------------------------------------------------------------- cross-entropy

def _soft_targets(target, K, smoothing, style):
    q = np.zeros((len(target), K))
    for i, t in enumerate(target):
        if style == "uniform":
            q[i] = smoothing / K
            q[i, t] += 1 - smoothing
        else:
            q[i] = smoothing / (K - 1)
            q[i, t] = 1 - smoothing
    return q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["uniform", "others"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_is_the_soft_target_sum_and_gradient_matches_finite_differences(
        reduction, style, backend, rng):
    N, K, s = 6, 5, 0.2
    z = rng.standard_normal((N, K)) * 2
    target = rng.integers(0, K, N)
    target[2] = -1                              # ignored
    kw = dict(smoothing=s, reduction=reduction, ignore_index=-1, style=style, backend=backend)
    loss, dz = fastreg.cross_entropy_label_smoothing(z, target, **kw)
    keep = target != -1
    logp = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    rows = np.where(keep, -np.sum(_soft_targets(np.where(keep, target, 0), K, s, style) * logp,
                                  axis=1), 0.0)
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / keep.sum()}[reduction]
    assert_close(loss, expected, rtol=1e-13, atol=1e-13, case="loss")

    def total(zz):
        return float(np.sum(fastreg.cross_entropy_label_smoothing(zz, target, **kw)[0]))
    h = 1e-6
    fd = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (total(zp) - total(zm)) / (2 * h)
    assert_close(dz, fd, rtol=1e-6, atol=1e-8, case="dlogits vs finite differences")
    assert np.all(dz[~keep] == 0)


def test_cross_entropy_stable_for_large_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [-1e4, 1e4, 0.0]])
    for backend in BACKENDS:
        loss, dz = fastreg.cross_entropy_label_smoothing(z, np.array([0, 1]), smoothing=0.0,
                                                         reduction="none", backend=backend)
        assert np.allclose(loss, 0) and np.all(np.isfinite(dz))


# --------------------------------------------------------------------------- scaling

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [0, (0, 2, 3)])
def test_standardize_gives_zero_mean_unit_variance(axis, backend, rng):
    x = rng.standard_normal((10, 3, 4, 5)) * rng.uniform(0.5, 5) + 7
    y, mean, std = fastreg.standardize(x, axis=axis, backend=backend)
    assert np.allclose(y.mean(axis=axis), 0, atol=1e-12)
    assert np.allclose(y.std(axis=axis), 1, atol=1e-12)
    assert_close(mean, x.mean(axis=axis), rtol=1e-13, atol=1e-13, case="mean")
    assert_close(std, x.std(axis=axis), rtol=1e-13, atol=1e-13, case="std")
    _, _, std_eps = fastreg.standardize(x, axis=axis, eps=0.5, backend=backend)
    assert_close(std_eps, np.sqrt(x.var(axis=axis) + 0.5), rtol=1e-13, atol=1e-13, case="eps")


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_max_scale_maps_onto_the_feature_range(backend, rng):
    x = rng.standard_normal((30, 6)) * 4 + 2
    y, lo, hi = fastreg.min_max_scale(x, axis=0, feature_range=(-3.0, 0.5), backend=backend)
    assert np.allclose(y.min(axis=0), -3) and np.allclose(y.max(axis=0), 0.5)
    assert np.array_equal(lo, x.min(axis=0)) and np.array_equal(hi, x.max(axis=0))
    assert np.allclose(y, (x - lo) / (hi - lo) * 3.5 - 3)
