"""Run every op forward and backward on fixed data; save the results to an .npz.

Used by test_determinism.py in subprocesses (different thread counts, cold and
warm Numba cache). Prints the wall time of the first calls (compile or cache load).
Usage: python _run_all_ops.py OUT.npz
"""

import sys
import time

import numpy as np

import fastreg


def run():
    rng = np.random.default_rng(1234)
    results = {}

    def data(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 2 + 0.5

    # row counts that do not divide by 2 or by the block count
    x = data(1001, 257)
    w, b = data(257), data(257)
    y, m, r = fastreg.layer_norm(x, w, b)
    results["ln"] = (y, m, r, *fastreg.layer_norm_backward(data(*x.shape), x, m, r, w, b))
    y, r = fastreg.rms_norm(x, w)
    results["rms"] = (y, r, *fastreg.rms_norm_backward(data(*x.shape), x, r, w))

    # bn_nchw_big: over 8 MiB, so training walks the chunks in memory order (17 sample blocks)
    for name, shape, axis in [("bn_nchw", (9, 7, 33, 17), 1), ("bn_nhwc", (9, 33, 17, 7), -1),
                              ("bn_2d", (1003, 65), 1), ("bn_nchw_big", (17, 6, 161, 159), 1)]:
        x = data(*shape)
        C = shape[axis]
        w, b, rm, rv = data(C), data(C), np.zeros(C, np.float32), np.ones(C, np.float32)
        y, m, r = fastreg.batch_norm(x, w, b, rm, rv, axis=axis, activation="relu")
        g = fastreg.batch_norm_backward(data(*shape), x, m, r, w, b, axis=axis, y=y,
                                        activation="relu")
        results[name] = (y, m, r, rm, rv, *g)
        # the split steps (sync batch norm), on two uneven slices
        parts = [fastreg.batch_norm_stats(xs, axis=axis) for xs in (x[:2], x[2:])]
        n, m, v = fastreg.batch_norm_combine(*(np.stack([p[i] for p in parts]) for i in range(3)))
        y, r = fastreg.batch_norm_apply(x, m, v, w, b, rm, rv, count=int(n[0]), axis=axis)
        dy = data(*shape)
        sdy, sdx = fastreg.batch_norm_backward_reduce(dy, x, m, r, axis=axis)
        dx = fastreg.batch_norm_backward_apply(dy, x, m, r, w, sdy, sdx, count=int(n[0]),
                                               axis=axis)
        results[name + "_split"] = (*parts[0], *parts[1], n, m, v, y, r, rm, rv, sdy, sdx, dx)

    for name, shape, axis in [("gn_nchw", (5, 12, 9, 11), 1), ("gn_nhwc", (5, 9, 11, 12), -1)]:
        x = data(*shape)
        w, b = data(12), data(12)
        y, m, r = fastreg.group_norm(x, 3, w, b, axis=axis)
        results[name] = (y, m, r, *fastreg.group_norm_backward(data(*shape), x, m, r, 3, w, b,
                                                               axis=axis))
        rm, rv = np.zeros(12, np.float32), np.ones(12, np.float32)
        y, m, r = fastreg.instance_norm(x, w, b, rm, rv, axis=axis)
        results["in" + name[2:]] = (y, m, r, rm, rv,
                                    *fastreg.instance_norm_backward(data(*shape), x, m, r, w, b,
                                                                    axis=axis))
    return results


if __name__ == "__main__":
    t0 = time.perf_counter()
    res = run()
    elapsed = time.perf_counter() - t0
    arrays = {f"{k}_{i}": v for k, vals in res.items() for i, v in enumerate(vals)}
    np.savez(sys.argv[1], **arrays)
    print(f"first calls of every op: {elapsed:.2f} s")
