"""fastreg.nn: every layer's backward against central finite differences (float64),
Sequential against the hand-composed chain, buffers reused between steps,
state dicts, EarlyStopping exactly as specified, and a short training run."""

import numpy as np
import pytest

import fastreg
from fastreg import nn


def _fd_check(layer, x, rng, training=True, n_probe=12, h=1e-6, rtol=1e-6, atol=1e-7,
              reset=None):
    """backward(G) against central differences of sum(forward(x) * G), on sampled entries
    of x and of every parameter. ``reset()``, when given, runs before every forward (to
    rewind a random layer's generator, so every forward draws the same mask)."""
    reset = reset or (lambda: None)
    reset()
    y = layer.forward(x, training).copy()
    G = rng.standard_normal(y.shape)
    dx = layer.backward(G).copy()
    grads = {k: g.copy() for k, g in layer.grads.items()}

    def loss():
        reset()
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


# --------------------------------------------------------------------------- random layers

def _rewind(layer, attr):
    """A reset() that puts the layer's generator back where it is now."""
    state = getattr(layer, attr).state
    return lambda: setattr(layer, attr, fastreg.random.Generator(*state))


@pytest.mark.parametrize("mode", ["inverted", "weight_scaling"])
@pytest.mark.parametrize("mask", ["bits", "seed"])
def test_dropout_backward_is_exact_with_a_fixed_mask(mode, mask, rng):
    p = 0.3
    layer = nn.Dropout(p, mode=mode, mask=mask, rng=int(rng.integers(2**63)))
    x = rng.standard_normal((7, 13))
    reset = _rewind(layer, "rng")
    y = layer.forward(x).copy()
    keep = layer.last_mask.to_bool()
    assert 0 < keep.sum() < keep.size
    scale = 1 / (1 - p) if mode == "inverted" else 1.0
    np.testing.assert_array_equal(y, x * keep * scale)
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward(dy), dy * keep * scale)
    _fd_check(layer, x, rng, reset=reset)


@pytest.mark.parametrize("mode", ["inverted", "weight_scaling"])
def test_dropout_inference_scales_by_mode_and_draws_nothing(mode, rng):
    p = 0.25
    layer = nn.Dropout(p, mode=mode, rng=5)
    x = rng.standard_normal((4, 9)).astype(np.float32)
    dy = rng.standard_normal((4, 9)).astype(np.float32)
    y = layer.forward(x, training=False)
    expect = x if mode == "inverted" else x * np.float32(1 - p)
    np.testing.assert_array_equal(y, expect)
    np.testing.assert_array_equal(layer.backward(dy),
                                  dy if mode == "inverted" else dy * np.float32(1 - p))
    assert layer.rng.offset == 0, "inference draws no random numbers"
    # the expected training output equals the inference output (averaged over masks)
    layer.p, draws = 0.5, 50
    mean = np.mean([layer.forward(np.ones((64, 64)), training=True).mean()
                    for _ in range(draws)])
    at_inference = layer.forward(np.ones((64, 64)), training=False).mean()
    sd = (1.0 if mode == "inverted" else 0.5) / np.sqrt(draws * 64 * 64)   # of the mean
    assert abs(mean - at_inference) < 5 * sd


def test_gaussian_noise_adds_the_stream_normals_and_is_the_identity_at_inference(rng):
    layer = nn.GaussianNoise(0.2, rng=fastreg.random.Generator(77, 10))
    x = rng.standard_normal((6, 5))
    y = layer.forward(x)
    z = fastreg.random.normal(x.shape, rng=fastreg.random.Generator(77, 10), dtype=np.float64)
    np.testing.assert_allclose(y, x + 0.2 * z, rtol=0, atol=1e-15)
    assert layer.rng.offset == 10 + 8                      # ceil(30 / 4) blocks
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    np.testing.assert_array_equal(layer.forward(x, training=False), x)
    assert layer.rng.offset == 18
    _fd_check(layer, x, rng, reset=_rewind(layer, "rng"))


DROPCONNECT = [
    ("batch-inverted", dict(per_example=False, mode="inverted"), (6, 7)),
    ("batch-weight-scaling", dict(per_example=False, mode="weight_scaling"), (6, 7)),
    ("per-example", dict(per_example=True, mode="inverted"), (5, 7)),
    ("per-example-3d", dict(per_example=True, mode="inverted"), (2, 3, 7)),
]


@pytest.mark.parametrize("name,kw,shape", DROPCONNECT, ids=[c[0] for c in DROPCONNECT])
def test_drop_connect_linear_backward_matches_finite_differences(name, kw, shape, rng):
    layer = nn.DropConnectLinear(7, 4, p=0.4, rng=rng, dtype=np.float64, **kw)
    _randomize(layer, rng)
    x = rng.standard_normal(shape)
    reset = _rewind(layer, "mask_rng")
    _fd_check(layer, x, rng, reset=reset)
    # the forward is the Linear layer of the masked, scaled weight
    reset()
    y = layer.forward(x)
    mask = layer._saved[1]
    keep = mask.to_bool()
    w, b = layer.params["weight"], layer.params["bias"]
    scale = 1 / 0.6 if kw["mode"] == "inverted" else 1.0
    if kw["per_example"]:
        expect = np.einsum("...oi,...i->...o", keep * w * scale, x) + b
    else:
        expect = x @ (keep * w * scale).T + b
    np.testing.assert_allclose(y, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["inverted", "weight_scaling"])
def test_drop_connect_linear_inference_uses_the_mean_weight(mode, rng):
    layer = nn.DropConnectLinear(5, 3, p=0.2, bias=False, rng=rng, mode=mode, dtype=np.float64)
    x = rng.standard_normal((4, 5))
    w = layer.params["weight"] * (1.0 if mode == "inverted" else 0.8)
    np.testing.assert_allclose(layer.forward(x, training=False), x @ w.T, rtol=1e-13)
    assert layer.mask_rng.offset == 0
    _fd_check(layer, x, rng, training=False)


def _random_layers(seed):
    return [nn.Dropout(0.4, rng=seed), nn.Dropout(0.4, mask="seed", rng=seed),
            nn.GaussianNoise(0.3, rng=seed),
            nn.DropConnectLinear(6, 6, 0.4, rng=seed),
            nn.DropConnectLinear(6, 6, 0.4, per_example=True, rng=seed)]


def test_random_layers_are_reproducible_from_a_seed_and_advance_per_call(rng):
    x = rng.standard_normal((5, 6)).astype(np.float32)
    seed = int(rng.integers(2**63))
    runs = []
    for _ in range(2):
        runs.append([[layer.forward(x).copy() for _ in range(3)] for layer in
                     _random_layers(seed)])
    for a_layer, b_layer in zip(*runs):
        for a, b in zip(a_layer, b_layer):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a_layer[0], a_layer[1]), "each call draws new randomness"
    # each call advances the generator by the blocks it used
    drop, _, noise, dc, dc_ex = _random_layers(seed)
    for layer, attr, blocks in [(drop, "rng", 8), (noise, "rng", 8), (dc, "mask_rng", 9),
                                (dc_ex, "mask_rng", 45)]:
        before = getattr(layer, attr).offset
        layer.forward(x)
        assert getattr(layer, attr).offset == before + blocks


def test_random_layers_share_a_fastreg_generator_and_take_a_numpy_one(rng):
    gen = fastreg.random.Generator(3)
    a, b = nn.Dropout(0.5, rng=gen), nn.GaussianNoise(1.0, rng=gen)
    x = np.ones((4, 4), np.float32)
    a.forward(x)
    b.forward(x)
    assert gen.offset == 8 and a.rng is gen and b.rng is gen
    one = nn.Dropout(0.5, rng=np.random.default_rng(9)).forward(x).copy()
    two = nn.Dropout(0.5, rng=np.random.default_rng(9)).forward(x)
    np.testing.assert_array_equal(one, two)


def test_random_layers_reuse_their_buffers(rng):
    x = rng.standard_normal((5, 6)).astype(np.float32)
    dy = rng.standard_normal((5, 6)).astype(np.float32)
    for layer in _random_layers(1):
        y1 = layer.forward(x)
        bits1 = getattr(layer.last_mask, "bits", None) if isinstance(layer, nn.Dropout) else None
        dx1 = layer.backward(dy)
        y2 = layer.forward(x)
        dx2 = layer.backward(dy)
        name = type(layer).__name__
        assert np.shares_memory(y1, y2) and np.shares_memory(dx1, dx2), name
        if bits1 is not None:
            assert layer.last_mask.bits is bits1, "the mask bits buffer is reused"


def test_random_layers_do_not_modify_inputs(rng):
    x = rng.standard_normal((5, 6)).astype(np.float32)
    dy = rng.standard_normal((5, 6)).astype(np.float32)
    x0, dy0 = x.copy(), dy.copy()
    for layer in _random_layers(2):
        layer.forward(x)
        layer.backward(dy)
    assert np.array_equal(x, x0) and np.array_equal(dy, dy0)


def test_sequential_with_random_layers_equals_the_hand_chain(rng):
    def build():
        return [nn.GaussianNoise(0.1, rng=1), nn.DropConnectLinear(8, 6, 0.3, rng=2,
                                                                    dtype=np.float64),
                nn.ReLU(), nn.Dropout(0.3, rng=3), nn.Linear(6, 2, rng=4, dtype=np.float64)]
    layers, model = build(), nn.Sequential(*build())
    x = rng.standard_normal((9, 8))
    dy = rng.standard_normal((9, 2))
    for _ in range(2):                                  # the second step draws new masks
        h = x
        for layer in layers:
            h = layer.forward(h)
        g = dy
        for layer in reversed(layers):
            g = layer.backward(g)
        np.testing.assert_array_equal(model.forward(x), h)
        np.testing.assert_array_equal(model.backward(dy), g)
        np.testing.assert_array_equal(model.grads["1.weight"], layers[1].grads["weight"])


def test_random_layer_arguments_are_validated():
    with pytest.raises(ValueError, match="Dropout: 'p' must be a finite number >= 0"):
        nn.Dropout(-0.1)
    with pytest.raises(ValueError, match="Dropout: 'mode' must be one of"):
        nn.Dropout(0.1, mode="scaled")
    with pytest.raises(ValueError, match="Dropout: 'mask' must be one of"):
        nn.Dropout(0.1, mask="bool")
    with pytest.raises(TypeError, match="Dropout: 'rng' must be a fastreg.random.Generator"):
        nn.Dropout(0.1, rng=1.5)
    with pytest.raises(ValueError, match="GaussianNoise: 'std' must be a finite number >= 0"):
        nn.GaussianNoise(-1.0)
    with pytest.raises(ValueError, match="DropConnectLinear: 'p' must be"):
        nn.DropConnectLinear(3, 2, p=1.5)
    with pytest.raises(TypeError, match="DropConnectLinear: 'per_example' must be True or"):
        nn.DropConnectLinear(3, 2, per_example=1)
    with pytest.raises(ValueError, match="DropConnectLinear.forward: 'x' must have 3 features"):
        nn.DropConnectLinear(3, 2, rng=0).forward(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="Dropout.forward: 'training' must be True or False"):
        nn.Dropout(0.1, rng=0).forward(np.zeros(3, np.float32), training=None)
    with pytest.raises(RuntimeError, match="call forward"):
        nn.Dropout(0.1, rng=0).backward(np.zeros(3))
    with pytest.raises(ValueError, match="GaussianNoise.backward: 'dy' must have"):
        layer = nn.GaussianNoise(0.1, rng=0)
        layer.forward(np.zeros(3, np.float32))
        layer.backward(np.zeros(4, np.float32))


# --------------------------------------------------------------------------- constraints, loss

def test_max_norm_constraint_runs_after_each_step_on_the_weights_only(rng):
    model = nn.Sequential(nn.Linear(6, 5, rng=rng, dtype=np.float64),
                          nn.LayerNorm(5, dtype=np.float64),
                          nn.Linear(5, 3, rng=rng, dtype=np.float64))
    for k, p in model.params.items():
        p[...] = rng.standard_normal(p.shape)
    constraint = nn.MaxNorm(model, 1.5)
    assert constraint.names == ["0.weight", "2.weight"]
    opt = nn.SGD(model, lr=0.1, constraints=[constraint])
    expect = {k: v.copy() for k, v in model.params.items()}
    for k, g in model.grads.items():
        g[...] = rng.standard_normal(g.shape)
    opt.step()
    for k in expect:
        fastreg.sgd_step(expect[k], model.grads[k], lr=0.1)
        if k in constraint.names:
            fastreg.max_norm(expect[k], 1.5, axis=1, out=expect[k])
        np.testing.assert_array_equal(model.params[k], expect[k])
    norms = np.linalg.norm(model.params["0.weight"], axis=1)
    assert np.all(norms <= 1.5) and np.any(norms > 1.5 - 1e-6)
    assert not np.array_equal(model.params["1.weight"], np.ones(5)), "gains unconstrained"
    with pytest.raises(TypeError, match="SGD: 'constraints\\[0\\]' must have an apply"):
        nn.SGD(model, lr=0.1, constraints=[lambda: None])
    with pytest.raises(ValueError, match="MaxNorm: 'names' must name parameters"):
        nn.MaxNorm(model, 1.0, names=["0.kernel"])


def test_optimizer_names_act_as_parameter_groups(rng):
    model, target = _quadratic_model(rng)
    w0, b0 = model.params["weight"].copy(), model.params["bias"].copy()
    decay = nn.SGD(model, lr=0.1, decoupled_weight_decay=0.5, names=["weight"])
    plain = nn.SGD(model, lr=0.1, names=["bias"])
    _fill_grads(model, target)
    gw, gb = model.grads["weight"].copy(), model.grads["bias"].copy()
    decay.step()
    plain.step()
    fastreg.sgd_step(w0, gw, lr=0.1, decoupled_weight_decay=0.5)
    fastreg.sgd_step(b0, gb, lr=0.1)
    np.testing.assert_array_equal(model.params["weight"], w0)
    np.testing.assert_array_equal(model.params["bias"], b0)
    with pytest.raises(ValueError, match="AdamW: 'names' must name parameters"):
        nn.AdamW(model, names=["w"])
    with pytest.raises(ValueError, match="SGD: 'names' must not repeat"):
        nn.SGD(model, lr=0.1, names=["bias", "bias"])


@pytest.mark.parametrize("style", ["uniform", "others"])
def test_cross_entropy_loss_matches_its_definition(style, rng):
    N, K, s = 7, 5, 0.2
    logits = rng.standard_normal((N, K))
    target = rng.integers(0, K, N)
    q = np.full((N, K), s / K if style == "uniform" else s / (K - 1))
    q[np.arange(N), target] = 1 - s + (s / K if style == "uniform" else 0.0)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))

    def loss_of(z):
        zz = z - z.max(1, keepdims=True)
        return float(-np.mean(np.sum(q * (zz - np.log(np.exp(zz).sum(1, keepdims=True))), 1)))

    ce = nn.CrossEntropyLoss(s, style=style)
    loss, d = ce(logits, target)
    assert isinstance(loss, float)
    np.testing.assert_allclose(loss, -np.mean(np.sum(q * logp, 1)), rtol=1e-12)
    np.testing.assert_allclose(d, (np.exp(logp) - q) / N, rtol=1e-10, atol=1e-15)
    h = 1e-6
    for i, k in [(0, 0), (3, 2), (6, 4)]:
        up, down = logits.copy(), logits.copy()
        up[i, k] += h
        down[i, k] -= h
        assert abs((loss_of(up) - loss_of(down)) / (2 * h) - d[i, k]) < 1e-8
    # buffers reused; per-row losses of (..., K) logits
    assert np.shares_memory(d, ce(logits, target)[1])
    rows, d3 = nn.CrossEntropyLoss(s, style=style, reduction="none")(
        logits.reshape(1, N, K), target.reshape(1, N))
    assert rows.shape == (1, N) and d3.shape == (1, N, K)
    np.testing.assert_allclose(rows.mean(), loss, rtol=1e-12)
    with pytest.raises(ValueError, match="CrossEntropyLoss: 'style' must be one of"):
        nn.CrossEntropyLoss(0.1, style="soft")


def test_training_with_dropout_and_drop_connect_lowers_the_loss(rng):
    X = rng.standard_normal((256, 8)).astype(np.float32)
    labels = np.argmax(X @ rng.standard_normal((8, 3)).astype(np.float32), axis=1)
    model = nn.Sequential(nn.GaussianNoise(0.05, rng=1), nn.DropConnectLinear(8, 32, 0.2, rng=2),
                          nn.ReLU(), nn.Dropout(0.2, rng=3), nn.Linear(32, 3, rng=4))
    loss_fn = nn.CrossEntropyLoss(0.05)
    opt = nn.AdamW(model, lr=0.01, constraints=[nn.MaxNorm(model, 3.0)])
    first, _ = loss_fn(model.forward(X, training=False), labels)
    for _ in range(80):
        _, d = loss_fn(model.forward(X), labels)
        model.backward(d)
        opt.step()
    last, _ = loss_fn(model.forward(X, training=False), labels)
    assert last < 0.5 * first
