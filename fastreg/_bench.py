"""``python -m fastreg bench``: time every op against the copy ceiling, NumPy and PyTorch.

The method (shared/DESIGN.md §4): the kernels are memory-bound, so every case
carries the fewest bytes its op must move (each input read once, each output
written once, parameters and statistics included) and is reported as GB/s and
as % of the machine's measured copy bandwidth, beside the ratio to the NumPy
reference and to PyTorch measured in the same process.

Per case (op, direction, shape, layout, dtype) the peers are

    fastreg        into preallocated outputs (``out=``), the loop-friendly call
    fastreg fresh  into fresh outputs (pays the page faults of new memory)
    numpy          the NumPy reference (``backend="reference"``)
    torch          PyTorch's CPU kernels on the same memory (they allocate
                   their outputs, with THP_MEM_ALLOC_ENABLE=1, see below)
    copy           a Numba copy moving the case's minimal bytes: "% copy beside"
                   holds the op against a ceiling timed in the same rounds
                   (the machine's bandwidth drifts over a run; "% copy" uses
                   the one ceiling measured at the start)

timed round robin (one sample of each peer per round, so a busy spell of a
shared machine hits every peer alike), medians after a warm-up call. The
first call of each fastreg forward/backward is timed separately: Numba
compilation, or loading from Numba's cache when it is on (the header says
which; ``FASTREG_NUMBA_CACHE=0`` or an empty ``NUMBA_CACHE_DIR`` times
compilation). fastreg's results are then checked against the reference,
both the ``out=`` buffers (poisoned with NaN first) and a fresh call; any
failure (or exception) makes the command exit 1.

PyTorch's CPU allocator hands out fresh 4 KiB pages and spends most of a call
on their page faults unless ``THP_MEM_ALLOC_ENABLE=1`` (transparent huge
pages) is set before torch is imported; users who care about speed set it,
so the bench sets it too (unless the caller chose a value) and says so.

PyTorch and Numba each run their own OpenMP thread pool, whose threads
spin-wait after a parallel region. Timed in turns on few cores, each pool's
spinning threads steal the cores the other needs (here a layer-norm backward
ran 2-3x slower for both peers). The bench therefore sets
``OMP_WAIT_POLICY=PASSIVE`` (unless the caller chose a value) before either
pool starts, so idle threads sleep, and says so; programs that alternate
PyTorch and fastreg calls should do the same.

The cases come from one module per op family (``fastreg/_bench_norm.py``, ...;
the interface is described at ``FAMILIES``); this module is the family
registry and spec selection (``select_specs``, ``build``), timing
(``time_peers``, ``copy_bandwidth``), verification (``compare``) and
reporting (``table_cells``, ``format_text``, ``format_markdown``). The
pytest-benchmark suites in bench/ reuse the same cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import gc
import importlib
import json
import math
import os
import pathlib
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import fastreg

PEERS = ("fastreg", "fastreg fresh", "numpy", "torch")

# (rtol, atol) by dtype, as tests/_assert.py: forward outputs and gradients.
TOLERANCES = {
    "float32": {"out": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    "float64": {"out": (1e-12, 1e-12), "grad": (1e-10, 1e-10)},
}
TORCH_TOLERANCE = (1e-3, 1e-3)  # sanity check of the torch peer (float32 accumulations)


# =========================================================================== families and cases

# Each family of ops plugs its cases in through a module ``fastreg._bench_<family>``
# providing:
#   FAMILY         its name ("norm")
#   SPECS          the standard inputs: objects with .op, .shape, .layout, .dtype,
#                  .x_bytes (largest array, sizes the copy measurement), .directions
#                  (e.g. ("fwd", "bwd", "fwd+bwd")), .name(direction) (the case id
#                  "<op>_<dir>|<shape>|<dtype>") and .quick() (a small version),
#                  frozen dataclasses so dataclasses.replace(spec, dtype=...) works
#   DTYPES         the dtype names its CPU kernels run
#   build(spec, torch=None, seed=0) -> {direction: Case}
#   summary(rows)  -> lines of notes under the table (may return [])
FAMILIES = ("norm", "dropout", "prox")


def families():
    """The family modules, in table order (imported on first use)."""
    return [importlib.import_module(f"fastreg._bench_{name}") for name in FAMILIES]


def family_of(spec):
    """The family module a spec belongs to."""
    return sys.modules[type(spec).__module__]


def all_ops():
    return tuple(dict.fromkeys(s.op for f in families() for s in f.SPECS))


def all_dtypes():
    return tuple(dict.fromkeys(d for f in families() for d in f.DTYPES))


def select_specs(ops="*", quick=False, dtypes=("float32",)):
    """The standard specs whose op matches one of the comma-separated globs in ``ops``,
    in each of ``dtypes`` that the op's family runs."""
    patterns = [p.strip() for p in ops.split(",") if p.strip()] or ["*"]
    specs = [dataclasses.replace(s, dtype=dt) for dt in dtypes for f in families()
             if dt in f.DTYPES for s in f.SPECS
             if any(fnmatch.fnmatchcase(s.op, p) for p in patterns)]
    return [s.quick() for s in specs] if quick else specs


def build(spec, torch=None, seed=0):
    """The cases of one spec, as ``{direction: Case}`` (see the family's build)."""
    return family_of(spec).build(spec, torch, seed)


@dataclass
class Case:
    """One row of the table: peers to time, byte count, how to verify."""
    spec: object
    direction: str
    nbytes: int                                 # minimal bytes moved
    runs: dict = field(default_factory=dict)    # peer -> zero-argument callable
    verify: object = None                       # () -> compare() dict: fastreg vs reference
    check_torch: object = None                  # () -> compare() dict: torch vs reference
    first_call_s: float | None = None           # fastreg's first call in this process
    floor_bytes: int | None = None              # bytes any kernel must move (None: nbytes)

    @property
    def name(self):
        return self.spec.name(self.direction)


def nbytes(*arrays):
    """Bytes of the arrays given (None counts 0)."""
    return int(sum(a.nbytes for a in arrays if a is not None))


# =========================================================================== timing

def time_peers(runs, repeat, *, budget_s=None, min_sample_s=2e-3, max_number=100, warm_s=0.0):
    """Median seconds per call of each peer.

    One warm-up call per peer (and, if it was quick, a second call) sets how
    many calls make one sample: enough for ``min_sample_s``, so
    sub-millisecond calls are not timer noise; such short samples start
    after one untimed call, so a peer's caches are its own, not what the
    previous peer left. With ``warm_s``, a peer whose call is shorter than
    that runs untimed for ``warm_s`` before each sample: after a
    single-threaded peer (the NumPy reference, parts of PyTorch) has left a
    core idle, a 2-thread kernel here ran up to 2x slower for its next
    ~25 ms (compute-bound Philox loops most; a copy barely), so a sample
    taken cold measures the previous peer's idling. Then ``repeat`` rounds, each taking one sample of
    every peer, in an order shuffled per round (seeded), so no peer always
    follows the same one. With ``budget_s`` a peer stops
    once it has 3 samples and has used that many seconds (the NumPy
    reference takes seconds per call at full size).
    Returns ``{peer: {"s": median, "samples": n, "number": calls per sample}}``.
    """
    def once(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    number = {}
    warm = {}
    for peer, fn in runs.items():
        t = once(fn)
        if t < min_sample_s:
            t = once(fn)
        number[peer] = max(1, min(max_number, math.ceil(min_sample_s / max(t, 1e-9))))
        warm[peer] = t < warm_s
    order = np.random.default_rng(0)
    samples = {peer: [] for peer in runs}
    spent = dict.fromkeys(runs, 0.0)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for peer in order.permutation(list(runs)):
                fn = runs[peer]
                if budget_s is not None and len(samples[peer]) >= 3 and spent[peer] >= budget_s:
                    continue
                n = number[peer]
                if warm[peer]:
                    end = time.perf_counter() + warm_s
                    while time.perf_counter() < end:
                        fn()
                elif n > 1:
                    fn()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                t = time.perf_counter() - t0
                spent[peer] += t
                samples[peer].append(t / n)
    finally:
        if enabled:
            gc.enable()
    return {peer: {"s": float(np.median(s)), "samples": len(s), "number": number[peer]}
            for peer, s in samples.items()}


_COPY_KERNEL = None


def copy_kernel():
    """A Numba copy over all of Numba's threads (compiled on first use, not cached:
    DESIGN.md caches no parallel kernel without a test)."""
    global _COPY_KERNEL
    if _COPY_KERNEL is None:
        import numba

        @numba.njit(parallel=True, nogil=True, cache=False)
        def parallel_copy(src, dst):
            for i in numba.prange(src.shape[0]):
                dst[i] = src[i]
        _COPY_KERNEL = parallel_copy
    return _COPY_KERNEL


COPY_PEER = "copy (same bytes)"
WARM_S = 0.05


def same_bytes_copy(nbytes):
    """A peer for a case's round robin: the Numba copy of ``nbytes / 2`` bytes into a
    reused buffer, so it moves the case's minimal bytes. Timed in the same rounds as
    the op, it is a ceiling that shares the op's moment (the machine is shared and
    its bandwidth drifts over a run) and the op's footprint (a case that fits in L3
    is held against a copy that fits too): "% copy beside"."""
    n = max(1, int(nbytes) // 8)
    src = np.ones(n, np.float32)
    dst = np.zeros_like(src)                     # both touched: no page faults timed
    kernel = copy_kernel()
    return lambda: kernel(src, dst)


def copy_bandwidth(array_bytes, repeat=10):
    """GB/s of a copy into a reused buffer, bytes read + bytes written.

    Two copies of an array of ``array_bytes`` (at least 32 MiB, so 64 MiB
    move per copy): NumPy's ``np.copyto`` (one thread) and a Numba ``prange``
    copy on Numba's threads (the ones fastreg's kernels use). The ceiling is
    the faster of the two.
    """
    import numba

    n = max(int(array_bytes), 32 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.zeros_like(src)                     # both touched: no page faults timed
    kernel = copy_kernel()
    kernel(src, dst)                             # compile
    t = time_peers({"numpy": lambda: np.copyto(dst, src), "numba": lambda: kernel(src, dst)},
                   repeat)
    moved = 2 * src.nbytes
    np_gbs, nb_gbs = moved / t["numpy"]["s"] / 1e9, moved / t["numba"]["s"] / 1e9
    return {"bytes_moved": moved, "numpy_copyto_gbs": np_gbs, "numba_parallel_gbs": nb_gbs,
            "numba_threads": numba.get_num_threads(), "ceiling_gbs": max(np_gbs, nb_gbs)}


# =========================================================================== verification

def compare(got, ref, names, rtol, atol):
    """How far ``got`` ({variant: outputs}) is from ``ref`` (outputs), per element
    ``|got - ref| / (atol + rtol * |ref|)`` (np.isclose's rule), worst over all.

    NaN, a missing output or a wrong shape counts as infinitely wrong. Returns
    ``{"ok", "max_abs_err", "err/tol", "worst", "rtol", "atol"}``; ``ok`` iff
    ``err/tol <= 1``.
    """
    worst = {"max_abs_err": 0.0, "err/tol": 0.0, "worst": None}
    for variant, outs in got.items():
        for name, g, r in zip(names, outs, ref):
            if g is None and r is None:
                continue
            if g is None or r is None or np.shape(g) != np.shape(r):
                abs_err = ratio = math.inf
            elif np.size(r) == 0:
                continue
            else:
                r64 = np.asarray(r, np.float64)
                diff = np.abs(np.asarray(g, np.float64) - r64)
                diff[np.isnan(diff)] = np.inf
                abs_err = float(diff.max())
                ratio = float((diff / (atol + rtol * np.abs(r64))).max())
            worst["max_abs_err"] = max(worst["max_abs_err"], abs_err)
            if ratio > worst["err/tol"] or worst["worst"] is None:
                worst["err/tol"], worst["worst"] = ratio, f"{name} ({variant})"
    return {"ok": bool(worst["err/tol"] <= 1.0), **worst, "rtol": rtol, "atol": atol}


# =========================================================================== measuring

def measure(case, repeat, ceiling_gbs, budget_s=None, warm_s=0.0):
    """Time every peer of ``case``, verify it, and return its result row (a dict)."""
    spec = case.spec
    row = {"case": case.name, "family": family_of(spec).FAMILY, "op": spec.op,
           "direction": case.direction,
           "shape": list(spec.shape), "layout": spec.layout, "dtype": spec.dtype,
           "backend": "cpu",
           "bytes": case.nbytes, "first_call_s": case.first_call_s}
    runs = dict(case.runs)
    runs[COPY_PEER] = same_bytes_copy(case.nbytes)
    times = time_peers(runs, repeat, budget_s=budget_s, warm_s=warm_s)
    row["ms"] = {peer: t["s"] * 1e3 for peer, t in times.items()}
    row["samples"] = {peer: t["samples"] for peer, t in times.items()}
    copy_gbs = case.nbytes / row["ms"][COPY_PEER] / 1e6
    row["copy beside"] = {"ms": row["ms"][COPY_PEER], "GB/s": copy_gbs}
    # The best x torch a kernel could reach: its floor bytes at the copy's speed.
    row["floor bytes"] = case.floor_bytes or case.nbytes
    floor_ms = row["ms"][COPY_PEER] * row["floor bytes"] / case.nbytes
    row["x torch at floor"] = row["ms"]["torch"] / floor_ms if "torch" in row["ms"] else None
    for variant in ("fastreg", "fastreg fresh"):
        if variant not in row["ms"]:          # an in-place update has no fresh outputs
            continue
        ms = row["ms"][variant]
        gbs = case.nbytes / ms / 1e6
        row[variant] = {"ms": ms, "GB/s": gbs, "% copy": 100.0 * gbs / ceiling_gbs,
                        "% copy beside": 100.0 * gbs / copy_gbs,
                        "x numpy": row["ms"]["numpy"] / ms,
                        "x torch": row["ms"]["torch"] / ms if "torch" in row["ms"] else None}
    if case.verify is not None:
        row["verify"] = case.verify()
        row["ok"] = row["verify"]["ok"]
    if case.check_torch is not None:
        row["torch_check"] = case.check_torch()
    return row


def error_row(spec, direction, exc):
    """The row of a case that raised: reported, and a failure."""
    return {"case": spec.name(direction), "family": family_of(spec).FAMILY, "op": spec.op,
            "direction": direction,
            "shape": list(spec.shape), "layout": spec.layout, "dtype": spec.dtype,
            "backend": "cpu",
            "error": f"{type(exc).__name__}: {exc}", "ok": False}


def run_spec(spec, torch, repeat, ceiling_gbs, budget_s=None, log=None, warm_s=0.0):
    """Build, time and verify the three cases of one spec; the arrays die with it."""
    try:
        cases = build(spec, torch)
    except Exception as exc:   # a broken kernel is a failed row, not a dead run
        return [error_row(spec, d, exc) for d in spec.directions]
    rows = []
    for direction, case in cases.items():
        try:
            rows.append(measure(case, repeat, ceiling_gbs, budget_s, warm_s))
        except Exception as exc:
            rows.append(error_row(spec, direction, exc))
        if log:
            r = rows[-1]
            log(f"  {r['case']}: " + (f"{r['ms']['fastreg']:.3f} ms" if "ms" in r
                                      else r["error"]))
    return rows


# =========================================================================== reporting

def _f(v, fmt):
    return "-" if v is None else fmt.format(v)


HEAD = ["case", "layout", "backend", "MB", "variant", "ms", "GB/s", "% copy", "% copy beside",
        "x numpy",
        "x torch", "torch ms", "numpy ms", "1st call s", "max abs err", "err/tol", "ok"]


def table_cells(rows):
    """Two lines per case: fastreg with ``out=``, then with fresh outputs."""
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["case"], r["layout"], r["backend"], *["-"] * (len(HEAD) - 4),
                          "ERROR"])
            continue
        ms = r["ms"]
        for i, variant in enumerate(("fastreg", "fastreg fresh")):
            if variant not in r:              # an in-place update has no fresh outputs
                continue
            v = r[variant]
            cells = [r["case"] if i == 0 else "", r["layout"] if i == 0 else "",
                     r["backend"] if i == 0 else "",
                     f"{r['bytes'] / 1e6:.1f}" if i == 0 else "", "out=" if i == 0 else "fresh",
                     _f(v["ms"], "{:.3f}"), _f(v["GB/s"], "{:.1f}"), _f(v["% copy"], "{:.0f}"),
                     _f(v.get("% copy beside"), "{:.0f}"), _f(v["x numpy"], "{:.1f}"), _f(v["x torch"], "{:.2f}")]
            if i == 0:
                verify = r.get("verify")
                cells += [_f(ms.get("torch"), "{:.3f}"), _f(ms["numpy"], "{:.2f}"),
                          _f(r["first_call_s"], "{:.2f}"),
                          _f(verify and verify["max_abs_err"], "{:.1e}"),
                          _f(verify and verify["err/tol"], "{:.2g}"),
                          "-" if verify is None else ("ok" if verify["ok"] else "FAIL")]
            else:
                cells += [""] * 6
            lines.append(cells)
    return lines


def format_text(rows):
    body = table_cells(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(HEAD)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(HEAD), line(["-" * w for w in widths]), *map(line, body)])


def format_markdown(rows, preamble):
    head = "| " + " | ".join(HEAD) + " |"
    sep = "|" + "|".join("---" if i < 4 else "---:" for i in range(len(HEAD))) + "|"
    body = ["| " + " | ".join(c.replace("|", " ") for c in cells) + " |"
            for cells in table_cells(rows)]
    return "\n".join([*preamble, "", head, sep, *body]) + "\n"


def summary_lines(rows, first_call):
    """The notes under the table: cold first calls, each family's notes, problems."""
    out = ["cold first call per op (every direction and layout; Numba compilation or cache "
           "load): " + ", ".join(f"{op} {s:.2f} s" for op, s in first_call.items())]
    for fam in families():
        mine = [r for r in rows if r.get("family") == fam.FAMILY]
        if mine:
            out += fam.summary(mine)
    for r in rows:
        tc = r.get("torch_check")
        if tc and not tc["ok"]:
            out.append(f"warning: the torch peer of {r['case']} disagrees with the reference "
                       f"(err/tol {tc['err/tol']:.2g}): its timing compares unlike work")
    return out


def first_call_per_op(rows):
    first = {}
    for r in rows:
        if r.get("first_call_s") is not None:
            first[r["op"]] = first.get(r["op"], 0.0) + r["first_call_s"]
    return first


def failures(rows):
    return [r["case"] for r in rows if r.get("ok") is False]


# =========================================================================== environment

def set_environment():
    """THP_MEM_ALLOC_ENABLE=1 and OMP_WAIT_POLICY=PASSIVE unless the caller set them
    (see the module docstring); before torch is imported and any OpenMP pool starts."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def import_torch():
    """torch with THP_MEM_ALLOC_ENABLE=1 (unless set), or None when not installed."""
    preloaded = "torch" in sys.modules
    set_environment()
    try:
        import torch
    except ImportError:
        return None
    if preloaded:
        print("warning: torch was imported before fastreg bench could set "
              "THP_MEM_ALLOC_ENABLE; its allocator uses what it saw then", file=sys.stderr)
    return torch


def _cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numba_cache_dir():
    """Where Numba keeps fastreg's compiled kernels, or None when caching is off."""
    import numba

    from fastreg.cpu import _common
    if not _common.CACHE:
        return None
    try:
        from fastreg.cpu import norm
        return str(norm._layer_norm_fwd_rows._cache._cache_path)   # what Numba resolved
    except Exception:                                              # private API moved
        return numba.config.CACHE_DIR or "__pycache__ beside fastreg/cpu (or user-wide)"


def machine_info(torch=None):
    """Versions, threads, Numba's threading layer and cache, THP setting."""
    import numba

    from fastreg.cpu import _common
    tiny = np.zeros(8, np.float32)
    copy_kernel()(tiny, tiny.copy())        # starts Numba's thread pool: the layer is known
    info = {"fastreg": fastreg.__version__, "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__,
            "torch": None if torch is None else torch.__version__,
            "numba_threads": numba.get_num_threads(),
            "numba_threading_layer": numba.threading_layer(),
            "numba_cache": _common.CACHE,
            "numba_cache_dir": numba_cache_dir(),
            "torch_threads": None if torch is None else torch.get_num_threads(),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()}
    return info


def describe(info):
    cache = (f"on, {info['numba_cache_dir']}" if info["numba_cache"]
             else "off (FASTREG_NUMBA_CACHE=0)")
    torch = ("not installed" if info["torch"] is None else
             f"{info['torch']} ({info['torch_threads']} threads, "
             f"THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE']})")
    return [f"fastreg {info['fastreg']} | python {info['python']} | numpy {info['numpy']}",
            f"numba {info['numba']} ({info['numba_threading_layer']} threading layer, "
            f"{info['numba_threads']} threads) | cache {cache}",
            f"torch {torch}",
            f"cpu {info['cpu']} ({info['cores']} logical cores) | {info['platform']}"]


# =========================================================================== commands

def add_arguments(p):
    p.add_argument("--ops", default="*", metavar="PATTERN",
                   help="comma-separated globs over op names ("
                        + ", ".join(all_ops()) + "), e.g. 'layer_norm,rms_*' (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="1/16 of the batch, 3 repeats: the whole run in well under a minute")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="timed samples per peer (default 15 within 5 s per peer; --quick 3)")
    p.add_argument("--backend", default="all", choices=("cpu", "cuda", "all"),
                   help="which fastreg backend to time (default: all that are available)")
    p.add_argument("--dtype", default="float32", metavar="DTYPES",
                   help="comma-separated dtypes: float32, float64 (default: float32)")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="folder for results.json, cpu-<family>.md and bandwidth.png "
                        "(default: bench-results)")
    return p


BACKENDS_AVAILABLE = ("cpu",)   # the CUDA backend is not built yet


def _backends(choice):
    """The backends to time, or an error message."""
    if choice == "all":
        return list(BACKENDS_AVAILABLE), None
    if choice not in BACKENDS_AVAILABLE:
        return [], f"the {choice!r} backend is not available in this version of fastreg"
    return [choice], None


def _dtypes(text):
    """Parse --dtype; returns (dtypes, error message)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = all_dtypes()
    bad = [n for n in names if n not in known]
    if bad or not names:
        return [], f"--dtype must list some of {', '.join(known)}, got {text!r}"
    return names, None


def _progress(specs):
    """Iterate over specs with a progress bar on stderr (tqdm), or plainly without it."""
    try:
        from tqdm import tqdm
    except ImportError:
        return specs, print
    bar = tqdm(specs, desc="bench", unit="shape", file=sys.stderr, dynamic_ncols=True)
    return bar, bar.write


def bench(argv=None):
    """``python -m fastreg bench``; returns the exit status (1 if a check failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m fastreg bench",
        description="Time every op against the copy ceiling, NumPy and PyTorch; verify "
                    "fastreg against the NumPy reference (exit 1 if a check fails).")
    args = add_arguments(parser).parse_args(argv)
    backends, problem = _backends(args.backend)
    if not problem:
        dtypes, problem = _dtypes(args.dtype)
    if problem:
        print(f"fastreg bench: {problem}", file=sys.stderr)
        return 2
    specs = select_specs(args.ops, args.quick, dtypes)
    if not specs:
        print(f"fastreg bench: no op matches {args.ops!r}; ops are {', '.join(all_ops())}",
              file=sys.stderr)
        return 2
    if args.repeat is not None and args.repeat < 1:
        print("fastreg bench: --repeat must be >= 1", file=sys.stderr)
        return 2
    repeat = args.repeat or (3 if args.quick else 15)
    budget = None if args.repeat else (0.5 if args.quick else 5.0)
    warm = 0.0 if args.quick else WARM_S

    torch = import_torch()
    info = machine_info(torch)
    bw = copy_bandwidth(max(s.x_bytes for s in specs), repeat=5 if args.quick else 10)
    ceiling = bw["ceiling_gbs"]
    head = describe(info) + [
        f"copy ceiling {ceiling:.1f} GB/s (bytes read + written, {bw['bytes_moved'] / 1e6:.0f} MB"
        f" per copy into a reused buffer): np.copyto {bw['numpy_copyto_gbs']:.1f}, Numba prange "
        f"on {bw['numba_threads']} threads {bw['numba_parallel_gbs']:.1f}"]
    if torch is not None:
        head.append("torch peer: its own fresh outputs; THP_MEM_ALLOC_ENABLE="
                    f"{info['THP_MEM_ALLOC_ENABLE']} set before importing torch (without it "
                    "its allocator spends much of a call on 4 KiB page faults)")
    head.append(f"OMP_WAIT_POLICY={info['OMP_WAIT_POLICY']} (PyTorch's and Numba's OpenMP "
                "pools: idle threads sleep instead of spinning on the other's cores)")
    head.append(f"medians of {repeat} samples per peer, round robin, after a warm-up call"
                + (f"; a peer faster than {warm * 1e3:.0f} ms runs untimed for that long "
                   "before each sample (cores left idle by a single-threaded peer run "
                   "slower for ~25 ms)" if warm else "")
                + ("" if budget is None else f" (a peer stops after {budget:g} s)")
                + ("; --quick shapes (cache-sized: a check of the machinery, not of the"
                   " memory-bound speed)" if args.quick else "; standard shapes"))
    print("\n".join(head), flush=True)

    rows = []
    progress, write = _progress(specs)
    log = lambda s: write(s, file=sys.stderr)  # noqa: E731
    for spec in progress:
        rows += run_spec(spec, torch, repeat, ceiling, budget, log, warm)

    first = first_call_per_op(rows)
    notes = summary_lines(rows, first)
    print()
    print(format_text(rows))
    print("\n".join(notes))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "copy": bw, "first_call_s": first, "repeat": repeat,
              "budget_s": budget, "quick": args.quick, "ops": args.ops,
              "backends": backends, "dtypes": dtypes,
              "tolerances": TOLERANCES, "rows": rows}
    (out / "results.json").write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False))
    for fam in families():     # one table per family: cpu-norm.md, cpu-dropout.md, ...
        mine = [r for r in rows if r.get("family") == fam.FAMILY]
        if mine:
            fam_notes = [n for n in summary_lines(mine, first_call_per_op(mine))]
            (out / f"cpu-{fam.FAMILY}.md").write_text(format_markdown(
                mine, [f"    {h}" for h in head] + [""] + [f"- {n}" for n in fam_notes]))
    try:
        from ._plot import plot_bandwidth
        plot_bandwidth(rows, ceiling, out / "bandwidth.png",
                       f"fastreg {info['fastreg']} on {info['cpu']} ({info['numba_threads']} "
                       f"threads), {', '.join(dtypes)}, medians of {repeat}")
        print(f"plot: {out / 'bandwidth.png'}")
    except ImportError:
        print("plot: skipped (matplotlib is not installed; pip install 'fastreg[bench]')")
    failed = failures(rows)
    if failed:
        print(f"VERIFICATION FAILED: {', '.join(failed)}", file=sys.stderr)
        for r in rows:
            if r.get("ok") is False:
                why = r.get("error") or (f"err/tol {r['verify']['err/tol']:.3g} at "
                                         f"{r['verify']['worst']}, max abs error "
                                         f"{r['verify']['max_abs_err']:.3g}")
                print(f"  {r['case']}: {why}", file=sys.stderr)
        return 1
    print(f"all {sum('verify' in r for r in rows)} verified cases match the reference; "
          f"results in {out}/")
    return 0


def _jsonable(v):
    """Plain JSON: NumPy scalars as Python numbers, inf/NaN (a failed check) as strings."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


main = bench


def info(argv=None):
    """``python -m fastreg info``: versions, threads, Numba's threading layer and cache."""
    argparse.ArgumentParser(prog="python -m fastreg info",
                            description="Show versions, threads and caches.").parse_args(argv)
    torch = import_torch()
    print("\n".join(describe(machine_info(torch))))
    try:
        import cupy
        device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        print(f"cupy {cupy.__version__}, CUDA device 0: {device} (no fastreg GPU backend yet)")
    except Exception as exc:  # not installed, or no device/driver
        print(f"cupy/CUDA: not available ({type(exc).__name__})")
    print("backends: cpu (Numba), reference (NumPy); cuda: not available yet")
    return 0
