"""The prox issue's CPU targets, measured side by side with paired ratios.

    python bench/prox_targets.py [--n 16777216,33554432] [--rounds 21]

For each parameter size (float32, reused buffers, well past the L3 cache):

- copy: NumPy's copyto and a Numba prange copy (bytes read + written); the
  ceiling is the faster;
- sgd_step with momentum, decoupled weight decay and L1 (bytes: w, g, buffer
  read; w, buffer written) against PyTorch's foreach SGD with momentum and
  weight decay followed by ``softshrink(w, out=w)``;
- adamw_step with L1 (w, g, m, v read; w, m, v written) against PyTorch's
  fused AdamW followed by ``softshrink(w, out=w)``;
- prox_l1 in place (w read and written) against ``softshrink(w, out=w)``.

Every round times each peer once, in a shuffled order; the report gives
median times, GB/s over the minimal bytes, % of the copy ceiling, and the
median over rounds of the per-round ratio torch / fastreg (x > 1: fastreg
faster), so a busy spell of a shared machine hits both sides of a ratio.
PyTorch runs with THP_MEM_ALLOC_ENABLE=1, set before it is imported.
"""

import argparse
import os
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402

import fastreg  # noqa: E402
from fastreg import _bench  # noqa: E402

LR, L1, MOMENTUM, WD = 1e-3, 1e-2, 0.9, 1e-2


def peers(n, torch):
    rng = np.random.default_rng(0)
    f32 = np.float32
    w, g = rng.standard_normal(n, dtype=f32), rng.standard_normal(n, dtype=f32) * 1e-2
    buf, m, v = np.zeros(n, f32), np.zeros(n, f32), np.zeros(n, f32)
    wa, wp = w.copy(), w.copy()
    src, dst = np.ones(n, f32), np.zeros(n, f32)
    copy = _bench.copy_kernel()
    step = {"sgd": 0, "adamw": 0}

    def sgd():
        step["sgd"] += 1
        fastreg.sgd_step(w, g, lr=LR, momentum=MOMENTUM, decoupled_weight_decay=WD, l1=L1,
                         momentum_buffer=buf, first_step=step["sgd"] == 1)

    def adamw():
        step["adamw"] += 1
        fastreg.adamw_step(wa, g, m, v, step=step["adamw"], lr=LR, weight_decay=WD, l1=L1)

    runs = {"copy numpy": (lambda: np.copyto(dst, src), 2),
            "copy numba": (lambda: copy(src, dst), 2),
            "sgd_step": (sgd, 5), "adamw_step": (adamw, 7),
            "prox_l1": (lambda: fastreg.prox_l1(wp, LR * L1, out=wp), 2)}
    if torch is not None:
        softshrink = torch._C._nn.softshrink
        tg = torch.from_numpy(g)
        ps = torch.nn.Parameter(torch.from_numpy(w.copy()))
        ps.grad = tg
        sgd_t = torch.optim.SGD([ps], lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=True)
        pa = torch.nn.Parameter(torch.from_numpy(w.copy()))
        pa.grad = tg
        adamw_t = torch.optim.AdamW([pa], lr=LR, weight_decay=WD, fused=True)
        tp = torch.from_numpy(w.copy())

        def torch_sgd():
            sgd_t.step()
            softshrink(ps.data, LR * L1, out=ps.data)

        def torch_adamw():
            adamw_t.step()
            softshrink(pa.data, LR * L1, out=pa.data)

        runs.update({"torch sgd": (torch_sgd, 5), "torch adamw": (torch_adamw, 7),
                     "torch softshrink": (lambda: softshrink(tp, LR * L1, out=tp), 2)})
    return runs


def measure(n, rounds, torch):
    runs = peers(n, torch)
    for fn, _ in runs.values():
        fn()
        fn()
    order = np.random.default_rng(1)
    t = {k: [] for k in runs}
    for _ in range(rounds):
        for k in order.permutation(list(runs)):
            fn = runs[k][0]
            t0 = time.perf_counter()
            fn()
            t[k].append(time.perf_counter() - t0)
    t = {k: np.array(v) for k, v in t.items()}
    nbytes = {k: s * 4 * n for k, (_, s) in runs.items()}
    ceiling = max(nbytes[k] / np.median(t[k]) for k in ("copy numpy", "copy numba"))
    print(f"n = {n} float32 ({4 * n / 2**20:.0f} MiB per array), {rounds} rounds; "
          f"copy ceiling {ceiling / 1e9:.1f} GB/s")
    for k in runs:
        med = np.median(t[k])
        gbs = nbytes[k] / med
        print(f"  {k:17s} {med * 1e3:8.2f} ms  {gbs / 1e9:6.1f} GB/s  {100 * gbs / ceiling:4.0f}% "
              f"of copy")
    if torch is not None:
        for ours, theirs, target in (("sgd_step", "torch sgd", 1.8),
                                     ("adamw_step", "torch adamw", 1.0),
                                     ("prox_l1", "torch softshrink", 1.0)):
            ratio = np.median(t[theirs] / t[ours])
            print(f"  {ours} vs {theirs}: {ratio:.2f}x (median of paired rounds; target >= "
                  f"{target:g}x)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default=f"{1 << 24},{1 << 25}",
                   help="comma-separated element counts")
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args()
    torch = _bench.import_torch()
    info = _bench.machine_info(torch)
    print("\n".join(_bench.describe(info)))
    for n in (int(s) for s in args.n.split(",")):
        measure(n, args.rounds, torch)


if __name__ == "__main__":
    main()
