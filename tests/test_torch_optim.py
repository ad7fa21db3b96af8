"""fastreg.torch.optim against torch.optim: trajectories, state_dict, L1, fallback, zero copy.

Each test runs fastreg's optimizer and PyTorch's side by side on copies of the
same parameters and feeds both the same gradients: a noisy quadratic
``g = h * (w - w_star) + noise_t`` of each parameter, noise drawn fresh each
run (the ``rng`` fixture). One parameter gets a gradient only every other
step, so its step count falls behind the others' (Adam then runs two step
counts in one group).
"""

import copy
import warnings

import pytest

from _assert import assert_close

torch = pytest.importorskip("torch", reason="the PyTorch adapter needs torch")

import fastreg  # noqa: E402
import fastreg.torch as ft  # noqa: E402
from fastreg.torch import _bridge  # noqa: E402

F = torch.nn.functional
STEPS = 300
SHAPES = [(7, 5), (13,), (3, 2, 4), (1,)]
# float64 agrees to rounding; float32 trajectories drift apart by float32
# rounding fed back through the steps (as tests/test_prox_torch.py).
TRAJ_TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 2e-5)}


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    _bridge._warned.clear()
    yield
    _bridge._warned.clear()


class _Problem:
    """Parameters and a noisy quadratic gradient for each, shared by both sides."""

    def __init__(self, rng, dtype, shapes=SHAPES, steps=STEPS):
        self.dtype = dtype
        self.h = [torch.from_numpy(rng.uniform(0.1, 2.0, s)) for s in shapes]
        self.w_star = [torch.from_numpy(rng.standard_normal(s)) for s in shapes]
        self.noise = [torch.from_numpy(rng.standard_normal((steps, *s)) * 0.3) for s in shapes]
        self.w0 = [torch.from_numpy(rng.standard_normal(s)).to(dtype) for s in shapes]

    def params(self):
        return [torch.nn.Parameter(w.clone()) for w in self.w0]

    def set_grads(self, params, t, sign=1.0):
        for i, p in enumerate(params):
            if i == 1 and t % 2:  # this one has no gradient on odd steps
                p.grad = None
                continue
            g = self.h[i] * (p.detach().cpu().double() - self.w_star[i]) + self.noise[i][t]
            p.grad = (sign * g).to(self.dtype).to(p.device)


def _check(ours, theirs, dtype, case):
    rtol, atol = TRAJ_TOL[dtype]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a.detach().double().numpy(), b.detach().double().numpy(), rtol=rtol,
                     atol=atol, case=f"{case} param {i}")


def _check_state(ours, theirs, dtype, case):
    assert len(ours.state) == len(theirs.state)
    for (pa, sa), (pb, sb) in zip(ours.state.items(), theirs.state.items()):
        assert sorted(sa) == sorted(sb), f"{case}: state keys {sorted(sa)} != {sorted(sb)}"
        for k in sa:
            a, b = sa[k], sb[k]
            assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape, (case, k)
            if k == "step":
                assert torch.equal(a, b), f"{case}: step {a} != {b}"
            else:
                rtol, atol = TRAJ_TOL[dtype]
                assert_close(a.double().numpy(), b.double().numpy(), rtol=rtol, atol=atol,
                             case=f"{case} {k}")


def _run(problem, ours, theirs, pa, pb, steps, case, sign=1.0, every=50, after=None):
    for t in range(steps):
        problem.set_grads(pa, t, sign)
        problem.set_grads(pb, t, sign)
        ours.step()
        theirs.step()
        if after is not None:
            after(t)
        if t % every == every - 1 or t == steps - 1:
            _check(pa, pb, problem.dtype, f"{case} step {t + 1}")


SGD_VARIANTS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.5),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, weight_decay=0.05, maximize=True),
    dict(momentum=0.5, dampening=0.1, weight_decay=0.1),
    dict(weight_decay=0.2),
]
ADAM_VARIANTS = [
    ("Adam", dict()),
    ("Adam", dict(weight_decay=0.1)),
    ("Adam", dict(weight_decay=0.1, amsgrad=True, maximize=True)),
    ("Adam", dict(weight_decay=0.05, decoupled_weight_decay=True)),
    ("AdamW", dict()),
    ("AdamW", dict(weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(maximize=True, betas=(0.5, 0.9), eps=1e-4)),
    ("AdamW", dict(betas=(0.3, 0.99))),
]


def _ids(v):
    return ",".join(f"{k}={x}" for k, x in v.items()) or "defaults"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("variant", SGD_VARIANTS, ids=_ids)
def test_sgd_trajectory_matches_torch(variant, dtype, rng):
    problem = _Problem(rng, dtype)
    pa, pb = problem.params(), problem.params()
    ours, theirs = ft.optim.SGD(pa, lr=0.05, **variant), torch.optim.SGD(pb, lr=0.05, **variant)
    sign = -1.0 if variant.get("maximize") else 1.0
    _run(problem, ours, theirs, pa, pb, STEPS, f"SGD {variant}", sign)
    _check_state(ours, theirs, dtype, f"SGD {variant}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name,variant", ADAM_VARIANTS,
                         ids=[f"{n}-{_ids(v)}" for n, v in ADAM_VARIANTS])
def test_adam_trajectory_matches_torch(name, variant, dtype, rng):
    problem = _Problem(rng, dtype)
    pa, pb = problem.params(), problem.params()
    ours = getattr(ft.optim, name)(pa, lr=0.01, **variant)
    theirs = getattr(torch.optim, name)(pb, lr=0.01, **variant)
    sign = -1.0 if variant.get("maximize") else 1.0
    _run(problem, ours, theirs, pa, pb, STEPS, f"{name} {variant}", sign)
    _check_state(ours, theirs, dtype, f"{name} {variant}")
    assert float(ours.state[pa[1]]["step"]) == STEPS // 2  # the parameter that skips steps


def test_param_groups_and_schedulers_as_torch(rng):
    problem = _Problem(rng, torch.float64)
    pa, pb = problem.params(), problem.params()

    def groups(p):
        return [{"params": p[:2], "lr": 0.02}, {"params": p[2:], "weight_decay": 0.1}]
    ours = ft.optim.AdamW(groups(pa), lr=0.01, amsgrad=True)
    theirs = torch.optim.AdamW(groups(pb), lr=0.01, amsgrad=True)
    sa = torch.optim.lr_scheduler.StepLR(ours, step_size=20, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(theirs, step_size=20, gamma=0.5)
    _run(problem, ours, theirs, pa, pb, 100, "groups+StepLR",
         after=lambda t: (sa.step(), sb.step()))
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] < 0.02
    for ga, gb in zip(ours.param_groups, theirs.param_groups):
        assert {k: v for k, v in ga.items() if k not in ("params", "l1")} == \
            {k: v for k, v in gb.items() if k != "params"}


def test_closure_and_hooks(rng):
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(5)))
    opt = ft.optim.SGD([p], lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss
    before = p.detach().clone()
    loss = opt.step(closure)
    assert torch.allclose(loss, (before * before).sum()) and seen == ["pre", "post"]
    assert torch.allclose(p.detach(), before * 0.8)


# --------------------------------------------------------------------------- state_dict

@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                         ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
                                         ("AdamW", dict(lr=0.01, amsgrad=True))])
def test_state_dict_round_trips_both_ways(name, kwargs, rng):
    """Train with one, continue with the other from its state_dict, and the other way:
    both continuations follow an uninterrupted PyTorch run."""
    dtype = torch.float64
    problem = _Problem(rng, dtype, steps=120)
    pa, pb, pc = problem.params(), problem.params(), problem.params()
    ours = getattr(ft.optim, name)(pa, **kwargs)
    theirs = getattr(torch.optim, name)(pb, **kwargs)
    straight = getattr(torch.optim, name)(pc, **kwargs)
    for t in range(120):
        if t in (40, 80):  # swap: ours -> torch's class and torch's -> ours
            sa, sb = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
            extras = {"l1", "decoupled_weight_decay"} if name == "SGD" else {"l1"}
            assert set(sa["param_groups"][0]) == set(sb["param_groups"][0]) | extras
            ours_next = getattr(torch.optim, name)(pa, **kwargs)
            ours_next.load_state_dict(sa)
            theirs_next = getattr(ft.optim, name)(pb, **kwargs)
            theirs_next.load_state_dict(sb)
            ours, theirs = ours_next, theirs_next
        for params, opt in ((pa, ours), (pb, theirs), (pc, straight)):
            problem.set_grads(params, t)
            opt.step()
        _check(pa, pc, dtype, f"{name} swapped step {t}")
        _check(pb, pc, dtype, f"{name} swapped step {t}")
    _check_state(theirs, straight, dtype, f"{name} after the swaps")


def test_a_torch_checkpoint_keeps_the_constructors_l1(rng):
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(4)))
    theirs = torch.optim.AdamW([p], lr=0.1)
    ours = ft.optim.AdamW([p], lr=0.1, l1=0.5)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["l1"] == 0.5
    again = ft.optim.AdamW([p], lr=0.1)
    again.load_state_dict(ours.state_dict())  # fastreg's own checkpoint carries its l1
    assert again.param_groups[0]["l1"] == 0.5


# --------------------------------------------------------------------------- L1 and decay

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.05, momentum=0.9)),
                                         ("Adam", dict(lr=0.01, weight_decay=0.05)),
                                         ("AdamW", dict(lr=0.01, amsgrad=True))])
def test_l1_gives_exact_zeros_as_torch_then_softshrink(name, kwargs, dtype, rng):
    problem = _Problem(rng, dtype, steps=200)
    pa, pb = problem.params(), problem.params()
    l1 = 1.5
    ours = getattr(ft.optim, name)(pa, l1=l1, **kwargs)
    theirs = getattr(torch.optim, name)(pb, **kwargs)
    zeros = [0, 0]

    def prox(t):
        with torch.no_grad():
            for i, p in enumerate(pb):
                if p.grad is not None:
                    p.copy_(F.softshrink(p, kwargs["lr"] * l1))
        zeros[0] += sum(int((p == 0).sum()) for p in pa)
        zeros[1] += sum(int((p == 0).sum()) for p in pb)
    _run(problem, ours, theirs, pa, pb, 200, f"{name} l1", after=prox, every=20)
    # the L1 prox sets weights to exactly 0 along the way, as softshrink does
    assert zeros[0] >= 50, f"{name}: only {zeros[0]} exact zeros in 200 steps with l1={l1}"
    assert abs(zeros[0] - zeros[1]) <= 0.02 * zeros[1], zeros


def test_sgd_decoupled_weight_decay_and_l1_follow_the_formula(rng):
    dtype = torch.float64
    problem = _Problem(rng, dtype, steps=100)
    pa, pb = problem.params(), problem.params()
    lr, mom, wd, dwd, l1 = 0.05, 0.9, 0.01, 0.1, 0.5
    ours = ft.optim.SGD(pa, lr=lr, momentum=mom, weight_decay=wd, decoupled_weight_decay=dwd,
                        l1=l1)
    bufs = [None] * len(pb)
    for t in range(100):
        problem.set_grads(pa, t)
        problem.set_grads(pb, t)
        ours.step()
        with torch.no_grad():
            for i, p in enumerate(pb):
                if p.grad is None:
                    continue
                d = p.grad + wd * p
                bufs[i] = d.clone() if bufs[i] is None else bufs[i] * mom + d
                p.mul_(1 - lr * dwd).add_(bufs[i], alpha=-lr)
                p.sub_(p.clamp(-lr * l1, lr * l1))
        _check(pa, pb, dtype, f"SGDW+l1 step {t}")


def test_extras_are_validated_and_per_group(rng):
    p, q = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    with pytest.raises(ValueError, match="Invalid l1 value: -1"):
        ft.optim.AdamW([p], l1=-1)
    with pytest.raises(ValueError, match="Invalid decoupled_weight_decay value"):
        ft.optim.SGD([p], decoupled_weight_decay=-0.1)
    opt = ft.optim.SGD([{"params": [p], "l1": 10.0}], lr=0.1)  # threshold 1
    opt.add_param_group({"params": [q]})
    assert [g["l1"] for g in opt.param_groups] == [10.0, 0.0]
    with pytest.raises(ValueError, match="Invalid l1 value"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "l1": -2})
    p.grad, q.grad = torch.zeros(3), torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(3)) and torch.equal(q.detach(), torch.ones(3))


# --------------------------------------------------------------------------- zero copy

def test_one_call_per_group_and_dtype_on_views(monkeypatch, rng):
    calls = []
    original = fastreg.adam_step

    def spy(w, g, m, v, **kwargs):
        calls.append((w, g, m, v, kwargs))
        return original(w, g, m, v, **kwargs)
    monkeypatch.setattr(fastreg, "adam_step", spy)
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s)).to(d))
              for s, d in [((4, 3), torch.float32), ((5,), torch.float32), ((2,), torch.float64)]]
    opt = ft.optim.AdamW(params, lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    versions = [p._version for p in params]
    opt.step()
    assert len(calls) == 2, "one fused call per dtype"
    w, g, m, v, kwargs = calls[0]
    assert len(w) == 2 and kwargs["step"] == 1
    for a, p in zip(w + g + m, params[:2] + [p.grad for p in params[:2]]
                    + [opt.state[p]["exp_avg"] for p in params[:2]]):
        assert a.__array_interface__["data"][0] == p.data_ptr(), "a copy reached the kernel"
    assert all(p._version > v for p, v in zip(params, versions)), "version counter not bumped"


# --------------------------------------------------------------------------- fallback

def _fallbacks(record):
    return [str(w.message) for w in record if issubclass(w.category, ft.FallbackWarning)]


@pytest.mark.parametrize("flags,match", [(dict(foreach=True), "foreach=True"),
                                         (dict(fused=True), "fused=True")])
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_torchs_implementations_run_when_asked_for(name, flags, match, rng):
    problem = _Problem(rng, torch.float32, steps=20)
    pa, pb = problem.params(), problem.params()
    kwargs = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    ours = getattr(ft.optim, name)(pa, **kwargs, **flags)
    theirs = getattr(torch.optim, name)(pb, **kwargs, **flags)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _run(problem, ours, theirs, pa, pb, 20, f"{name} {flags}", every=5)
    messages = _fallbacks(record)
    assert len(messages) == 1 and match in messages[0], messages
    _check_state(ours, theirs, torch.float32, f"{name} {flags}")


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_differentiable_steps_run_torchs_algorithm_under_autograd(name, rng):
    w0 = torch.from_numpy(rng.standard_normal(5))
    results = []
    for module in (ft.optim, torch.optim):
        w = w0.clone().requires_grad_()
        q = w * 1.5  # a non-leaf parameter: the step is differentiated through
        kwargs = dict(momentum=0.9) if name == "SGD" else {}
        opt = getattr(module, name)([q], lr=0.1, differentiable=True, **kwargs)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            q.grad = q.detach() * 2
            opt.step()
        assert (len(_fallbacks(record)) == 1) == (module is ft.optim)
        assert q.grad_fn is not None
        (dw,) = torch.autograd.grad(q.sum(), w)
        results.append((q.detach(), dw))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_sparse_complex_and_low_precision_parameters_fall_back(rng):
    emb_a = torch.nn.Embedding(10, 3, sparse=True, dtype=torch.float64)
    emb_b = copy.deepcopy(emb_a)
    values = (torch.from_numpy(rng.standard_normal(4)), torch.randn(3, dtype=torch.complex128),
              torch.randn(5, dtype=torch.bfloat16))
    dense, cplx, half = ([torch.nn.Parameter(v.clone()) for _ in range(2)] for v in values)
    ours = ft.optim.SGD([emb_a.weight, dense[0], cplx[0], half[0]], lr=0.1, momentum=0.9,
                        l1=0.05)
    theirs = torch.optim.SGD([emb_b.weight, dense[1], cplx[1], half[1]], lr=0.1, momentum=0.9)
    idx = torch.tensor([1, 4, 4])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for t in range(5):
            for emb, d, c, h, opt in ((emb_a, dense[0], cplx[0], half[0], ours),
                                      (emb_b, dense[1], cplx[1], half[1], theirs)):
                opt.zero_grad()
                (emb(idx).sum() + (d * d).sum() + (c.abs() ** 2).sum()
                 + (h.float() ** 2).sum()).backward()
                opt.step()
            with torch.no_grad():  # PyTorch's step then the same prox
                for p in (emb_b.weight, dense[1], half[1]):
                    p.sub_(p.clamp(-0.005, 0.005))
                cplx[1].mul_((1 - 0.005 / cplx[1].abs()).clamp(min=0))
    messages = _fallbacks(record)
    assert len(messages) == 3, messages  # once per reason
    for reason, message in zip(("sparse gradients", "complex", "dtype bfloat16"), messages):
        assert reason in message, messages
    assert torch.allclose(emb_a.weight, emb_b.weight, rtol=1e-12, atol=1e-14)
    assert torch.allclose(dense[0], dense[1], rtol=1e-12, atol=1e-14)
    assert torch.equal(half[0], half[1]) and torch.allclose(cplx[0], cplx[1], rtol=1e-12)


def test_complex_parameters_fall_back_to_torch(rng):
    pa = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
    pb = torch.nn.Parameter(pa.detach().clone())
    ours, theirs = ft.optim.Adam([pa], lr=0.1), torch.optim.Adam([pb], lr=0.1)
    with pytest.warns(ft.FallbackWarning, match="complex"):
        for _ in range(3):
            for p, opt in ((pa, ours), (pb, theirs)):
                p.grad = p.detach() * 0.5
                opt.step()
    assert torch.equal(pa, pb)


def test_decoupled_decay_outside_fastregs_step_raises_before_anything_moves():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    dense = torch.nn.Parameter(torch.ones(3))
    opt = ft.optim.SGD([{"params": [dense]}, {"params": emb.parameters()}], lr=0.1,
                       decoupled_weight_decay=0.1)
    emb(torch.tensor([1])).sum().backward()
    dense.grad = torch.ones(3)
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="decoupled_weight_decay needs fastreg's step"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(3)) and torch.equal(emb.weight, before)


# --------------------------------------------------------------------------- CUDA
# Where PyTorch sees a GPU and CuPy and fastreg's CUDA backend are installed
# (bench/gpu_check.py runs these files there); elsewhere they skip, naming why.

def _cuda_missing():
    if not torch.cuda.is_available():
        return "no CUDA device (this PyTorch build or machine has none)"
    cupy, reason = _bridge._cuda_support()
    return None if cupy is not None else reason


@pytest.mark.skipif(_cuda_missing() is not None, reason=f"CUDA path: {_cuda_missing()}")
@pytest.mark.parametrize("name,kwargs", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                         ("AdamW", dict(lr=0.01, amsgrad=True))])
def test_cuda_trajectory_matches_torch(name, kwargs, rng):
    problem = _Problem(rng, torch.float32, steps=50)
    pa = [torch.nn.Parameter(w.clone().cuda()) for w in problem.w0]
    pb = [torch.nn.Parameter(w.clone().cuda()) for w in problem.w0]
    ours = getattr(ft.optim, name)(pa, **kwargs)
    theirs = getattr(torch.optim, name)(pb, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.FallbackWarning)
        for t in range(50):
            problem.set_grads(pa, t)
            problem.set_grads(pb, t)
            ours.step()
            theirs.step()
    _check([p.cpu() for p in pa], [p.cpu() for p in pb], torch.float32, f"cuda {name}")
