"""The README's prox examples run and show what they claim."""

import numpy as np

import fastreg


def test_l2_versus_decoupled_weight_decay_example():
    # Adam's L2 penalty vs AdamW's decoupled weight decay: one flag apart
    scale = np.array([1e-3, 1e-1, 1e1, 1e3], np.float32)   # curvature of each weight's loss
    final = {}
    for decoupled in (False, True):
        w, m, v = np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
        for t in range(1, 3001):
            g = scale * (w - 1)                              # the loss pulls every w to 1
            fastreg.adam_step(w, g, m, v, step=t, lr=1e-2, weight_decay=1.0,
                              decoupled_weight_decay=decoupled)
        final[decoupled] = w
    # L2 through Adam's normalization decays a weight the more, the flatter its loss;
    # decoupled decay shrinks every weight alike
    assert final[False][0] < 0.01 and final[False][3] > 0.99
    assert np.ptp(final[True]) < 1e-3 and 0.9 < final[True][0] < 1.0


def test_l1_exact_zeros_example():
    # L1 in the optimizer: the prox step leaves exact zeros, a sign subgradient does not
    rng = np.random.default_rng(0)
    target = np.where(rng.random(10_000) < 0.1, rng.standard_normal(10_000), 0).astype(np.float32)
    target += 0.01 * rng.standard_normal(10_000).astype(np.float32)
    w_prox, w_sub = np.zeros_like(target), np.zeros_like(target)
    for _ in range(200):
        fastreg.sgd_step(w_prox, w_prox - target, lr=0.1, l1=0.05)                # prox
        fastreg.sgd_step(w_sub, w_sub - target + 0.05 * np.sign(w_sub), lr=0.1)   # subgradient
    assert (w_prox == 0).mean() > 0.85 and (w_sub == 0).mean() == 0
