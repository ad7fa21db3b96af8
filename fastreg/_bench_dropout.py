"""The dropout family's cases for ``python -m fastreg bench``: dropout (1-bit and
zero-byte masks), Gaussian noise and dropout, DropConnect (per batch and per
example), moment-matching inference and the fused dropout + add + LayerNorm.

The family interface is described in ``fastreg/_bench.py``. Each case carries
the minimal bytes of its op: dropout forward reads x and writes y and the
n/8 bytes of mask bits ("bits") or nothing more ("seed"); its backward reads
dy (and the bits) and writes dx. The fused op reads x, residual, weight, bias
and writes y, the residual sum, mean and rstd. DropConnect and the moment
matching are compute-bound (a GEMM, or a Philox word per sample and weight):
their GB/s only says how far they are from memory speed.

Peers: fastreg into preallocated outputs (``out=``, masks reused), into fresh
outputs, the NumPy reference, PyTorch (its own masks: the same work, not the
same numbers, so only fastreg is verified against the reference), and for
the fused op ``fastreg unfused``: fastreg's own dropout, then ``np.add``, then
layer_norm, all into preallocated outputs (the issue's 2x target).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

import fastreg

from ._bench import TOLERANCES, Case, compare, nbytes as _nbytes

FAMILY = "dropout"
DTYPES = ("float32", "float64")
P = 0.1                     # drop probability of every case
EPS = 1e-5
SEED = 20240501
COPY_TARGET = 70.0          # % of the copy ceiling, dropout forward and backward
FUSED_TARGET = 2.0          # fused dropout+add+LN vs fastreg's dropout, add, layer_norm
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Spec:
    """One benchmarked input: op, x's shape, variant label, dtype."""
    op: str
    shape: tuple
    layout: str                     # "mask=bits", "mask=seed", "rows", "per batch", ...
    dtype: str = "float32"
    out_features: int | None = None     # DropConnect
    n_samples: int | None = None        # moment matching
    directions: tuple = DIRECTIONS

    @property
    def x_bytes(self):
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def name(self, direction):
        return (f"{self.op}_{direction}|{'x'.join(map(str, self.shape))}|{self.dtype}"
                f"|{self.layout}")

    def quick(self):
        """About 1/16 of the data: the leading dimension divided by 16."""
        return Spec(self.op, (max(2, self.shape[0] // 16), *self.shape[1:]), self.layout,
                    self.dtype, self.out_features, self.n_samples, self.directions)


STANDARD = [
    Spec("dropout", (4096, 4096), "mask=bits"),
    Spec("dropout", (4096, 4096), "mask=seed"),
    Spec("dropout_add_layer_norm", (8192, 1024), "mask=seed"),
    Spec("dropout_add_layer_norm", (8192, 1024), "mask=bits"),
    Spec("gaussian_noise", (4096, 4096), "additive", directions=("fwd",)),
    Spec("gaussian_dropout", (4096, 4096), "multiplicative"),
    Spec("drop_connect", (4096, 1024), "per batch", out_features=1024),
    Spec("drop_connect", (64, 512), "per example", out_features=512),
    Spec("drop_connect_inference", (256, 512), "relu", out_features=256, n_samples=64,
         directions=("fwd",)),
]
SPECS = STANDARD


def _inputs(spec, seed):
    rng = np.random.default_rng(seed)
    dt = np.dtype(spec.dtype)
    d = {"x": rng.standard_normal(spec.shape, dtype=dt)}
    if spec.op == "drop_connect" or spec.op == "drop_connect_inference":
        K = spec.shape[-1]
        d["weight"] = rng.standard_normal((spec.out_features, K), dtype=dt) / dt.type(
            math.sqrt(K))
        d["bias"] = rng.standard_normal(spec.out_features, dtype=dt)
        d["dy"] = rng.standard_normal((*spec.shape[:-1], spec.out_features), dtype=dt)
    else:
        d["dy"] = rng.standard_normal(spec.shape, dtype=dt)
    if spec.op == "dropout_add_layer_norm":
        D = spec.shape[-1]
        d["residual"] = rng.standard_normal(spec.shape, dtype=dt)
        d["weight"] = rng.standard_normal(D, dtype=dt)
        d["bias"] = rng.standard_normal(D, dtype=dt)
    return d


# --------------------------------------------------------------------------- fastreg calls

def fastreg_calls(spec, d):
    """``(fwd, bwd, names)``: ``fwd(**kw)`` and ``bwd(saved, **kw)`` call the public API
    (kw: ``out=``, ``backend=``); both return tuples of arrays (masks stay inside
    ``saved``, as the last element)."""
    x, dy = d["x"], d["dy"]
    op = spec.op
    if op == "dropout":
        kind = spec.layout.split("=")[1]

        def fwd(out=None, **k):
            return fastreg.dropout(x, P, rng=SEED, mask=kind, out=out, **k)

        def bwd(saved, out=None, **k):
            return (fastreg.dropout_backward(dy, saved[-1], out=out, **k),)
        return fwd, bwd, (("y",), ("dx",))
    if op == "gaussian_noise":
        return ((lambda out=None, **k: (fastreg.gaussian_noise(x, 0.5, rng=SEED, out=out, **k),)),
                None, (("y",), ()))
    if op == "gaussian_dropout":
        return ((lambda out=None, **k: fastreg.gaussian_dropout(x, P, rng=SEED, out=out, **k)),
                (lambda saved, out=None, **k: (fastreg.gaussian_dropout_backward(
                    dy, saved[-1], out=out, **k),)),
                (("y",), ("dx",)))
    if op == "drop_connect":
        w, b = d["weight"], d["bias"]
        pe = spec.layout == "per example"
        return ((lambda out=None, **k: fastreg.drop_connect(x, w, b, P, rng=SEED,
                                                            per_example=pe, out=out, **k)),
                (lambda saved, out=None, **k: fastreg.drop_connect_backward(
                    dy, x, w, saved[-1], out=out, **k)),
                (("y",), ("dx", "dweight", "dbias")))
    if op == "drop_connect_inference":
        w, b = d["weight"], d["bias"]
        return ((lambda out=None, **k: (fastreg.drop_connect_inference(
                    x, w, b, P, activation=spec.layout, n_samples=spec.n_samples, rng=SEED,
                    out=out, **k),)),
                None, (("y",), ()))
    if op == "dropout_add_layer_norm":
        r, w, b = d["residual"], d["weight"], d["bias"]
        kind = spec.layout.split("=")[1]
        return ((lambda out=None, **k: fastreg.dropout_add_layer_norm(
                    x, r, w, b, P, rng=SEED, eps=EPS, mask=kind, out=out, **k)),
                (lambda saved, out=None, **k: fastreg.dropout_add_layer_norm_backward(
                    dy, saved[1], saved[2], saved[3], w, b, saved[4], out=out, **k)),
                (("y", "residual_sum", "mean", "rstd"), ("dx", "dresidual", "dweight", "dbias")))
    raise ValueError(f"unknown op {op!r}")


def _arrays(result):
    return tuple(a for a in result if a is None or isinstance(a, np.ndarray))


def _out_buffers(spec, saved):
    """Preallocated outputs for the forward: like its arrays, and for dropout and the
    fused op the mask bits too (None for a "seed" mask)."""
    arrays = tuple(np.empty_like(a) for a in _arrays(saved))
    if spec.op in ("dropout", "dropout_add_layer_norm"):
        bits = saved[-1].bits
        return (*arrays, None if bits is None else np.empty_like(bits))
    return arrays


def _unfused_calls(d):
    """fastreg's separate ops into preallocated outputs: dropout, np.add, layer_norm."""
    x, r, w, b, dy = d["x"], d["residual"], d["weight"], d["bias"], d["dy"]
    y1, bits, s = np.empty_like(x), np.empty((x.size + 31) // 32, np.uint32), np.empty_like(x)
    y, mean, rstd = np.empty_like(x), np.empty(x.shape[0], x.dtype), np.empty(x.shape[0],
                                                                             x.dtype)
    ds, dx = np.empty_like(x), np.empty_like(x)
    dw, db = np.empty_like(w), np.empty_like(b)
    state = {}

    def fwd():
        _, state["mask"] = fastreg.dropout(x, P, rng=SEED, out=(y1, bits))
        np.add(y1, r, out=s)
        return fastreg.layer_norm(s, w, b, EPS, out=(y, mean, rstd))

    def bwd():
        fastreg.layer_norm_backward(dy, s, mean, rstd, w, b, out=(ds, dw, db))
        return fastreg.dropout_backward(ds, state["mask"], out=dx)

    def fwd_fresh():            # as code reads without out=: every result a new array
        y1, state["fresh mask"] = fastreg.dropout(x, P, rng=SEED)
        state["s"] = y1 + r
        state["stats"] = fastreg.layer_norm(state["s"], w, b, EPS)
        return state["stats"]

    def bwd_fresh():
        _, mean, rstd = state["stats"]
        ds, _, _ = fastreg.layer_norm_backward(dy, state["s"], mean, rstd, w, b)
        return fastreg.dropout_backward(ds, state["fresh mask"])
    fwd()
    fwd_fresh()
    return fwd, bwd, fwd_fresh, bwd_fresh


# --------------------------------------------------------------------------- torch

def torch_calls(spec, d, torch):
    """``(fwd, bwd)``: PyTorch's CPU ops for the same work on d's memory (own masks).

    dropout: ``F.dropout`` (what models call) and ``native_dropout_backward`` on the
    bool mask of ``native_dropout`` (the ATen backward op). The rest: the same
    expression in PyTorch's ops, and autograd through a graph built once
    (``torch.autograd.grad(..., retain_graph=True)``).
    """
    F, aten = torch.nn.functional, torch.ops.aten
    t = {k: torch.from_numpy(v) for k, v in d.items()}
    xt, dyt = t["x"], t["dy"]
    op = spec.op
    if op == "dropout":
        _, keep = torch.native_dropout(xt, P, True)
        return (lambda: F.dropout(xt, P, True),
                lambda: aten.native_dropout_backward(dyt, keep, 1.0 / (1.0 - P)))
    if op == "gaussian_noise":
        return (lambda: xt + 0.5 * torch.randn_like(xt)), None
    if op == "gaussian_dropout":
        std = math.sqrt(P / (1 - P))
        noise = 1 + std * torch.randn_like(xt)
        return (lambda: xt * (1 + std * torch.randn_like(xt))), (lambda: dyt * noise)

    def grad_of(fwd, inputs):
        leaves = [a.clone().requires_grad_() for a in inputs]
        out = fwd(*leaves)
        return lambda: torch.autograd.grad(out, leaves, dyt, retain_graph=True)

    if op == "drop_connect":
        wt, bt = t["weight"], t["bias"]
        if spec.layout == "per batch":
            def f(x, w, b):
                keep = torch.empty_like(w).bernoulli_(1 - P)
                return F.linear(x, w * keep / (1 - P), b)
        else:
            def f(x, w, b):
                keep = torch.empty(x.shape[0], *w.shape, dtype=w.dtype).bernoulli_(1 - P)
                return torch.einsum("noi,ni->no", keep * w / (1 - P), x) + b
        return (lambda: f(xt, wt, bt)), grad_of(f, (xt, wt, bt))
    if op == "dropout_add_layer_norm":
        rt, wt, bt = t["residual"], t["weight"], t["bias"]
        D = spec.shape[-1]

        def f(x, r, w, b):
            return F.layer_norm(F.dropout(x, P, True) + r, (D,), w, b, EPS)
        return (lambda: f(xt, rt, wt, bt)), grad_of(f, (xt, rt, wt, bt))
    return None, None       # drop_connect_inference: no PyTorch counterpart


# --------------------------------------------------------------------------- cases

def _bytes(spec, d, saved, grads):
    """Minimal bytes of the forward and the backward."""
    x, dy = d["x"], d["dy"]
    op = spec.op
    if op == "dropout":
        bits = saved[-1].nbytes
        return _nbytes(x, saved[0]) + bits, _nbytes(dy, grads[0]) + bits
    if op in ("gaussian_noise", "gaussian_dropout"):
        return _nbytes(x, saved[0]), (_nbytes(dy, grads[0]) if grads else 0)
    if op in ("drop_connect", "drop_connect_inference"):
        params = _nbytes(d["weight"], d["bias"])
        fwd = _nbytes(x, saved[0]) + params
        return fwd, (_nbytes(dy, x, d["weight"], *grads) if grads else 0)
    if op == "dropout_add_layer_norm":
        bits = saved[-1].nbytes
        fwd = _nbytes(x, d["residual"], d["weight"], d["bias"], *saved[:4]) + bits
        return fwd, _nbytes(dy, *saved[1:4], d["weight"], *grads) + bits
    raise ValueError(op)


def build(spec, torch=None, seed=0):
    """The cases of one spec, as ``{direction: Case}`` (see ``fastreg/_bench.py``)."""
    d = _inputs(spec, seed)
    fwd, bwd, (fnames, bnames) = fastreg_calls(spec, d)
    t0 = time.perf_counter()
    saved = fwd()
    t_fwd = time.perf_counter() - t0
    grads, t_bwd = (), None
    if bwd is not None:
        t0 = time.perf_counter()
        grads = bwd(saved)
        t_bwd = time.perf_counter() - t0
    fout = _out_buffers(spec, saved)
    bout = tuple(None if a is None else np.empty_like(a) for a in grads)
    fwd_bytes, bwd_bytes = _bytes(spec, d, saved, grads)
    single = lambda o: o if len(o) > 1 else o[0]  # noqa: E731  (single-output out=)

    reference = {}

    def ref(direction):
        if direction not in reference:
            reference[direction] = _arrays(fwd(backend="reference")) if direction == "fwd" \
                else _arrays(bwd(saved, backend="reference"))
        return reference[direction]

    def poisoned(bufs):
        for a in bufs:
            if a is not None:
                a[...] = np.nan if a.dtype.kind == "f" else 0
        return bufs

    tol = TOLERANCES[spec.dtype]
    cases = {"fwd": Case(spec, "fwd", fwd_bytes, first_call_s=t_fwd, runs={
        "fastreg": lambda: fwd(out=single(fout)),
        "fastreg fresh": lambda: fwd(),
        "numpy": lambda: fwd(backend="reference")},
        verify=lambda: compare({"out=": _arrays(fwd(out=single(poisoned(fout)))),
                                "fresh": _arrays(fwd())}, ref("fwd"), fnames, *tol["out"]))}
    if bwd is not None:
        cases["bwd"] = Case(spec, "bwd", bwd_bytes, first_call_s=t_bwd, runs={
            "fastreg": lambda: bwd(saved, out=single(bout)),
            "fastreg fresh": lambda: bwd(saved),
            "numpy": lambda: bwd(saved, backend="reference")},
            verify=lambda: compare({"out=": bwd(saved, out=single(poisoned(bout))),
                                    "fresh": bwd(saved)}, ref("bwd"), bnames, *tol["grad"]))
        cases["fwd+bwd"] = Case(spec, "fwd+bwd", fwd_bytes + bwd_bytes, runs={
            "fastreg": lambda: bwd(fwd(out=single(fout)), out=single(bout)),
            "fastreg fresh": lambda: bwd(fwd()),
            "numpy": lambda: bwd(fwd(backend="reference"), backend="reference")})
    if spec.op == "dropout_add_layer_norm":
        uf, ub, uff, ubf = _unfused_calls(d)
        cases["fwd"].runs.update({"fastreg unfused": uf, "fastreg unfused fresh": uff})
        cases["bwd"].runs.update({"fastreg unfused": ub, "fastreg unfused fresh": ubf})
        cases["fwd+bwd"].runs.update({"fastreg unfused": lambda: (uf(), ub()),
                                      "fastreg unfused fresh": lambda: (uff(), ubf())})
    if torch is not None:
        tf, tb = torch_calls(spec, d, torch)
        if tf is not None:
            cases["fwd"].runs["torch"] = tf
        if tb is not None:
            cases["bwd"].runs["torch"] = tb
            cases["fwd+bwd"].runs["torch"] = lambda: (tf(), tb())
    return {k: v for k, v in cases.items() if k in spec.directions}


# --------------------------------------------------------------------------- notes

def mask_memory_lines():
    """Bytes of mask kept per element, fastreg against PyTorch."""
    return ["mask memory per element: fastreg mask=\"bits\" 1 bit (0.125 B, n/8 rounded up to "
            "4 B), mask=\"seed\" 0 B (regenerated; dropout_add_layer_norm has the same choice), "
            "DropConnect 0 B; PyTorch native_dropout 1 B (bool mask), F.dropout's CPU autograd "
            "keeps a float mask of x's dtype (4 B for float32)"]


def summary(rows):
    """Notes under the table: the % copy targets, fused vs unfused, the mask memory."""
    lines = []
    drop = [r for r in rows if r["op"] == "dropout" and r["direction"] in ("fwd", "bwd")
            and "ms" in r]
    if drop:
        lines.append(f"dropout, fastreg out= (target >= {COPY_TARGET:g}% of copy): " + ", ".join(
            f"{r['direction']} {r['layout']} {r['dtype']} {r['fastreg']['% copy']:.0f}%"
            + ("" if r["fastreg"]["% copy"] >= COPY_TARGET else " (below)")
            + (f" ({r['fastreg']['% copy beside']:.0f}% of the copy beside it)"
               if "% copy beside" in r["fastreg"] else "")
            + (f", x{r['fastreg']['x torch']:.1f} torch" if r["fastreg"]["x torch"] else "")
            for r in drop))
    fused = [r for r in rows if r["op"] == "dropout_add_layer_norm" and "ms" in r
             and "fastreg unfused" in r["ms"]]
    if fused:
        lines.append(f"dropout_add_layer_norm fused vs fastreg's dropout, add, layer_norm "
                     f"(target >= {FUSED_TARGET:g}x; the byte counts bound it at 1.76x when both "
                     f"run at the same GB/s): " + ", ".join(
                         f"{r['direction']} {r['layout']} {r['dtype']} "
                         f"{r['ms']['fastreg unfused'] / r['ms']['fastreg']:.2f}x all out=, "
                         f"{r['ms']['fastreg unfused fresh'] / r['ms']['fastreg fresh']:.2f}x "
                         f"all fresh" for r in fused))
    return lines + mask_memory_lines()
