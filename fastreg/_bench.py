"""``python -m fastreg bench``: time every op against the copy ceiling, NumPy and PyTorch.

For each case (op, direction, shape, layout) it runs fastreg into preallocated
outputs (``out=``) and into fresh ones, the NumPy reference, and PyTorch when
installed; verifies fastreg against the reference; and reports the median
time, GB/s over the minimal byte count (each input read once, each output
written once), % of the machine's measured copy bandwidth, and the ratios.

PyTorch runs with ``THP_MEM_ALLOC_ENABLE=1`` unless the caller set it: its
default CPU allocator spends most of a call on page faults of fresh 4 KiB
pages, which would flatter any competitor.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import pathlib
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import fastreg

# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    op: str
    direction: str                  # "fwd", "bwd" or "fwd+bwd"
    shape: tuple
    layout: str                     # "rows", "NCHW", "NHWC", "2-D"
    dtype: str
    nbytes: int = 0                 # minimal bytes moved
    runs: dict = field(default_factory=dict)    # peer -> zero-argument callable
    verify: object = None           # () -> max scaled error of fastreg vs reference

    @property
    def name(self):
        return f"{self.op}_{self.direction}|{'x'.join(map(str, self.shape))}|{self.layout}|{self.dtype}"


def _nbytes(*arrays):
    return int(sum(a.nbytes for a in arrays if a is not None))


def _max_error(got, ref):
    """Largest |got - ref| / max(1, |ref|) over all outputs (NaN counts as failure)."""
    worst = 0.0
    for g, r in zip(got, ref):
        if r is None:
            continue
        g64, r64 = np.asarray(g, np.float64), np.asarray(r, np.float64)
        err = np.abs(g64 - r64) / np.maximum(1.0, np.abs(r64))
        if err.size:
            worst = max(worst, float(np.nan_to_num(err, nan=np.inf).max()))
    return worst


def _torch():
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        import torch
    except ImportError:
        return None
    return torch


def _layer_like(op, shape, dtype, rng, torch):
    """layer_norm / rms_norm cases on (M, D)."""
    M, D = shape
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(D).astype(dtype)
    b = rng.standard_normal(D).astype(dtype) if op == "layer_norm" else None
    fwd = getattr(fastreg, op)
    bwd = getattr(fastreg, op + "_backward")
    fargs = (x, w, b) if op == "layer_norm" else (x, w)
    saved = fwd(*fargs)
    stats = saved[1:]
    bargs = (dy, x, *stats, w, b) if op == "layer_norm" else (dy, x, *stats, w)
    fout = tuple(np.empty_like(s) for s in saved)
    bref = bwd(*bargs, backend="reference")
    bout = tuple(None if r is None else np.empty_like(r) for r in bref)
    cases = [Case(op, "fwd", shape, "rows", np.dtype(dtype).name,
                  _nbytes(x, w, b, *saved)),
             Case(op, "bwd", shape, "rows", np.dtype(dtype).name,
                  _nbytes(dy, x, *stats, w, *bref))]
    cf, cb = cases
    cf.runs = {"fastreg": lambda: fwd(*fargs, out=fout), "fastreg fresh": lambda: fwd(*fargs),
               "numpy": lambda: fwd(*fargs, backend="reference")}
    cf.verify = lambda: _max_error(fwd(*fargs), fwd(*fargs, backend="reference"))
    cb.runs = {"fastreg": lambda: bwd(*bargs, out=bout), "fastreg fresh": lambda: bwd(*bargs),
               "numpy": lambda: bwd(*bargs, backend="reference")}
    cb.verify = lambda: _max_error(bwd(*bargs), bref)
    if torch is not None:
        F = torch.nn.functional
        xt, dyt, wt = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(w)
        if op == "layer_norm":
            bt = torch.from_numpy(b)
            _, mt, rt = torch.ops.aten.native_layer_norm(xt, [D], wt, bt, 1e-5)
            cf.runs["torch"] = lambda: F.layer_norm(xt, (D,), wt, bt, 1e-5)
            # the ATen backward kernel alone, as autograd would call it
            cb.runs["torch"] = lambda: torch.ops.aten.native_layer_norm_backward(
                dyt, xt, [D], mt, rt, wt, bt, [True, True, True])
        else:
            cf.runs["torch"] = lambda: F.rms_norm(xt, (D,), wt, 1e-6)
            xg, wg = xt.clone().requires_grad_(), wt.clone().requires_grad_()
            yg = F.rms_norm(xg, (D,), wg, 1e-6)
            # no ATen backward op for RMS norm on the CPU: autograd through the graph
            cb.runs["torch"] = lambda: torch.autograd.grad(yg, (xg, wg), dyt, retain_graph=True)
    return cases


def _channels_x(shape, layout, dtype, rng):
    """x in its storage layout; shape is always given as (N, C, ...)/(N, C)."""
    x = rng.standard_normal(shape).astype(dtype)
    if layout == "NHWC":
        return np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1
    return x, 1


def _torch_view(torch, a, layout):
    """A torch tensor in (N, C, ...) order sharing a's memory (channels_last for NHWC)."""
    t = torch.from_numpy(a)
    return t.permute(0, t.ndim - 1, *range(1, t.ndim - 1)) if layout == "NHWC" else t


def _channel_cases(op, shape, layout, dtype, rng, torch, groups=None):
    x, axis = _channels_x(shape, layout, dtype, rng)
    dy = rng.standard_normal(x.shape).astype(dtype)
    C = shape[1]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    if op == "batch_norm":
        fwd = lambda **k: fastreg.batch_norm(x, w, b, rm, rv, axis=axis, **k)  # noqa: E731
        saved = fwd()
        bwd = lambda **k: fastreg.batch_norm_backward(dy, x, saved[1], saved[2], w, b,  # noqa: E731
                                                      axis=axis, **k)
    elif op == "group_norm":
        fwd = lambda **k: fastreg.group_norm(x, groups, w, b, axis=axis, **k)  # noqa: E731
        saved = fwd()
        bwd = lambda **k: fastreg.group_norm_backward(dy, x, saved[1], saved[2], groups, w, b,  # noqa: E731
                                                      axis=axis, **k)
    else:
        fwd = lambda **k: fastreg.instance_norm(x, w, b, axis=axis, **k)  # noqa: E731
        saved = fwd()
        bwd = lambda **k: fastreg.instance_norm_backward(dy, x, saved[1], saved[2], w, b,  # noqa: E731
                                                         axis=axis, **k)
    fout = tuple(np.empty_like(s) for s in saved)
    bref = bwd(backend="reference")
    bout = tuple(np.empty_like(r) for r in bref)
    dt = np.dtype(dtype).name
    cf = Case(op, "fwd", shape, layout, dt, _nbytes(x, w, b, *saved))
    cb = Case(op, "bwd", shape, layout, dt, _nbytes(dy, x, saved[1], saved[2], w, *bref))
    cf.runs = {"fastreg": lambda: fwd(out=fout), "fastreg fresh": lambda: fwd(),
               "numpy": lambda: fwd(backend="reference")}
    cf.verify = lambda: _max_error(fwd(), fwd(backend="reference"))
    cb.runs = {"fastreg": lambda: bwd(out=bout), "fastreg fresh": lambda: bwd(),
               "numpy": lambda: bwd(backend="reference")}
    cb.verify = lambda: _max_error(bwd(), bref)
    if torch is not None:
        F, aten = torch.nn.functional, torch.ops.aten
        xt, dyt = _torch_view(torch, x, layout), _torch_view(torch, dy, layout)
        wt, bt = torch.from_numpy(w), torch.from_numpy(b)
        rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        N, HW = shape[0], int(np.prod(shape[2:]))
        if op == "batch_norm":
            cf.runs["torch"] = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, True, 0.1, 1e-5)
            _, sm, si = aten.native_batch_norm(xt, wt, bt, rmt, rvt, True, 0.1, 1e-5)
            cb.runs["torch"] = lambda: aten.native_batch_norm_backward(
                dyt, xt, wt, rmt, rvt, sm, si, True, 1e-5, [True, True, True])
        elif op == "group_norm":
            cf.runs["torch"] = lambda: F.group_norm(xt, groups, wt, bt, 1e-5)
            _, gm, gr = aten.native_group_norm(xt, wt, bt, N, C, HW, groups, 1e-5)
            cb.runs["torch"] = lambda: aten.native_group_norm_backward(
                dyt, xt, gm, gr, wt, N, C, HW, groups, [True, True, True])
        else:
            cf.runs["torch"] = lambda: F.instance_norm(xt, None, None, wt, bt, True, 0.1, 1e-5)
            xg = xt.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            wg, bg = wt.clone().requires_grad_(), bt.clone().requires_grad_()
            yg = F.instance_norm(xg, None, None, wg, bg, True, 0.1, 1e-5)
            # instance norm has no ATen backward of its own: autograd through its graph
            cb.runs["torch"] = lambda: torch.autograd.grad(yg, (xg, wg, bg), dyt,
                                                           retain_graph=True)
    return [cf, cb]


def _fused(cases):
    """fwd+bwd of one op: fastreg (out=) against the NumPy reference."""
    cf, cb = cases
    c = Case(cf.op, "fwd+bwd", cf.shape, cf.layout, cf.dtype, cf.nbytes + cb.nbytes)
    c.runs = {"fastreg": lambda: (cf.runs["fastreg"](), cb.runs["fastreg"]()),
              "numpy": lambda: (cf.runs["numpy"](), cb.runs["numpy"]())}
    return c


STANDARD = [
    ("layer_norm", (8192, 1024), "rows", None), ("layer_norm", (4096, 4096), "rows", None),
    ("rms_norm", (8192, 1024), "rows", None), ("rms_norm", (4096, 4096), "rows", None),
    ("batch_norm", (64, 64, 56, 56), "NCHW", None), ("batch_norm", (64, 64, 56, 56), "NHWC", None),
    ("batch_norm", (16384, 1024), "2-D", None),
    ("group_norm", (32, 128, 56, 56), "NCHW", 32), ("group_norm", (32, 128, 56, 56), "NHWC", 32),
    ("group_norm", (32, 256, 28, 28), "NCHW", 32), ("group_norm", (32, 256, 28, 28), "NHWC", 32),
    ("instance_norm", (32, 128, 56, 56), "NCHW", None),
]


def _quick_shape(shape):
    """About 1/16 of the data: divide the leading (batch) dimension."""
    return (max(2, shape[0] // 16), *shape[1:])


def build_cases(pattern="*", quick=False, seed=0):
    torch = _torch()
    rng = np.random.default_rng(seed)
    cases = []
    for op, shape, layout, groups in STANDARD:
        if not fnmatch.fnmatch(op, pattern):
            continue
        shape = _quick_shape(shape) if quick else shape
        if layout == "rows":
            pair = _layer_like(op, shape, np.float32, rng, torch)
        else:
            pair = _channel_cases(op, shape, layout, np.float32, rng, torch, groups)
        cases += [*pair, _fused(pair)]
    return cases


# --------------------------------------------------------------------------- measuring

def median_time(fn, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth(nbytes=256 << 20, repeat=10):
    """GB/s of the best copy into a reused buffer (bytes read + bytes written):
    NumPy's single-threaded copy and a Numba copy over all threads."""
    import numba

    @numba.njit(parallel=True, cache=False)
    def parallel_copy(src, dst):
        for i in numba.prange(src.shape[0]):
            dst[i] = src[i]

    n = nbytes // 2 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    t_np = median_time(lambda: np.copyto(dst, src), repeat)
    t_nb = median_time(lambda: parallel_copy(src, dst), repeat, warmup=2)
    moved = 2 * src.nbytes
    return {"numpy_copyto_gbs": moved / t_np / 1e9, "numba_parallel_gbs": moved / t_nb / 1e9,
            "ceiling_gbs": max(moved / t_np, moved / t_nb) / 1e9, "bytes": moved}


def measure(case, repeat, ceiling):
    row = {"case": case.name, "op": case.op, "direction": case.direction,
           "shape": list(case.shape), "layout": case.layout, "dtype": case.dtype,
           "bytes": case.nbytes}
    for peer, fn in case.runs.items():
        row[f"{peer} ms"] = median_time(fn, repeat) * 1e3
    ms = row["fastreg ms"]
    row["GB/s"] = case.nbytes / ms / 1e6
    row["% copy"] = 100.0 * row["GB/s"] / ceiling
    row["x numpy"] = row["numpy ms"] / ms
    if "torch ms" in row:
        row["x torch"] = row["torch ms"] / ms
        row["x torch fresh"] = row["torch ms"] / row["fastreg fresh ms"]
    if case.verify is not None:
        row["max error"] = case.verify()
        row["ok"] = bool(row["max error"] <= (1e-4 if case.dtype == "float32" else 1e-10))
    return row


# --------------------------------------------------------------------------- reporting

COLUMNS = [("case", "{}"), ("fastreg ms", "{:.2f}"), ("GB/s", "{:.1f}"), ("% copy", "{:.0f}"),
           ("fastreg fresh ms", "{:.2f}"), ("torch ms", "{:.2f}"), ("x torch", "{:.2f}"),
           ("x torch fresh", "{:.2f}"), ("numpy ms", "{:.1f}"), ("x numpy", "{:.1f}"),
           ("max error", "{:.1e}"), ("ok", "{}")]


def _cells(row):
    return [fmt.format(row[k]) if row.get(k) is not None else "-" for k, fmt in COLUMNS]


def format_table(rows):
    head = [k for k, _ in COLUMNS]
    body = [_cells(r) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def format_markdown(rows, machine):
    head = [k for k, _ in COLUMNS]
    out = [machine, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", " ") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def machine_info(torch_mod):
    import numba
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": None if torch_mod is None else torch_mod.__version__,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}
    if torch_mod is not None:
        info["torch_threads"] = torch_mod.get_num_threads()
    try:
        info["threading_layer"] = numba.threading_layer()
    except ValueError:
        info["threading_layer"] = "not initialized"
    return info


# --------------------------------------------------------------------------- command

def first_call_times(pattern):
    """Seconds of each op's first forward+backward calls in this process (both
    layouts): compile time on a cold Numba cache, cache loading on a warm one."""
    rng = np.random.default_rng(1)
    nchw = rng.standard_normal((64, 8, 6, 6)).astype(np.float32)
    layouts = [(nchw, 1), (np.ascontiguousarray(np.moveaxis(nchw, 1, -1)), -1)]
    w = np.ones(8, np.float32)

    def rows(op):
        fwd, bwd = getattr(fastreg, op), getattr(fastreg, op + "_backward")
        x = nchw.reshape(64, -1)
        bwd(x, x, *fwd(x, w.repeat(36))[1:], w.repeat(36))

    def channels(op, *groups):
        fwd, bwd = getattr(fastreg, op), getattr(fastreg, op + "_backward")
        for x, axis in layouts:
            _, mean, rstd = fwd(x, *groups, w, w, axis=axis)
            bwd(x, x, mean, rstd, *groups, w, w, axis=axis)

    calls = {"layer_norm": lambda: rows("layer_norm"), "rms_norm": lambda: rows("rms_norm"),
             "batch_norm": lambda: channels("batch_norm"),
             "group_norm": lambda: channels("group_norm", 2),
             "instance_norm": lambda: channels("instance_norm")}
    times = {}
    for op, fn in calls.items():
        if fnmatch.fnmatch(op, pattern):
            t0 = time.perf_counter()
            fn()
            times[op] = time.perf_counter() - t0
    return times


def bench(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastreg bench", description=__doc__.split("\n")[0])
    p.add_argument("--ops", default="*", help="glob over op names, e.g. 'layer_*'")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (< 1 min)")
    p.add_argument("--repeat", type=int, default=None, help="timed repeats per peer")
    p.add_argument("--out", default="bench-results", help="folder for results.json, cpu-norm.md")
    args = p.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 15)

    torch_mod = _torch()
    import numba  # noqa: F401  (after THP is set: numba does not care, torch does)
    first = first_call_times(args.ops)
    bw = copy_bandwidth(32 << 20 if args.quick else 256 << 20, repeat=5 if args.quick else 10)
    info = machine_info(torch_mod)
    print(f"fastreg {fastreg.__version__} | numpy {info['numpy']} | numba {info['numba']} "
          f"({info['threading_layer']}, {info['numba_threads']} threads) | torch {info['torch']} "
          f"(THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE']})")
    print(f"copy ceiling {bw['ceiling_gbs']:.1f} GB/s (np.copyto {bw['numpy_copyto_gbs']:.1f}, "
          f"Numba parallel copy {bw['numba_parallel_gbs']:.1f}; bytes read + written)")
    print("first call per op (compile or cache load): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in first.items()))
    rows = []
    for case in build_cases(args.ops, args.quick):
        rows.append(measure(case, repeat, bw["ceiling_gbs"]))
        print(f"  {case.name}: {rows[-1]['fastreg ms']:.2f} ms", file=sys.stderr)
    print(format_table(rows))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "copy": bw, "first_call_s": first, "repeat": repeat,
              "quick": args.quick, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    machine = (f"{info['cores']} cores, numba {info['numba']} ({info['threading_layer']}, "
               f"{info['numba_threads']} threads), torch {info['torch']} with "
               f"THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE']}; copy ceiling "
               f"{bw['ceiling_gbs']:.1f} GB/s; medians of {repeat} runs; float32.")
    (out / "cpu-norm.md").write_text(format_markdown(rows, machine))
    failed = [r["case"] for r in rows if r.get("ok") is False]
    if failed:
        print(f"VERIFICATION FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {sum('ok' in r for r in rows)} verified cases match the reference; "
          f"results in {out}/")
    return 0
