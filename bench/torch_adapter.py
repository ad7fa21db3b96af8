"""fastreg.torch's modules against PyTorch's, side by side on the CPU.

    python bench/torch_adapter.py [--repeats 30] [--quick] [--threads N]

Two tables (markdown):

1. Realistic shapes: a training step of one layer (forward + backward, fresh
   gradients each step, as in a training loop) and an eval forward
   (``torch.no_grad``), PyTorch's module against the same module after
   ``fastreg.torch.convert``. Medians of ``--repeats`` round-robin repeats
   (PyTorch, fastreg, PyTorch, ...), so both sides see the same machine
   load; ``x torch`` is PyTorch's median over fastreg's (> 1: fastreg faster).
2. Adapter overhead at small shapes: the converted module's call against
   fastreg's public functions called directly on NumPy views with
   preallocated outputs; the difference is what the adapter adds per call
   (checks, views, PyTorch-allocated outputs, autograd bookkeeping).

3. The dropout family (``--only dropout``): a training step (forward +
   backward) of ``fastreg.torch.Dropout`` (1-bit and zero-byte masks) and
   ``DropoutAddLayerNorm`` against ``nn.Dropout`` and PyTorch's unfused
   ``LayerNorm(residual + dropout(x))``, and their eval forwards.
4. Optimizers (``--only optim``): one ``step()`` of ``fastreg.torch.optim``'s
   SGD (momentum) and AdamW against ``torch.optim``'s default (a loop over
   tensors on the CPU), ``foreach=True`` and ``fused=True``, at a few
   parameter counts; gradients set once, the step alone timed.

``THP_MEM_ALLOC_ENABLE=1`` is set before torch is imported: PyTorch's CPU
allocator then uses transparent huge pages for large tensors, which cuts the
page faults of fresh outputs (both sides allocate through it).
``OMP_WAIT_POLICY=PASSIVE`` likewise, unless set: PyTorch's and Numba's
OpenMP pools otherwise spin on each other's cores.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # must precede the torch import
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch and numba load OpenMP

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastreg  # noqa: E402
import fastreg.torch as ft  # noqa: E402

nn = torch.nn
CL = torch.channels_last

# label, module factory, input shape, memory format
CASES = [
    ("LayerNorm(768)", lambda: nn.LayerNorm(768), (32, 128, 768), None),
    ("LayerNorm(4096)", lambda: nn.LayerNorm(4096), (4, 256, 4096), None),
    ("RMSNorm(768)", lambda: nn.RMSNorm(768), (32, 128, 768), None),
    ("RMSNorm(4096)", lambda: nn.RMSNorm(4096), (4, 256, 4096), None),
    ("BatchNorm1d(1024)", lambda: nn.BatchNorm1d(1024), (512, 1024), None),
    ("BatchNorm2d(64)", lambda: nn.BatchNorm2d(64), (32, 64, 56, 56), None),
    ("BatchNorm2d(64) channels_last", lambda: nn.BatchNorm2d(64), (32, 64, 56, 56), CL),
    ("BatchNorm2d(256)", lambda: nn.BatchNorm2d(256), (32, 256, 14, 14), None),
    ("BatchNorm2d(256) channels_last", lambda: nn.BatchNorm2d(256), (32, 256, 14, 14), CL),
    ("GroupNorm(32, 128)", lambda: nn.GroupNorm(32, 128), (16, 128, 32, 32), None),
    ("GroupNorm(32, 128) channels_last", lambda: nn.GroupNorm(32, 128), (16, 128, 32, 32), CL),
    ("InstanceNorm2d(64, affine)", lambda: nn.InstanceNorm2d(64, affine=True), (8, 64, 64, 64),
     None),
    ("BatchNorm3d(32)", lambda: nn.BatchNorm3d(32), (4, 32, 16, 32, 32), None),
]
QUICK = {"LayerNorm(768)", "BatchNorm2d(64)", "BatchNorm2d(64) channels_last",
         "GroupNorm(32, 128)"}

# small shapes for the per-call overhead: label, module factory, input shape
SMALL = [
    ("LayerNorm(64)", lambda: nn.LayerNorm(64), (8, 64)),
    ("RMSNorm(64)", lambda: nn.RMSNorm(64), (8, 64)),
    ("BatchNorm2d(8)", lambda: nn.BatchNorm2d(8), (4, 8, 4, 4)),
    ("GroupNorm(2, 8)", lambda: nn.GroupNorm(2, 8), (4, 8, 4, 4)),
    ("InstanceNorm2d(8)", lambda: nn.InstanceNorm2d(8, affine=True), (4, 8, 4, 4)),
]


def _train_step(module, x, g):
    x.grad = None
    module.zero_grad(set_to_none=True)
    module(x).backward(g)


def _eval_step(module, x, g):
    with torch.no_grad():
        module(x)


def _round_robin(fns, repeats, inner=1):
    """Median seconds per call of each fn, timed in turns (one repeat of each, then again)."""
    times = [[] for _ in fns]
    for fn in fns:  # warm-up (compilation, allocator)
        for _ in range(3):
            fn()
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[k].append((time.perf_counter() - t0) / inner)
    return [statistics.median(t) for t in times]


def realistic(repeats, quick):
    rows = []
    for label, make, shape, fmt in CASES:
        if quick and label not in QUICK:
            continue
        torch.manual_seed(0)
        ref = make()
        ours = ft.convert(copy.deepcopy(ref))
        assert type(ours) is not type(ref), label
        x = torch.randn(shape)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        x.requires_grad_()
        g = torch.randn_like(x)
        r = {}
        for mode, step in (("train", _train_step), ("eval", _eval_step)):
            ref.train(mode == "train"), ours.train(mode == "train")
            r[mode] = _round_robin([lambda: step(ref, x, g), lambda: step(ours, x, g)], repeats)
        rows.append((label, shape, r))
    print("\n| layer | input | train fwd+bwd ms torch | fastreg | x torch | "
          "eval fwd ms torch | fastreg | x torch |")
    print("|---|---|---|---|---|---|---|---|")
    for label, shape, r in rows:
        (tt, tf), (et, ef) = r["train"], r["eval"]
        print(f"| {label} | {'x'.join(map(str, shape))} | {tt * 1e3:.2f} | {tf * 1e3:.2f} | "
              f"{tt / tf:.2f} | {et * 1e3:.2f} | {ef * 1e3:.2f} | {et / ef:.2f} |")


def _direct(module, x):
    """fastreg's public forward/backward on NumPy views with preallocated outputs:
    the adapter's work minus the adapter."""
    xa = x.detach().numpy()
    dy = np.ones_like(xa)
    w = None if module.weight is None else module.weight.detach().numpy()
    b = None if getattr(module, "bias", None) is None else module.bias.detach().numpy()
    if isinstance(module, nn.LayerNorm):
        out = fastreg.layer_norm(xa, w, b, module.eps)
        gout = fastreg.layer_norm_backward(dy, xa, out[1], out[2], w, b)
        return (lambda: fastreg.layer_norm(xa, w, b, module.eps, out=out),
                lambda: fastreg.layer_norm_backward(dy, xa, out[1], out[2], w, b, out=gout))
    if isinstance(module, nn.RMSNorm):
        eps = torch.finfo(x.dtype).eps
        out = fastreg.rms_norm(xa, w, eps)
        gout = fastreg.rms_norm_backward(dy, xa, out[1], w)
        return (lambda: fastreg.rms_norm(xa, w, eps, out=out),
                lambda: fastreg.rms_norm_backward(dy, xa, out[1], w, out=gout))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        rm, rv = module.running_mean.numpy(), module.running_var.numpy()
        out = fastreg.batch_norm(xa, w, b, rm, rv)
        gout = fastreg.batch_norm_backward(dy, xa, out[1], out[2], w, b)
        return (lambda: fastreg.batch_norm(xa, w, b, rm, rv, out=out),
                lambda: fastreg.batch_norm_backward(dy, xa, out[1], out[2], w, b, out=gout))
    if isinstance(module, nn.GroupNorm):
        G = module.num_groups
        out = fastreg.group_norm(xa, G, w, b, module.eps)
        gout = fastreg.group_norm_backward(dy, xa, out[1], out[2], G, w, b)
        return (lambda: fastreg.group_norm(xa, G, w, b, module.eps, out=out),
                lambda: fastreg.group_norm_backward(dy, xa, out[1], out[2], G, w, b, out=gout))
    out = fastreg.instance_norm(xa, w, b)
    gout = fastreg.instance_norm_backward(dy, xa, out[1], out[2], w, b)
    return (lambda: fastreg.instance_norm(xa, w, b, out=out),
            lambda: fastreg.instance_norm_backward(dy, xa, out[1], out[2], w, b, out=gout))


def overhead(repeats):
    print("\n| layer (small) | input | eval fwd us: module | direct | adapter | "
          "train fwd+bwd us: module | direct | adapter | torch's module fwd+bwd us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, make, shape in SMALL:
        torch.manual_seed(0)
        ref = make()
        ours = ft.convert(copy.deepcopy(ref))
        x = torch.randn(shape, requires_grad=True)
        g = torch.ones(shape)
        fwd, bwd = _direct(ours, x)

        def direct_step():
            fwd()
            bwd()
        ev, dfwd, tr, dstep, tref = _round_robin(
            [lambda: _eval_step(ours, x, g), fwd, lambda: _train_step(ours, x, g), direct_step,
             lambda: _train_step(ref, x, g)], repeats, inner=50)
        print(f"| {label} | {'x'.join(map(str, shape))} | {ev * 1e6:.1f} | {dfwd * 1e6:.1f} | "
              f"{(ev - dfwd) * 1e6:.1f} | {tr * 1e6:.1f} | {dstep * 1e6:.1f} | "
              f"{(tr - dstep) * 1e6:.1f} | {tref * 1e6:.1f} |")


# --------------------------------------------------------------------------- dropout family

def _dal_torch(p):
    norm = nn.LayerNorm(768)

    def run(x, r):
        s = r + nn.functional.dropout(x, p, norm.training)
        return norm(s), s
    run.module = norm
    return run


def dropout_family(repeats, quick):
    shape = (16, 128, 768) if quick else (32, 128, 768)
    p = 0.1
    x = torch.randn(shape, requires_grad=True)
    r = torch.randn(shape, requires_grad=True)
    gy, gs = torch.randn(shape), torch.randn(shape)
    drop = [("nn.Dropout", nn.Dropout(p)), ("fastreg Dropout, 1-bit mask", ft.Dropout(p)),
            ("fastreg Dropout, 0-byte mask", ft.Dropout(p, mask="seed"))]
    torch_dal = _dal_torch(p)
    dal = [("LayerNorm(r + dropout(x)), PyTorch", torch_dal),
           ("DropoutAddLayerNorm, 0-byte mask", ft.DropoutAddLayerNorm(768, p=p, prenorm=True)),
           ("DropoutAddLayerNorm, 1-bit mask", ft.DropoutAddLayerNorm(768, p=p, prenorm=True,
                                                                      mask="bits"))]

    def drop_train(m):
        def step():
            x.grad = None
            m(x).backward(gy)
        return step

    def dal_train(m):
        def step():
            x.grad = r.grad = None
            torch.autograd.backward(m(x, r), (gy, gs))
        return step

    def evaluate(m, *args):
        def step():
            with torch.no_grad():
                m(*args)
        return step

    rows = []
    for label, table, train_fn, args in (("dropout", drop, drop_train, (x,)),
                                         ("dropout+add+LN", dal, dal_train, (x, r))):
        mods = [m for _, m in table]
        train_times = _round_robin([train_fn(m) for m in mods], repeats)
        for m in mods:
            getattr(m, "module", m).eval()
        eval_times = _round_robin([evaluate(m, *args) for m in mods], repeats)
        for m in mods:
            getattr(m, "module", m).train()
        for (name, _), tt, et in zip(table, train_times, eval_times):
            rows.append((label, name, tt, et, train_times[0] / tt, eval_times[0] / et))
    print(f"\n| op, {'x'.join(map(str, shape))} float32, p={p} | implementation | "
          "train fwd+bwd ms | x PyTorch | eval fwd ms | x PyTorch |")
    print("|---|---|---|---|---|---|")
    for label, name, tt, et, rt, re in rows:
        print(f"| {label} | {name} | {tt * 1e3:.2f} | {rt:.2f} | {et * 1e3:.2f} | {re:.2f} |")


# --------------------------------------------------------------------------- optimizers

def optimizers(repeats, quick):
    sizes = [(10, 10_000), (100, 10_000), (10, 1_000_000)]
    if quick:
        sizes = sizes[:2]
    kinds = [("SGD momentum=0.9", torch.optim.SGD, ft.optim.SGD, dict(lr=0.01, momentum=0.9)),
             ("AdamW", torch.optim.AdamW, ft.optim.AdamW, dict(lr=1e-3)),
             ("AdamW amsgrad", torch.optim.AdamW, ft.optim.AdamW, dict(lr=1e-3, amsgrad=True))]
    print("\n| optimizer | tensors x elements | torch default ms | foreach | fused | "
          "fastreg | fastreg l1 | x default | x foreach | x fused |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, torch_cls, ours_cls, kw in kinds:
        for count, numel in sizes:
            torch.manual_seed(0)
            base = [torch.randn(numel) for _ in range(count)]
            grads = [torch.randn(numel) * 1e-2 for _ in range(count)]

            def make(cls, **extra):
                params = [torch.nn.Parameter(b.clone()) for b in base]
                for p_, g_ in zip(params, grads):
                    p_.grad = g_.clone()
                opt = cls(params, **kw, **extra)
                return opt.step
            steps = [make(torch_cls), make(torch_cls, foreach=True), make(torch_cls, fused=True),
                     make(ours_cls), make(ours_cls, l1=1e-4)]
            t = _round_robin(steps, repeats, inner=1 if numel * count > 5e6 else 5)
            print(f"| {label} | {count} x {numel} | {t[0] * 1e3:.3f} | {t[1] * 1e3:.3f} | "
                  f"{t[2] * 1e3:.3f} | {t[3] * 1e3:.3f} | {t[4] * 1e3:.3f} | "
                  f"{t[0] / t[3]:.2f} | {t[1] / t[3]:.2f} | {t[2] / t[3]:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (Numba: set NUMBA_NUM_THREADS)")
    parser.add_argument("--only", choices=["norm", "dropout", "optim"], action="append",
                        help="run only these tables (repeatable); default: all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.only or ["norm", "dropout", "optim"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'default')}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, medians of {args.repeats}")
    if "norm" in only:
        realistic(args.repeats, args.quick)
        overhead(args.repeats)
    if "dropout" in only:
        dropout_family(args.repeats, args.quick)
    if "optim" in only:
        optimizers(args.repeats, args.quick)


if __name__ == "__main__":
    main()
