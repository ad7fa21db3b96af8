"""Run every prox-family op on fixed data; save the results to an .npz.

Used by test_prox_determinism.py in subprocesses (different thread counts,
cold and warm Numba cache). Sizes span several kernel chunks and statistic
blocks, so the parallel paths run. Usage: python _run_prox_ops.py OUT.npz
"""

import sys
import time

import numpy as np

import fastreg


def run():
    rng = np.random.default_rng(4321)
    res = {}

    def data(*shape, dtype=np.float32):
        return (rng.standard_normal(shape) * 2).astype(dtype)

    w = data(300_007)
    res["prox_l1"] = (fastreg.prox_l1(w, 0.5), fastreg.prox_l1(w, np.abs(data(300_007)) * 0.3))
    res["prox_en"] = (fastreg.prox_elastic_net(w, 0.5, 0.1),)
    m = data(1001, 257)
    res["group"] = (fastreg.prox_group_l1(m, 15.0, axis=1), fastreg.prox_group_l1(m, 30.0, axis=0),
                    fastreg.max_norm(m, 15.0, axis=1), fastreg.max_norm(m, 30.0, axis=0),
                    fastreg.max_norm(m, 300.0, axis=None))
    ws = [data(200_003), data(17), data(65_537, dtype=np.float64)]
    gs = [data(*a.shape, dtype=a.dtype) for a in ws]
    bufs = [np.zeros_like(a) for a in ws]
    for step in range(3):
        fastreg.sgd_step(ws, gs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                         decoupled_weight_decay=0.1, l1=0.2, momentum_buffer=bufs,
                         first_step=step == 0)
    res["sgd"] = (*ws, *bufs)
    ws = [data(200_003), data(33, 7)]
    gs = [data(*a.shape) for a in ws]
    ms, vs, vmax = ([np.zeros_like(a) for a in ws] for _ in range(3))
    for step in range(1, 4):
        fastreg.adamw_step(ws, gs, ms, vs, step=step, lr=0.01, amsgrad=True, max_exp_avg_sq=vmax,
                           l1=0.1)
    res["adamw"] = (*ws, *ms, *vs, *vmax)
    z = data(301, 1003)
    t = rng.integers(0, 1003, 301)
    t[::7] = -100
    res["ce"] = fastreg.cross_entropy_label_smoothing(z, t, smoothing=0.1, ignore_index=-100)
    x = data(5003, 31) + 3
    res["standardize"] = fastreg.standardize(x, axis=0)
    res["min_max"] = fastreg.min_max_scale(x, axis=0)
    res["standardize_rows"] = fastreg.standardize(x, axis=1)
    return res


if __name__ == "__main__":
    t0 = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - t0
    np.savez(sys.argv[1], **{f"{k}_{i}": v for k, vals in out.items() for i, v in enumerate(vals)})
    print(f"first calls of every prox op: {elapsed:.2f} s")
