"""The norm family's cases for ``python -m fastreg bench``: layer, RMS, batch,
group and instance norm at the standard shapes of the foundation issue.

A family module of the bench (see ``fastreg/_bench.py``) provides ``SPECS``,
``DTYPES``, ``build(spec, torch=None, seed=0)`` returning ``{direction:
Case}`` and ``summary(rows)`` for its notes under the table. Every case carries
the minimal bytes of its op (each input read once, each output written once,
parameters and statistics included); fastreg is timed into preallocated
outputs (``out=``) and fresh ones, beside the NumPy reference and PyTorch's
CPU kernels on the same memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

import fastreg

from ._bench import TOLERANCES, TORCH_TOLERANCE, Case, compare, nbytes as _nbytes

FAMILY = "norm"
DTYPES = ("float32", "float64")
EPS = 1e-5
RMS_EPS = 1e-6
MOMENTUM = 0.1
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
FUSED_TARGET = 5.0          # fwd+bwd: fastreg should beat the NumPy reference by this much
TORCH_TARGET = 1.5          # fwd and bwd with out=: fastreg over PyTorch


@dataclass(frozen=True)
class Spec:
    """One benchmarked input: op, storage shape, layout, groups, dtype."""
    op: str
    shape: tuple            # the array's shape in memory: (N, H, W, C) for NHWC
    layout: str             # "rows" (layer/RMS), "NCHW", "NHWC" or "2-D" (batch norm (N, C))
    groups: int | None = None
    dtype: str = "float32"

    @property
    def axis(self):
        return -1 if self.layout == "NHWC" else 1

    @property
    def params(self):
        """Length of weight/bias: the normalized size (rows) or the channels."""
        return self.shape[-1] if self.layout in ("rows", "NHWC") else self.shape[1]

    @property
    def x_bytes(self):
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    directions = DIRECTIONS

    def name(self, direction):
        return f"{self.op}_{direction}|{'x'.join(map(str, self.shape))}|{self.dtype}"

    def quick(self):
        """About 1/16 of the data: the leading (batch or row) dimension divided by 16."""
        return Spec(self.op, (max(2, self.shape[0] // 16), *self.shape[1:]), self.layout,
                    self.groups, self.dtype)


STANDARD = [
    Spec("layer_norm", (8192, 1024), "rows"),
    Spec("layer_norm", (4096, 4096), "rows"),
    Spec("rms_norm", (8192, 1024), "rows"),
    Spec("rms_norm", (4096, 4096), "rows"),
    Spec("batch_norm", (64, 64, 56, 56), "NCHW"),
    Spec("batch_norm", (64, 56, 56, 64), "NHWC"),
    Spec("batch_norm", (16384, 1024), "2-D"),
    Spec("group_norm", (32, 128, 56, 56), "NCHW", 32),
    Spec("group_norm", (32, 56, 56, 128), "NHWC", 32),
    Spec("group_norm", (32, 256, 28, 28), "NCHW", 32),
    Spec("group_norm", (32, 28, 28, 256), "NHWC", 32),
    Spec("instance_norm", (32, 128, 56, 56), "NCHW"),
]
SPECS = STANDARD


def make_inputs(spec, seed=0):
    """x, dy, weight, bias (+ running stats for batch norm), standard normal."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(spec.dtype)
    normal = lambda shape: rng.standard_normal(shape, dtype=dt)  # noqa: E731
    P = spec.params
    d = {"x": normal(spec.shape), "dy": normal(spec.shape), "weight": normal(P),
         "bias": None if spec.op == "rms_norm" else normal(P)}
    if spec.op == "batch_norm":
        d["running_mean"], d["running_var"] = np.zeros(P, dt), np.ones(P, dt)
    return d


def fastreg_calls(spec, d):
    """``(fwd, bwd)``: ``fwd(**kw)`` and ``bwd(saved, **kw)`` call the public API on d,
    where ``saved`` is a forward's result and kw is ``out=`` and/or ``backend=``."""
    x, dy, w, b, ax = d["x"], d["dy"], d["weight"], d["bias"], spec.axis
    op = spec.op
    if op == "layer_norm":
        return (lambda **k: fastreg.layer_norm(x, w, b, EPS, **k),
                lambda s, **k: fastreg.layer_norm_backward(dy, x, s[1], s[2], w, b, **k))
    if op == "rms_norm":
        return (lambda **k: fastreg.rms_norm(x, w, RMS_EPS, **k),
                lambda s, **k: fastreg.rms_norm_backward(dy, x, s[1], w, **k))
    if op == "batch_norm":
        rm, rv = d["running_mean"], d["running_var"]
        return (lambda **k: fastreg.batch_norm(x, w, b, rm, rv, training=True,
                                               momentum=MOMENTUM, eps=EPS, axis=ax, **k),
                lambda s, **k: fastreg.batch_norm_backward(dy, x, s[1], s[2], w, b,
                                                           axis=ax, **k))
    if op == "group_norm":
        G = spec.groups
        return (lambda **k: fastreg.group_norm(x, G, w, b, EPS, axis=ax, **k),
                lambda s, **k: fastreg.group_norm_backward(dy, x, s[1], s[2], G, w, b,
                                                           axis=ax, **k))
    if op == "instance_norm":
        return (lambda **k: fastreg.instance_norm(x, w, b, momentum=MOMENTUM, eps=EPS,
                                                  axis=ax, **k),
                lambda s, **k: fastreg.instance_norm_backward(dy, x, s[1], s[2], w, b,
                                                              axis=ax, **k))
    raise ValueError(f"unknown op {op!r}")


def output_names(op, direction):
    if direction == "fwd":
        return ("y", "rstd") if op == "rms_norm" else ("y", "mean", "rstd")
    return ("dx", "dweight") if op == "rms_norm" else ("dx", "dweight", "dbias")


def torch_calls(spec, d, torch):
    """``(fwd, bwd, to_numpy)``: PyTorch's kernels on d's memory (zero copy).

    NHWC storage is handed to torch as an (N, C, H, W) tensor in channels_last
    memory format, which torch's CPU kernels support natively. The backward
    runs from statistics saved by torch's own forward:
    - layer, batch, group norm: the ATen backward op alone
      (``native_layer_norm_backward``, ``native_batch_norm_backward``,
      ``native_group_norm_backward``), exactly the kernel autograd would call,
      without the autograd engine around it;
    - instance norm: PyTorch runs it as batch norm over an (1, N*C, H, W) view
      with the weight repeated N times, so its backward is
      ``native_batch_norm_backward`` on that view plus the (tiny) sum of the
      repeated weight's gradient over N: that is what is timed;
    - RMS norm: ``F.rms_norm`` is a composite of elementwise ops on the CPU
      with no backward op of its own, so autograd through its graph
      (``torch.autograd.grad(..., retain_graph=True)``; the graph is built once).
    """
    F, aten = torch.nn.functional, torch.ops.aten
    nhwc = spec.layout == "NHWC"

    def view(a):
        t = torch.from_numpy(a)
        return t.permute(0, t.ndim - 1, *range(1, t.ndim - 1)) if nhwc else t

    def to_numpy(t):
        t = t if isinstance(t, torch.Tensor) else t[0]
        return (t.permute(0, *range(2, t.ndim), 1) if nhwc else t).detach().numpy()

    xt, dyt = view(d["x"]), view(d["dy"])
    wt = torch.from_numpy(d["weight"])
    bt = None if d["bias"] is None else torch.from_numpy(d["bias"])
    mask = [True, True, True]
    op = spec.op
    if op in ("layer_norm", "rms_norm"):
        D = spec.shape[-1]
        if op == "layer_norm":
            _, mt, rt = aten.native_layer_norm(xt, [D], wt, bt, EPS)
            return (lambda: F.layer_norm(xt, (D,), wt, bt, EPS),
                    lambda: aten.native_layer_norm_backward(dyt, xt, [D], mt, rt, wt, bt, mask),
                    to_numpy)
        xg, wg = xt.clone().requires_grad_(), wt.clone().requires_grad_()
        yg = F.rms_norm(xg, (D,), wg, RMS_EPS)
        return (lambda: F.rms_norm(xt, (D,), wt, RMS_EPS),
                lambda: torch.autograd.grad(yg, (xg, wg), dyt, retain_graph=True),
                to_numpy)
    N, C = xt.shape[0], xt.shape[1]
    HW = math.prod(xt.shape[2:])
    if op == "batch_norm":
        rmt = torch.from_numpy(d["running_mean"].copy())
        rvt = torch.from_numpy(d["running_var"].copy())
        _, sm, si = aten.native_batch_norm(xt, wt, bt, rmt.clone(), rvt.clone(), True,
                                           MOMENTUM, EPS)
        return (lambda: F.batch_norm(xt, rmt, rvt, wt, bt, True, MOMENTUM, EPS),
                lambda: aten.native_batch_norm_backward(dyt, xt, wt, rmt, rvt, sm, si, True,
                                                        EPS, mask),
                to_numpy)
    if op == "group_norm":
        G = spec.groups
        _, gm, gr = aten.native_group_norm(xt, wt, bt, N, C, HW, G, EPS)
        return (lambda: F.group_norm(xt, G, wt, bt, EPS),
                lambda: aten.native_group_norm_backward(dyt, xt, gm, gr, wt, N, C, HW, G, mask),
                to_numpy)
    if op == "instance_norm":
        x2 = xt.contiguous().view(1, N * C, *xt.shape[2:])
        dy2 = dyt.contiguous().view(x2.shape)
        w2, b2 = wt.repeat(N), bt.repeat(N)
        _, sm, si = aten.native_batch_norm(x2, w2, b2, None, None, True, MOMENTUM, EPS)

        def bwd():
            gx, gw, gb = aten.native_batch_norm_backward(dy2, x2, w2, None, None, sm, si, True,
                                                         EPS, mask)
            return gx.view(xt.shape), gw.view(N, C).sum(0), gb.view(N, C).sum(0)
        return (lambda: F.instance_norm(xt, None, None, wt, bt, True, MOMENTUM, EPS), bwd,
                to_numpy)
    raise ValueError(f"unknown op {op!r}")


def build(spec, torch=None, seed=0):
    """The fwd, bwd and fwd+bwd cases of one spec, as ``{direction: Case}``.

    Allocates the inputs and the preallocated outputs, and makes fastreg's
    first forward and backward calls (timed: compilation or cache loading).
    The reference results are computed only when a case is verified.
    """
    d = make_inputs(spec, seed)
    fwd, bwd = fastreg_calls(spec, d)
    t0 = time.perf_counter()
    saved = fwd()
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    grads = bwd(saved)
    t_bwd = time.perf_counter() - t0
    fout = tuple(np.empty_like(a) for a in saved)
    bout = tuple(None if a is None else np.empty_like(a) for a in grads)

    running = (2 * _nbytes(d["running_mean"], d["running_var"])  # read and written
               if spec.op == "batch_norm" else 0)
    fwd_bytes = _nbytes(d["x"], d["weight"], d["bias"], *saved) + running
    bwd_bytes = _nbytes(d["dy"], d["x"], *saved[1:], d["weight"], *grads)
    # Batch norm over rows (NHWC, 2-D): a channel's statistics span every row, so
    # no row is normalized before all are read; beyond the cache, x is read twice
    # forward, dy and x twice backward (PyTorch's kernels too).
    twice = spec.op == "batch_norm" and spec.layout in ("NHWC", "2-D")
    fwd_floor = fwd_bytes + (_nbytes(d["x"]) if twice else 0)
    bwd_floor = bwd_bytes + (_nbytes(d["dy"], d["x"]) if twice else 0)

    reference = {}

    def ref(direction):
        if direction not in reference:
            reference[direction] = (fwd(backend="reference") if direction == "fwd"
                                    else bwd(saved, backend="reference"))
        return reference[direction]

    def poisoned(bufs):
        for a in bufs:
            if a is not None:
                a[...] = np.nan
        return bufs

    def fused(out_f=None, out_b=None, **k):
        s = fwd(out=out_f, **k)
        return bwd(s, out=out_b, **k)

    tol = TOLERANCES[spec.dtype]
    cases = {
        "fwd": Case(spec, "fwd", fwd_bytes, first_call_s=t_fwd, floor_bytes=fwd_floor, runs={
            "fastreg": lambda: fwd(out=fout),
            "fastreg fresh": lambda: fwd(),
            "numpy": lambda: fwd(backend="reference")},
            verify=lambda: compare({"out=": fwd(out=poisoned(fout)), "fresh": fwd()}, ref("fwd"),
                                   output_names(spec.op, "fwd"), *tol["out"])),
        "bwd": Case(spec, "bwd", bwd_bytes, first_call_s=t_bwd, floor_bytes=bwd_floor, runs={
            "fastreg": lambda: bwd(saved, out=bout),
            "fastreg fresh": lambda: bwd(saved),
            "numpy": lambda: bwd(saved, backend="reference")},
            verify=lambda: compare({"out=": bwd(saved, out=poisoned(bout)),
                                    "fresh": bwd(saved)}, ref("bwd"),
                                   output_names(spec.op, "bwd"), *tol["grad"])),
        # two calls, as a training step makes them; its bytes are the sum of both
        "fwd+bwd": Case(spec, "fwd+bwd", fwd_bytes + bwd_bytes,
                        floor_bytes=fwd_floor + bwd_floor, runs={
            "fastreg": lambda: fused(fout, bout),
            "fastreg fresh": lambda: fused(),
            "numpy": lambda: fused(backend="reference")}),
    }
    if torch is not None:
        tf, tb, to_numpy = torch_calls(spec, d, torch)
        cases["fwd"].runs["torch"] = tf
        cases["bwd"].runs["torch"] = tb
        cases["fwd+bwd"].runs["torch"] = lambda: (tf(), tb())
        cases["fwd"].check_torch = lambda: compare({"torch": (to_numpy(tf()),)}, ref("fwd")[:1],
                                                   ("y",), *TORCH_TOLERANCE)
        cases["bwd"].check_torch = lambda: compare({"torch": (to_numpy(tb()),)}, ref("bwd")[:1],
                                                   ("dx",), *TORCH_TOLERANCE)
    return cases


def summary(rows):
    """The family's notes under the table: fused fwd+bwd against the NumPy
    reference, and the cases below the PyTorch target with what their floor allows."""
    lines = []
    fused = [r for r in rows if r["direction"] == "fwd+bwd" and "ms" in r]
    if fused:
        lines.append(f"fwd+bwd, fastreg out= vs NumPy reference (target >= {FUSED_TARGET:g}x): "
                     + ", ".join(f"{_label(r)} {r['fastreg']['x numpy']:.1f}x"
                                 + ("" if r["fastreg"]["x numpy"] >= FUSED_TARGET else " (below)")
                                 for r in fused))
    below = [r for r in rows if r["direction"] != "fwd+bwd" and "ms" in r
             and r["fastreg"]["x torch"] is not None and r["fastreg"]["x torch"] < TORCH_TARGET]
    if below:
        lines.append(f"x torch with out= below {TORCH_TARGET:g}x, beside the most a kernel could "
                     "reach (PyTorch's time over the op's floor bytes moved at the speed of the "
                     "copy beside): "
                     + ", ".join(f"{_label(r)} {r['direction']} {r['fastreg']['x torch']:.2f}x "
                                 f"(at most {r['x torch at floor']:.2f}x"
                                 + (", floor "
                                    f"{r['floor bytes'] / r['bytes']:.2f}x the minimal bytes"
                                    if r["floor bytes"] != r["bytes"] else "") + ")"
                                 for r in below))
    return lines


def _label(r):
    return f"{r['op']} {'x'.join(map(str, r['shape']))} {r['layout']}"
