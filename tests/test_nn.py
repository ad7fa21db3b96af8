"""fastreg.nn: every layer's backward against central finite differences (float64),
Sequential against the hand-composed chain, buffers reused between steps,
state dicts, EarlyStopping exactly as specified, and a short training run."""

import numpy as np
import pytest

from fastreg import nn


def _fd_check(layer, x, rng, training=True, n_probe=12, h=1e-6, rtol=1e-6, atol=1e-7):
    """backward(G) against central differences of sum(forward(x) * G), on sampled entries
    of x and of every parameter."""
    y = layer.forward(x, training).copy()
    G = rng.standard_normal(y.shape)
    dx = layer.backward(G).copy()
    grads = {k: g.copy() for k, g in layer.grads.items()}

    def loss():
        return float(np.sum(layer.forward(x, training) * G))

    targets = [("x", x, dx)] + [(k, layer.params[k], grads[k]) for k in layer.params]
    for name, arr, grad in targets:
        flat = arr.reshape(-1)
        for idx in rng.choice(flat.size, size=min(n_probe, flat.size), replace=False):
            keep = flat[idx]
            flat[idx] = keep + h
            up = loss()
            flat[idx] = keep - h
            down = loss()
            flat[idx] = keep
            numeric = (up - down) / (2 * h)
            got = grad.reshape(-1)[idx]
            assert abs(got - numeric) <= atol + rtol * abs(numeric), \
                f"{type(layer).__name__} d{name}[{idx}]: backward {got!r}, finite differences " \
                f"{numeric!r}"


LAYERS = [
    ("linear-2d", lambda r: nn.Linear(7, 5, rng=r, dtype=np.float64), (6, 7)),
    ("linear-3d", lambda r: nn.Linear(4, 3, bias=False, rng=r, dtype=np.float64), (2, 3, 4)),
    ("layernorm", lambda r: nn.LayerNorm(9, dtype=np.float64), (5, 9)),
    ("layernorm-2dims", lambda r: nn.LayerNorm((3, 4), elementwise_affine=False,
                                               dtype=np.float64), (2, 3, 4)),
    ("rmsnorm", lambda r: nn.RMSNorm(6, dtype=np.float64), (4, 6)),
    ("batchnorm1d", lambda r: nn.BatchNorm1d(5, dtype=np.float64), (8, 5)),
    ("batchnorm1d-3d", lambda r: nn.BatchNorm1d(3, momentum=None, dtype=np.float64), (4, 3, 5)),
    ("batchnorm2d", lambda r: nn.BatchNorm2d(3, dtype=np.float64), (4, 3, 2, 3)),
    ("batchnorm2d-nhwc", lambda r: nn.BatchNorm2d(3, axis=-1, dtype=np.float64), (4, 2, 3, 3)),
    ("batchnorm2d-untracked", lambda r: nn.BatchNorm2d(2, track_running_stats=False,
                                                       dtype=np.float64), (3, 2, 2, 2)),
    ("groupnorm", lambda r: nn.GroupNorm(2, 4, dtype=np.float64), (3, 4, 5)),
    ("groupnorm-nhwc", lambda r: nn.GroupNorm(3, 6, axis=-1, dtype=np.float64), (2, 3, 6)),
]


def _randomize(layer, rng):
    for p in layer.params.values():
        p[...] = rng.standard_normal(p.shape)


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_backward_matches_finite_differences(name, make, shape, rng):
    layer = make(rng)
    _randomize(layer, rng)
    x = rng.standard_normal(shape)
    _fd_check(layer, x, rng)


def test_relu_backward_matches_finite_differences(rng):
    x = rng.standard_normal((5, 6))
    x[np.abs(x) < 0.05] = 0.5                       # keep clear of the kink
    _fd_check(nn.ReLU(), x, rng)


def test_batchnorm_eval_backward_matches_finite_differences(rng):
    layer = nn.BatchNorm2d(3, dtype=np.float64)
    _randomize(layer, rng)
    layer.buffers["running_mean"][...] = rng.standard_normal(3)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2, 3)
    x = rng.standard_normal((2, 3, 2, 2))
    before = {k: v.copy() for k, v in layer.buffers.items()}
    _fd_check(layer, x, rng, training=False)
    for k, v in before.items():
        assert np.array_equal(layer.buffers[k], v), f"eval mode changed {k}"


def test_sequential_equals_hand_composed_chain(rng):
    def build(seed):
        r = np.random.default_rng(seed)
        return [nn.Linear(10, 8, rng=r, dtype=np.float64), nn.LayerNorm(8, dtype=np.float64),
                nn.ReLU(), nn.BatchNorm1d(8, dtype=np.float64),
                nn.Linear(8, 3, rng=r, dtype=np.float64)]
    layers = build(7)
    model = nn.Sequential(*build(7))
    x = rng.standard_normal((16, 10))
    dy = rng.standard_normal((16, 3))
    h = x
    for layer in layers:
        h = layer.forward(h)
    g = dy
    for layer in reversed(layers):
        g = layer.backward(g)
    y = model.forward(x)
    dx = model.backward(dy)
    np.testing.assert_array_equal(y, h)
    np.testing.assert_array_equal(dx, g)
    for i, layer in enumerate(layers):
        for k in layer.params:
            np.testing.assert_array_equal(model.grads[f"{i}.{k}"], layer.grads[k])
            assert model.params[f"{i}.{k}"] is model[i].params[k]
    assert set(model.buffers) == {"3.running_mean", "3.running_var", "3.num_batches_tracked"}
    _fd_check(nn.Sequential(*build(3)), x, rng)


def test_buffers_are_reused_between_steps(rng):
    model = nn.Sequential(nn.Linear(6, 4, rng=rng), nn.GroupNorm(2, 4), nn.ReLU(),
                          nn.Linear(4, 2, rng=rng))
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y1 = model.forward(x)
    dx1 = model.backward(np.ones_like(y1))
    y2 = model.forward(x)
    dx2 = model.backward(np.ones_like(y2))
    assert np.shares_memory(y1, y2) and np.shares_memory(dx1, dx2)
    # a new batch size gets new buffers, and the old results stay valid
    y3 = model.forward(rng.standard_normal((3, 6)).astype(np.float32))
    assert y3.shape == (3, 2) and not np.shares_memory(y3, y2)


def test_inputs_are_not_modified(rng):
    model = nn.Sequential(nn.Linear(6, 4, rng=rng), nn.BatchNorm1d(4), nn.ReLU())
    x = rng.standard_normal((5, 6)).astype(np.float32)
    dy = rng.standard_normal((5, 4)).astype(np.float32)
    x0, dy0 = x.copy(), dy.copy()
    model.forward(x)
    model.backward(dy)
    assert np.array_equal(x, x0) and np.array_equal(dy, dy0)


def test_batchnorm_running_stats_follow_pytorch_rules(rng):
    bn = nn.BatchNorm1d(3, momentum=0.25, dtype=np.float64)
    cma = nn.BatchNorm1d(3, momentum=None, dtype=np.float64)
    batches = [rng.standard_normal((10, 3)) * 2 + 1 for _ in range(4)]
    rm, rv = np.zeros(3), np.ones(3)
    for b in batches:
        bn.forward(b)
        cma.forward(b)
        rm = 0.75 * rm + 0.25 * b.mean(0)
        rv = 0.75 * rv + 0.25 * b.var(0, ddof=1)
    np.testing.assert_allclose(bn.buffers["running_mean"], rm, rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], rv, rtol=1e-12)
    allx = np.concatenate(batches)
    np.testing.assert_allclose(cma.buffers["running_mean"], allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cma.buffers["running_var"],
                               np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-12)
    assert int(cma.buffers["num_batches_tracked"]) == 4
    # inference normalizes with the running statistics
    y = bn.forward(batches[0], training=False)
    expect = (batches[0] - rm) / np.sqrt(rv + 1e-5)
    np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_and_errors(rng):
    a = nn.Sequential(nn.Linear(3, 2, rng=1), nn.BatchNorm1d(2))
    b = nn.Sequential(nn.Linear(3, 2, rng=2), nn.BatchNorm1d(2))
    a.forward(rng.standard_normal((4, 3)).astype(np.float32))
    state = a.state_dict()
    w_b = b.params["0.weight"]
    b.load_state_dict(state)
    assert b.params["0.weight"] is w_b                       # loaded in place
    for k, v in state.items():
        np.testing.assert_array_equal({**b.params, **b.buffers}[k], v)
    with pytest.raises(ValueError, match="missing keys"):
        b.load_state_dict({k: v for k, v in state.items() if k != "0.bias"})
    bad = dict(state, **{"0.weight": np.zeros((5, 5))})
    with pytest.raises(ValueError, match="'0.weight' must have shape"):
        b.load_state_dict(bad)


def test_layer_arguments_are_validated():
    with pytest.raises(ValueError, match="Linear: 'in_features' must be an integer >= 1"):
        nn.Linear(0, 3)
    with pytest.raises(TypeError, match="Linear: 'dtype' must be float32 or float64"):
        nn.Linear(2, 3, dtype=np.int32)
    with pytest.raises(ValueError, match="GroupNorm: 'num_groups' must divide"):
        nn.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="BatchNorm2d.forward: 'x' must be 4-D"):
        nn.BatchNorm2d(3).forward(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="Linear.forward: 'x' must have 3 features"):
        nn.Linear(3, 2).forward(np.zeros((2, 4), np.float32))
    with pytest.raises(RuntimeError, match="call forward"):
        nn.ReLU().backward(np.zeros(3))
    with pytest.raises(TypeError, match="Sequential: layer 1 must be a fastreg.nn.Module"):
        nn.Sequential(nn.ReLU(), lambda x: x)
    with pytest.raises(ValueError, match="EarlyStopping: 'mode' must be one of"):
        nn.EarlyStopping(mode="up")


def test_early_stopping_stops_after_patience_and_restores_best():
    model = nn.Linear(2, 1, rng=0, dtype=np.float64)
    stop = nn.EarlyStopping(patience=2, min_delta=0.1, mode="min")
    values = [1.0, 0.8, 0.75, 0.72, 0.71]   # improvements by > 0.1 only at epochs 0 and 1
    decisions = []
    for epoch, v in enumerate(values):
        model.params["weight"][...] = epoch
        decisions.append(stop.step(v, model))
        if decisions[-1]:
            break
    assert decisions == [False, False, False, True]
    assert stop.best == 0.8 and stop.best_epoch == 1 and stop.stopped_epoch == 3
    assert np.all(model.params["weight"] == 1.0), "the best epoch's weights are restored"


def test_early_stopping_max_mode_resets_wait_and_can_skip_restore():
    model = nn.Linear(2, 1, rng=0, dtype=np.float64)
    stop = nn.EarlyStopping(patience=2, mode="max", restore_best=False)
    seq = [0.5, 0.4, 0.6, 0.6, 0.59]
    out = []
    for epoch, v in enumerate(seq):
        model.params["weight"][...] = epoch
        out.append(stop.step(v, model))
    assert out == [False, False, False, False, True]
    assert stop.best == 0.6 and stop.best_epoch == 2 and stop.wait == 2
    assert np.all(model.params["weight"] == 4.0), "restore_best=False leaves the last weights"


def test_short_training_run_lowers_the_loss(rng):
    X = rng.standard_normal((256, 8)).astype(np.float32)
    true_w = rng.standard_normal((8, 3)).astype(np.float32)
    labels = np.argmax(X @ true_w, axis=1)
    model = nn.Sequential(nn.Linear(8, 16, rng=rng), nn.LayerNorm(16), nn.ReLU(),
                          nn.Linear(16, 3, rng=rng))

    def loss_and_grad():
        z = model.forward(X)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(len(X)), labels]))
        p[np.arange(len(X)), labels] -= 1
        return loss, p / len(X)

    first, _ = loss_and_grad()
    for _ in range(60):
        loss, g = loss_and_grad()
        model.backward(g.astype(np.float32))
        for k, p in model.params.items():
            p -= 0.5 * model.grads[k]
    assert loss < 0.5 * first


def _quadratic_model(rng):
    model = nn.Linear(5, 3, rng=rng, dtype=np.float64)
    target = rng.standard_normal((3, 5))
    return model, target


def _fill_grads(model, target):
    """Gradient of 0.5 * ||W - target||^2 (and of 0.5 * ||b||^2)."""
    model.grads["weight"][...] = model.params["weight"] - target
    model.grads["bias"][...] = model.params["bias"]


@pytest.mark.parametrize("kind", ["sgd", "sgd_momentum", "adamw", "adam_l2"])
def test_optimizers_match_the_step_functions(kind, rng):
    import fastreg
    model, target = _quadratic_model(rng)
    ws = [model.params["weight"].copy(), model.params["bias"].copy()]
    if kind.startswith("sgd"):
        m = 0.9 if kind == "sgd_momentum" else 0.0
        opt = nn.SGD(model, lr=0.1, momentum=m, weight_decay=0.01,
                     decoupled_weight_decay=0.02, l1=0.05)
        bufs = [np.empty_like(w) for w in ws]
    else:
        l2 = kind == "adam_l2"
        opt = nn.AdamW(model, lr=0.05, weight_decay=0.1 if l2 else 0.0,
                       decoupled_weight_decay=0.0 if l2 else 0.1, l1=0.01)
        ms, vs = [np.zeros_like(w) for w in ws], [np.zeros_like(w) for w in ws]
    for t in range(1, 6):
        _fill_grads(model, target)
        gs = [ws[0] - target, ws[1].copy()]
        opt.step()
        if kind.startswith("sgd"):
            fastreg.sgd_step(ws, gs, lr=0.1, momentum=m, weight_decay=0.01,
                             decoupled_weight_decay=0.02, l1=0.05,
                             momentum_buffer=bufs if m else None, first_step=t == 1)
        else:
            fastreg.adam_step(ws, gs, ms, vs, step=t, lr=0.05, weight_decay=0.1, l1=0.01,
                              decoupled_weight_decay=not l2)
    np.testing.assert_array_equal(model.params["weight"], ws[0])
    np.testing.assert_array_equal(model.params["bias"], ws[1])


def test_sgd_with_l1_reaches_exact_zeros(rng):
    model, target = _quadratic_model(rng)
    target[np.abs(target) < 0.8] = 0.0                  # a sparse optimum
    opt = nn.SGD(model, lr=0.2, l1=0.05)
    for _ in range(200):
        _fill_grads(model, target)
        opt.step()
    w = model.params["weight"]
    assert np.all(w[target == 0] == 0.0), "L1 prox leaves exact zeros where the optimum is 0"
    assert np.all(w[target != 0] != 0.0)


def test_adamw_rejects_two_kinds_of_decay():
    with pytest.raises(ValueError, match="AdamW: 'weight_decay' .* cannot both be > 0"):
        nn.AdamW(nn.Linear(2, 2), weight_decay=0.1, decoupled_weight_decay=0.1)
    with pytest.raises(TypeError, match="SGD: 'model' must be a fastreg.nn.Module"):
        nn.SGD({"w": np.zeros(3)}, lr=0.1)
