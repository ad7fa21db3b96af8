"""Run every dropout-family op forward and backward on fixed data; save to an .npz.

Used by test_dropout.py in-process (1 vs 2 threads) and in subprocesses (a
cold Numba cache at 2 threads, then the cache loaded at 1 thread). Prints
the wall time of the first calls (compilation or cache load).
Usage: python _run_dropout_ops.py OUT.npz
"""

import sys
import time

import numpy as np

import fastreg
from fastreg.random import Generator


def run():
    rng = np.random.default_rng(5)
    x64 = rng.standard_normal(50_001)
    x32 = x64.astype(np.float32)
    out = {}
    g = Generator(123, 2**32 - 100)
    out["dropout"], m = fastreg.dropout(x32, 0.3, rng=g)
    out["bits"] = m.bits
    out["dropout_bwd"] = fastreg.dropout_backward(x32, m)
    out["dropout64"], m = fastreg.dropout(x64, 0.3, rng=g, mask="seed")
    out["dropout64_bwd"] = fastreg.dropout_backward(x64, m)
    out["gn"] = fastreg.gaussian_noise(x64, 0.5, rng=g)
    out["gd"], gm = fastreg.gaussian_dropout(x32, 0.3, rng=g)
    out["gd_bwd"] = fastreg.gaussian_dropout_backward(x32, gm)
    out["bits_stream"] = fastreg.random.random_bits(10_007, rng=g)
    out["uniform"] = fastreg.random.uniform(10_007, rng=g)
    out["normal"] = fastreg.random.normal(10_007, rng=g, dtype=np.float64)
    out["philox"] = fastreg.random.philox4x32(out["bits_stream"][:400].reshape(100, 4),
                                              out["bits_stream"][400:402])
    w = x64[:37 * 61].reshape(37, 61)
    xs = x64[:9 * 61].reshape(9, 61)
    for pe in (False, True):
        out[f"dc{pe}"], dm = fastreg.drop_connect(xs, w, None, 0.3, rng=g, per_example=pe)
        grads = fastreg.drop_connect_backward(out[f"dc{pe}"] + 1, xs, w, dm)
        for i, gr in enumerate(grads):
            out[f"dc{pe}_bwd{i}"] = gr
    out["dci"] = fastreg.drop_connect_inference(xs, w, None, 0.3, activation="tanh",
                                                n_samples=17, rng=g)
    xr = x32[:257 * 129].reshape(257, 129)
    y, s, mean, rstd, mask = fastreg.dropout_add_layer_norm(xr, xr[::-1], None, xr[0], 0.2,
                                                            rng=g)
    out.update(ln_y=y, ln_s=s, ln_mean=mean, ln_rstd=rstd)
    for i, gr in enumerate(fastreg.dropout_add_layer_norm_backward(y, s, mean, rstd, None, xr[0],
                                                                   mask, dresidual_sum=s)):
        if gr is not None:
            out[f"ln_bwd{i}"] = gr
    y, s, mean, rstd, mask = fastreg.dropout_add_layer_norm(xr[:, :100], xr[:, 3:103], xr[1, :100],
                                                            None, 0.2, rng=g, mask="bits")
    out.update(lnb_y=y, lnb_s=s, lnb_bits=mask.bits)
    for i, gr in enumerate(fastreg.dropout_add_layer_norm_backward(y, s, mean, rstd, xr[1, :100],
                                                                   None, mask)):
        if gr is not None:
            out[f"lnb_bwd{i}"] = gr
    out["offset"] = np.array([g.offset], np.uint64)
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    res = run()
    elapsed = time.perf_counter() - t0
    np.savez(sys.argv[1], **res)
    print(f"first calls of every dropout-family op: {elapsed:.2f} s")
