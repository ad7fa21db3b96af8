"""The prox family's cases for ``python -m fastreg bench``: proximal operators,
optimizer steps (single tensors and a list), label-smoothed cross-entropy and
data scaling, at sizes well past the L3 cache.

A family module of the bench (see ``fastreg/_bench.py``). Directions: "fwd"
for the proximal and scaling ops, "step" for the optimizer updates,
"fwd+bwd" for the fused cross-entropy. Peers:

    fastreg        in place where the op is (``out=w``, the ``*_step`` updates),
                   else into preallocated outputs (``out=``)
    fastreg fresh  into fresh outputs (ops with outputs only; a step has none)
    numpy          the NumPy reference
    torch          what PyTorch users run for the same update, on their own
                   copy of the data: ``softshrink(w, out=w)`` for the L1 prox;
                   foreach SGD with momentum and weight decay, then
                   ``softshrink(w, out=w)``; fused AdamW, then softshrink; its
                   composites for the other ops (see ``_torch_run``)

Byte counts are the minimal traffic: every input read once, every output
written once (sgd_step with momentum: w, g, buffer read, w, buffer written =
5 arrays; adamw_step: w, g, m, v read, w, m, v written = 7 arrays).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

import fastreg

from ._bench import TOLERANCES, TORCH_TOLERANCE, Case, compare

FAMILY = "prox"
DTYPES = ("float32", "float64")

LR = 1e-3
L1 = 1e-2                 # prox threshold lr * l1 = 1e-5: a few elements hit 0 per step
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-2
SMOOTHING = 0.1

# a transformer-like parameter list: a few large matrices, many small vectors
LIST_SIZES = ((1024 * 1024,) * 12 + (4096 * 256,) * 2 + (1024,) * 48 + (32000,) * 2)


@dataclass(frozen=True)
class Spec:
    """One benchmarked input: op, shape, layout label, dtype, and the op's options."""
    op: str
    shape: tuple
    layout: str
    dtype: str = "float32"
    axis: object = None
    direction: str = "fwd"

    @property
    def directions(self):
        return (self.direction,)

    @property
    def x_bytes(self):
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def name(self, direction):
        return f"{self.op}_{direction}|{'x'.join(map(str, self.shape))}|{self.dtype}"

    def quick(self):
        """About 1/16 of the data."""
        if self.op == "adamw_step_list":
            return Spec(self.op, (self.shape[0] // 16,), self.layout, self.dtype, self.axis,
                        self.direction)
        return Spec(self.op, (max(2, self.shape[0] // 16), *self.shape[1:]), self.layout,
                    self.dtype, self.axis, self.direction)


N = 1 << 24               # 16M elements: 64 MiB per float32 array, twice the L3

SPECS = [
    Spec("prox_l1", (N,), "in place"),
    Spec("prox_elastic_net", (N,), "in place"),
    Spec("prox_group_l1", (4096, 4096), "rows, in place", axis=1),
    Spec("prox_group_l1", (4096, 4096), "columns, in place", axis=0),
    Spec("max_norm", (4096, 4096), "rows, in place", axis=1),
    Spec("sgd_step", (N,), "momentum+wd+l1", direction="step"),
    Spec("adamw_step", (N,), "l1", direction="step"),
    Spec("adam_step", (N,), "l2+l1", direction="step"),
    Spec("adamw_step_list", (sum(LIST_SIZES),), f"{len(LIST_SIZES)} tensors, l1",
         direction="step"),
    Spec("cross_entropy", (1024, 32000), "mean, smoothing", direction="fwd+bwd"),
    Spec("standardize", (N // 64, 64), "axis 0", axis=0),
    Spec("min_max_scale", (N // 64, 64), "axis 0", axis=0),
]


def _list_sizes(total):
    """LIST_SIZES scaled to ``total`` elements (the quick spec is 1/16)."""
    scale = total / sum(LIST_SIZES)
    return [max(1, int(n * scale)) for n in LIST_SIZES]


def _fresh_state(spec, rng):
    """Parameters, gradients and optimizer state of a step spec (lists of arrays)."""
    dt = np.dtype(spec.dtype)
    sizes = _list_sizes(spec.shape[0]) if spec.op == "adamw_step_list" else [spec.shape[0]]
    ws = [rng.standard_normal(n, dtype=dt) for n in sizes]
    gs = [rng.standard_normal(n, dtype=dt) * 1e-2 for n in sizes]
    if spec.op == "sgd_step":
        return {"w": ws, "g": gs, "b": [np.zeros_like(w) for w in ws]}
    return {"w": ws, "g": gs, "m": [np.zeros_like(w) for w in ws],
            "v": [np.zeros_like(w) for w in ws]}


def _step_call(spec, st, step, backend=None):
    """One update of a step spec's state ``st`` (in place)."""
    listed = spec.op == "adamw_step_list"
    one = (lambda k: st[k]) if listed else (lambda k: st[k][0])
    if spec.op == "sgd_step":
        return fastreg.sgd_step(one("w"), one("g"), lr=LR, momentum=MOMENTUM,
                                decoupled_weight_decay=WEIGHT_DECAY, l1=L1,
                                momentum_buffer=one("b"), first_step=step == 1, backend=backend)
    fn = fastreg.adam_step if spec.op == "adam_step" else fastreg.adamw_step
    return fn(one("w"), one("g"), one("m"), one("v"), step=step, lr=LR,
              weight_decay=WEIGHT_DECAY, l1=L1, backend=backend)


def _step_case(spec, torch, seed):
    rng = np.random.default_rng(seed)
    st = _fresh_state(spec, rng)
    counter = {"fastreg": 1, "numpy": 1}

    def run(peer, state, backend=None):
        def call():
            counter[peer] += 1
            _step_call(spec, state, counter[peer], backend)
        return call

    t0 = time.perf_counter()
    _step_call(spec, st, 1)
    first = time.perf_counter() - t0
    ref_state = {k: [a.copy() for a in v] for k, v in st.items()}
    streams = 5 if spec.op == "sgd_step" else 7
    nbytes = streams * sum(w.nbytes for w in st["w"])

    def verify():
        a = {k: [x.copy() for x in v] for k, v in st.items()}
        b = {k: [x.copy() for x in v] for k, v in st.items()}
        _step_call(spec, a, 7)
        _step_call(spec, b, 7, backend="reference")
        names = [f"{k}[{i}]" for k in a if k != "g" for i in range(len(a[k]))]
        flat = lambda s: [x for k in s if k != "g" for x in s[k]]  # noqa: E731
        return compare({"in place": flat(a)}, flat(b), names, *TOLERANCES[spec.dtype]["out"])

    case = Case(spec, "step", nbytes, first_call_s=first, verify=verify,
                runs={"fastreg": run("fastreg", st), "numpy": run("numpy", ref_state,
                                                                   "reference")})
    if torch is not None:
        case.runs["torch"] = _torch_step(spec, st, torch)
    return {"step": case}


def _torch_step(spec, st, torch):
    """PyTorch doing the same update on its own copy of the parameters."""
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in st["w"]]
    for p, g in zip(params, st["g"]):
        p.grad = torch.from_numpy(g)
    if spec.op == "sgd_step":
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                              foreach=True)
    elif spec.op == "adam_step":
        opt = torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    softshrink = torch._C._nn.softshrink
    data = [p.data for p in params]

    def run():
        opt.step()
        for d in data:             # torch has no foreach softshrink: one call per tensor
            softshrink(d, LR * L1, out=d)
    return run


# --------------------------------------------------------------------------- one-output ops

def _inputs(spec, rng):
    dt = np.dtype(spec.dtype)
    if spec.op == "cross_entropy":
        N_, K = spec.shape
        return {"z": rng.standard_normal(spec.shape, dtype=dt) * 2,
                "t": rng.integers(0, K, N_)}
    x = rng.standard_normal(spec.shape, dtype=dt)
    if spec.op in ("standardize", "min_max_scale"):
        x = x * 3 + 5
    return {"x": x}


def _threshold(spec, x):
    """Small enough that repeated in-place calls keep most elements alive."""
    if spec.op == "prox_group_l1":
        return 1e-3 * math.sqrt(x.shape[spec.axis])
    if spec.op == "max_norm":
        return 0.9 * math.sqrt(x.shape[spec.axis])      # clips about half the groups
    return LR * L1


def _call(spec, d, out=None, backend=None):
    """The op on d; ``out`` as the public API takes it (None: fresh)."""
    op = spec.op
    if op == "cross_entropy":
        return fastreg.cross_entropy_label_smoothing(d["z"], d["t"], smoothing=SMOOTHING,
                                                     out=out, backend=backend)
    x = d["x"]
    if op == "prox_l1":
        return (fastreg.prox_l1(x, _threshold(spec, x), out=out, backend=backend),)
    if op == "prox_elastic_net":
        return (fastreg.prox_elastic_net(x, LR * L1, LR * WEIGHT_DECAY, out=out,
                                         backend=backend),)
    if op == "prox_group_l1":
        return (fastreg.prox_group_l1(x, _threshold(spec, x), axis=spec.axis, out=out,
                                      backend=backend),)
    if op == "max_norm":
        return (fastreg.max_norm(x, _threshold(spec, x), axis=spec.axis, out=out,
                                 backend=backend),)
    if op == "standardize":
        return fastreg.standardize(x, axis=spec.axis, out=out, backend=backend)
    if op == "min_max_scale":
        return fastreg.min_max_scale(x, axis=spec.axis, out=out, backend=backend)
    raise ValueError(f"unknown op {spec.op!r}")


OUTPUT_NAMES = {"cross_entropy": ("loss", "dlogits"), "standardize": ("y", "mean", "std"),
                "min_max_scale": ("y", "data_min", "data_max")}
IN_PLACE = ("prox_l1", "prox_elastic_net", "prox_group_l1", "max_norm")


def _torch_run(spec, d, torch):
    """PyTorch's kernels (or composite) for the op, on its own copy of the input."""
    F = torch.nn.functional
    op = spec.op
    if op == "cross_entropy":
        zt = torch.from_numpy(d["z"]).requires_grad_(True)
        tt = torch.from_numpy(d["t"])

        def ce():
            zt.grad = None
            loss = F.cross_entropy(zt, tt, label_smoothing=SMOOTHING)
            loss.backward()
            return loss.detach(), zt.grad
        return ce
    xt = torch.from_numpy(d["x"].copy())
    softshrink = torch._C._nn.softshrink
    if op == "prox_l1":
        return lambda: softshrink(xt, LR * L1, out=xt)
    if op == "prox_elastic_net":
        return lambda: softshrink(xt, LR * L1, out=xt).div_(1 + LR * WEIGHT_DECAY)
    if op == "prox_group_l1":
        t = _threshold(spec, d["x"])

        def group():
            n = torch.linalg.vector_norm(xt, dim=spec.axis, keepdim=True)
            return xt.mul_((1 - t / n).clamp_(min=0))
        return group
    if op == "max_norm":
        c = _threshold(spec, d["x"])
        return lambda: xt.renorm_(2, 1 - spec.axis, c)
    yt = torch.empty_like(xt)
    if op == "standardize":
        def std():
            s, m = torch.std_mean(xt, dim=spec.axis, correction=0)
            return torch.sub(xt, m, out=yt).div_(s), m, s
        return std

    def minmax():
        lo, hi = torch.aminmax(xt, dim=spec.axis)
        return torch.sub(xt, lo, out=yt).mul_(1 / (hi - lo)), lo, hi
    return minmax


def _flat(arrays):
    """Outputs as 1-D views (the scalar loss included) for compare()."""
    return tuple(np.reshape(a, -1) for a in arrays)


def _op_case(spec, torch, seed):
    rng = np.random.default_rng(seed)
    d = _inputs(spec, rng)
    names = OUTPUT_NAMES.get(spec.op, ("y",))
    direction = spec.direction
    t0 = time.perf_counter()
    res = _call(spec, d)
    first = time.perf_counter() - t0
    if spec.op in IN_PLACE:
        x = d["x"]
        runs = {"fastreg": lambda: _call(spec, d, out=x),
                "fastreg fresh": lambda: _call(spec, d)}
        nbytes = 2 * x.nbytes
    else:
        outs = tuple(np.empty_like(a) for a in res)
        runs = {"fastreg": lambda: _call(spec, d, out=outs),
                "fastreg fresh": lambda: _call(spec, d)}
        nbytes = sum(a.nbytes for a in d.values()) + sum(a.nbytes for a in res)
    runs["numpy"] = lambda: _call(spec, d, backend="reference")
    tol = TOLERANCES[spec.dtype]["grad" if spec.op == "cross_entropy" else "out"]

    def verify():
        ref = _call(spec, d, backend="reference")
        if spec.op in IN_PLACE:
            x = d["x"].copy()
            got = {"in place": _call(spec, {"x": x}, out=x), "fresh": _call(spec, d)}
        else:
            poisoned = tuple(np.full_like(a, np.nan) for a in res)
            got = {"out=": _call(spec, d, out=poisoned), "fresh": _call(spec, d)}
        return compare({k: _flat(v) for k, v in got.items()}, _flat(ref), names, *tol)

    case = Case(spec, direction, nbytes, first_call_s=first, runs=runs, verify=verify)
    if torch is not None:
        tr = _torch_run(spec, d, torch)
        case.runs["torch"] = tr
        if spec.op == "cross_entropy":     # the other torch peers update their own copy
            case.check_torch = lambda: compare(
                {"torch": _flat(t.detach().numpy() for t in tr())},
                _flat(_call(spec, d, backend="reference")), names, *TORCH_TOLERANCE)
    return {direction: case}


def build(spec, torch=None, seed=0):
    """The case of one spec, as ``{direction: Case}``; makes fastreg's first call (timed)."""
    if spec.direction == "step":
        return _step_case(spec, torch, seed)
    return _op_case(spec, torch, seed)


def summary(rows):
    """The family's notes: speed-ups over PyTorch's same updates, and the list's setup."""
    lines = []
    timed = [r for r in rows if "ms" in r and "torch" in r["ms"]]
    if timed:
        lines.append("fastreg vs PyTorch doing the same update (x > 1: fastreg faster): "
                     + ", ".join(f"{r['op']} {r['layout']} {r['fastreg']['x torch']:.2f}x"
                                 for r in timed))
    sgd = [r for r in rows if r["op"] == "sgd_step" and "ms" in r]
    for r in sgd:
        lines.append(f"sgd_step (momentum, decoupled decay, L1) moves "
                     f"{r['fastreg']['% copy']:.0f}% of the copy ceiling's bytes per second "
                     f"(target >= 70%; {r['fastreg'].get('% copy beside', float('nan')):.0f}% "
                     f"of the copy beside it)")
    return lines
