"""The prox family against PyTorch (skipped without torch): optimizer trajectories over
hundreds of steps against torch.optim.SGD/Adam/AdamW on the same gradients,
softshrink, torch.renorm, and cross_entropy(label_smoothing=) with autograd."""

import numpy as np
import pytest

import fastreg
from _assert import assert_close

torch = pytest.importorskip("torch", reason="PyTorch cross-checks need torch")
F = torch.nn.functional

STEPS = 300
N = 257


def _problem(rng, dtype):
    """A noisy quadratic: g(w) = h * (w - w_star) + noise_t, the noise shared by both sides."""
    h = rng.uniform(0.1, 2.0, N)
    w_star = rng.standard_normal(N)
    noise = rng.standard_normal((STEPS, N)) * 0.3
    w0 = rng.standard_normal(N).astype(dtype)
    return h, w_star, noise, w0


def _grad(w, h, w_star, noise_t, dtype):
    return (h * (np.asarray(w, np.float64) - w_star) + noise_t).astype(dtype)


# Tolerances for whole trajectories: float64 agrees to rounding; float32
# trajectories drift apart by float32 rounding fed back through the steps.
TRAJ_TOL = {np.float64: (1e-9, 1e-11), np.float32: (2e-4, 2e-5)}

SGD_VARIANTS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.5),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, weight_decay=0.05, maximize=True),
    dict(momentum=0.5, dampening=0.1, weight_decay=0.1),
    dict(weight_decay=0.2, nesterov=False),
]


def _check_traj(ours, theirs, dtype, case):
    rtol, atol = TRAJ_TOL[dtype]
    assert_close(ours, theirs, rtol=rtol, atol=atol, case=case)


@pytest.mark.parametrize("backend,dtype", [("reference", np.float64), ("cpu", np.float64),
                                           ("cpu", np.float32)])
@pytest.mark.parametrize("variant", SGD_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_sgd_trajectory_matches_torch(variant, backend, dtype, rng):
    h, w_star, noise, w0 = _problem(rng, dtype)
    lr = 0.05
    sign = -1.0 if variant.get("maximize") else 1.0
    w, buf = w0.copy(), np.empty_like(w0)
    p = torch.tensor(w0.copy(), requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr, **variant)
    for t in range(STEPS):
        fastreg.sgd_step(w, sign * _grad(w, h, w_star, noise[t], dtype), lr=lr,
                         momentum_buffer=buf if variant.get("momentum") else None,
                         first_step=t == 0, backend=backend, **variant)
        p.grad = torch.tensor(sign * _grad(p.detach().numpy(), h, w_star, noise[t], dtype))
        opt.step()
        if t % 50 == 49 or t == STEPS - 1:
            _check_traj(w, p.detach().numpy(), dtype, f"sgd {variant} {backend} step {t + 1}")
    if variant.get("momentum"):
        _check_traj(buf, opt.state[p]["momentum_buffer"].numpy(), dtype, "momentum_buffer")


@pytest.mark.parametrize("backend,dtype", [("reference", np.float64), ("cpu", np.float64),
                                           ("cpu", np.float32)])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_decoupled_decay_and_l1_matches_torch_composite(nesterov, backend, dtype, rng):
    """torch doing the same: coupled L2 into the gradient, w *= 1 - lr * wd, SGD with
    momentum, then softshrink(w, lr * l1)."""
    h, w_star, noise, w0 = _problem(rng, dtype)
    lr, mom, wd, dwd, l1 = 0.05, 0.9, 0.01, 0.1, 0.5
    w, buf = w0.copy(), np.empty_like(w0)
    p = torch.tensor(w0.copy(), requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr, momentum=mom, nesterov=nesterov)
    zeros = 0
    for t in range(STEPS):
        fastreg.sgd_step(w, _grad(w, h, w_star, noise[t], dtype), lr=lr, momentum=mom,
                         nesterov=nesterov, weight_decay=wd, decoupled_weight_decay=dwd, l1=l1,
                         momentum_buffer=buf, first_step=t == 0, backend=backend)
        with torch.no_grad():
            p.grad = torch.tensor(_grad(p.numpy(), h, w_star, noise[t], dtype)) + wd * p
            p.mul_(1 - lr * dwd)
            opt.step()
            p.copy_(F.softshrink(p, lr * l1))
        zeros += int((w == 0).sum())
        _check_traj(w, p.detach().numpy(), dtype, f"sgd+decay+l1 {backend} step {t + 1}")
    assert zeros > 0, "the L1 prox should produce exact zeros along the way"


ADAM_VARIANTS = [
    ("AdamW", dict()),
    ("AdamW", dict(weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(maximize=True, betas=(0.5, 0.9), eps=1e-4)),
    ("AdamW", dict(betas=(0.3, 0.99))),          # 1 - beta1 >= 0.5: the other branch of lerp
    ("Adam", dict()),
    ("Adam", dict(weight_decay=0.1)),
    ("Adam", dict(weight_decay=0.1, amsgrad=True, maximize=True)),
    ("Adam", dict(weight_decay=0.05, decoupled_weight_decay=True)),
]


def _ours(name, w, g, m, v, vmax, step, lr, l1, backend, kw):
    kw = dict(kw)
    op = fastreg.adamw_step if name == "AdamW" else fastreg.adam_step
    return op(w, g, m, v, step=step, lr=lr, max_exp_avg_sq=vmax, l1=l1, backend=backend, **kw)


# torch's single-tensor path (its CPU default) for every backend and variant, and
# its fused CPU kernel (float32 math, slow to step on a small tensor) against the
# CPU kernels in float32 on a few variants
ADAM_CASES = [(backend, dtype, "single", name, variant, l1)
              for backend, dtype in (("reference", np.float64), ("cpu", np.float64),
                                     ("cpu", np.float32))
              for name, variant in ADAM_VARIANTS for l1 in (0.0, 0.3)]
ADAM_CASES += [("cpu", np.float32, "fused", *ADAM_VARIANTS[i], 0.3) for i in (1, 3, 5, 7)]


@pytest.mark.parametrize("backend,dtype,impl,name,variant,l1", ADAM_CASES,
                         ids=[f"{n}-" + ",".join(f"{k}={x}" for k, x in v.items())
                              + f"-l1={l1}-{b}-{np.dtype(d).name}-{i}"
                              for b, d, i, n, v, l1 in ADAM_CASES])
def test_adam_trajectory_matches_torch(l1, name, variant, backend, dtype, impl, rng):
    h, w_star, noise, w0 = _problem(rng, dtype)
    lr = 0.01
    w = w0.copy()
    m, v, vmax = np.zeros_like(w0), np.zeros_like(w0), np.zeros_like(w0)
    p = torch.tensor(w0.copy(), requires_grad=True)
    opt = getattr(torch.optim, name)([p], lr=lr, fused=impl == "fused" or None,
                                     foreach=False if impl == "single" else None, **variant)
    for t in range(STEPS):
        _ours(name, w, _grad(w, h, w_star, noise[t], dtype), m, v, vmax, t + 1, lr, l1, backend,
              variant)
        p.grad = torch.tensor(_grad(p.detach().numpy(), h, w_star, noise[t], dtype))
        opt.step()
        if l1:
            with torch.no_grad():
                p.copy_(F.softshrink(p, lr * l1))
        if t % 50 == 49 or t == STEPS - 1:
            _check_traj(w, p.detach().numpy(), dtype, f"{name} {variant} l1={l1} {backend} "
                                                      f"{impl} step {t + 1}")
    state = opt.state[p]
    _check_traj(m, state["exp_avg"].numpy(), dtype, "exp_avg")
    _check_traj(v, state["exp_avg_sq"].numpy(), dtype, "exp_avg_sq")
    if variant.get("amsgrad"):
        _check_traj(vmax, state["max_exp_avg_sq"].numpy(), dtype, "max_exp_avg_sq")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prox_l1_equals_softshrink(dtype, rng):
    w = (rng.standard_normal(10_000) * 2).astype(dtype)
    for lam in (0.0, 0.3, 1.7):
        theirs = F.softshrink(torch.tensor(w), lam).numpy()
        # both compute in w's dtype: w - lam or w + lam outside [-lam, lam], else 0
        ours = fastreg.prox_l1(w, lam)
        assert np.array_equal(ours, theirs), f"prox_l1 vs softshrink lambda={lam}"
        # the reference subtracts in float64 and rounds once
        ref = fastreg.prox_l1(w, lam, backend="reference")
        assert_close(ref, theirs, rtol=1e-7, atol=1e-7, case=f"reference lambda={lam}")


@pytest.mark.parametrize("dim", [0, 1])
def test_max_norm_matches_torch_renorm(dim, rng):
    """torch.renorm(w, 2, dim, c) keeps ``dim`` and reduces the others; it scales by
    c / (norm + 1e-7) above the bound, Keras by c / (norm + 1e-7) too (eps=1e-7)."""
    w = rng.standard_normal((6, 9)) * rng.uniform(0.1, 3, (6, 1))
    axis = 1 - dim
    theirs = torch.renorm(torch.tensor(w), 2, dim, 2.0).numpy()
    n = np.linalg.norm(w, axis=axis, keepdims=True)
    for backend in ("cpu", "reference"):
        ours = fastreg.max_norm(w, 2.0, axis=axis, backend=backend)
        big = np.broadcast_to(n > 2.0, w.shape)
        assert_close(ours[big], theirs[big], rtol=1e-12, atol=1e-14, case="renorm, clipped")
        # below the bound Keras's formula shrinks by n / (n + 1e-7); renorm keeps w
        assert_close(ours[~big], theirs[~big], rtol=1e-6, atol=0, case="renorm, inside")
        exact = fastreg.max_norm(w, 2.0, axis=axis, eps=0.0, backend=backend)
        assert np.array_equal(exact[~big], theirs[~big])


CE_VARIANTS = [
    dict(smoothing=0.0, reduction="mean", ignore_index=None),
    dict(smoothing=0.1, reduction="mean", ignore_index=None),
    dict(smoothing=0.1, reduction="mean", ignore_index=-100),
    dict(smoothing=0.25, reduction="sum", ignore_index=3),
    dict(smoothing=0.1, reduction="none", ignore_index=-100),
    dict(smoothing=1.0, reduction="mean", ignore_index=-100),
]


@pytest.mark.parametrize("backend,dtype", [("reference", np.float64), ("cpu", np.float64),
                                           ("cpu", np.float32)])
@pytest.mark.parametrize("kw", CE_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
def test_cross_entropy_matches_torch_with_autograd(kw, backend, dtype, rng):
    N, K = 37, 11
    z = (rng.standard_normal((N, K)) * 3).astype(dtype)
    target = rng.integers(0, K, N)
    if kw["ignore_index"] is not None:
        target[rng.random(N) < 0.3] = kw["ignore_index"]
    loss, dz = fastreg.cross_entropy_label_smoothing(z, target, backend=backend, **kw)
    zt = torch.tensor(z, requires_grad=True)
    lt = F.cross_entropy(zt, torch.tensor(target), label_smoothing=kw["smoothing"],
                         reduction=kw["reduction"],
                         ignore_index=-100 if kw["ignore_index"] is None else kw["ignore_index"])
    lt.sum().backward()
    rtol = atol = 1e-12 if dtype == np.float64 else 2e-5
    assert_close(loss, lt.detach().numpy(), rtol=rtol, atol=atol, case=f"loss {kw}")
    assert_close(dz, zt.grad.numpy(), rtol=rtol, atol=atol, case=f"dlogits {kw}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_others_style_matches_torch_soft_targets(reduction, backend, rng):
    """'others' = cross-entropy against q_t = 1 - s, q_k = s / (K - 1): torch's
    probability-target cross_entropy with that q (ignored rows dropped)."""
    N, K, s = 29, 7, 0.15
    z = rng.standard_normal((N, K)) * 2
    target = rng.integers(0, K, N)
    target[::5] = -1
    loss, dz = fastreg.cross_entropy_label_smoothing(z, target, smoothing=s, style="others",
                                                     reduction=reduction, ignore_index=-1,
                                                     backend=backend)
    keep = target != -1
    q = np.full((keep.sum(), K), s / (K - 1))
    q[np.arange(keep.sum()), target[keep]] = 1 - s
    zt = torch.tensor(z, requires_grad=True)
    lt = F.cross_entropy(zt[torch.tensor(keep)], torch.tensor(q), reduction=reduction)
    lt.backward()
    assert_close(loss, lt.detach().numpy(), rtol=1e-12, atol=1e-12, case="loss")
    assert_close(dz, zt.grad.numpy(), rtol=1e-12, atol=1e-12, case="dlogits")
