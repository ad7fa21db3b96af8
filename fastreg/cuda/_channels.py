"""Launch geometry of the norms over channels (batch, group, instance norm).

The kernels are the building blocks of ``kernels/channel_norm.cuh`` (rows)
and ``kernels/batch_norm.cu`` (chunks); the header of each says what a
block does. This module turns shapes into grids, the one place to tune them:

Rows: x as (O, R, K), W columns per statistic group. Blocks of 256 threads,
TC across columns (the smallest power of two >= the row's 16-byte units,
at most 256) and TR = 256 / TC across rows; CT = ceil(units / TC) column
tiles; S row splits per outer slice with about ``TARGET_BLOCKS`` blocks in
all (about 16 per SM on a 132-SM H100, enough to stream) but at least
``MIN_ROWS_PER_THREAD`` rows per thread, so that the partials (3 values per
column and split forward, 2 backward) stay small next to x: at most 1/4 of
the rows' bytes, in practice < 1% at the benchmark shapes (NHWC
256x56x56x64 float32: S = 2048 splits of 392 rows, 1.5 MB of partials for
205 MB of x).

Chunks (batch norm, B * itemsize >= 32): grid (C, S), 256 threads, S
splits per channel with about ``TARGET_BLOCKS`` blocks in all and at least
``MIN_UNITS_PER_THREAD`` 16-byte units per thread (NCHW 256x64x56x56
float32: S = 32, 6272 units per block).

Every grid here depends on the shapes (and on ``vec``: whether 16-byte
loads apply, which the alignment of the arrays decides) and never on the
device, so the partials, and the order in which they are merged, are the
same on every GPU and under the emulation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import VEC

ROWS_THREADS = 256
CHUNK_THREADS = 256
MERGE_THREADS = 256           # 8 warps: one statistic group per warp
COEF_THREADS = 256            # one column (or channel) per thread
TARGET_BLOCKS = 2048          # ~16 blocks per SM on a 132-SM H100
MIN_ROWS_PER_THREAD = 4
MIN_UNITS_PER_THREAD = 4
CHUNK_MIN_BYTES = 32          # one 32-byte sector: shorter chunks go to the rows kernels
MAX_GRID_YZ = 65535


def next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a, b):
    return -(-a // b)


def acc_dtype(dtype):
    """The kernels' accumulation type A: float32, or float64 for float64."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def vec_ok(dev, n, N, arrays):
    """16-byte loads: n (the contiguous run length) a multiple of N, arrays aligned."""
    return n % N == 0 and all(a is None or dev.address(a) % 16 == 0 for a in arrays)


def f64(dev, a):
    """A (C,)-like array as contiguous float64 (no copy when it already is)."""
    return None if a is None else dev.contiguous(a.astype(np.float64, copy=False)).reshape(-1)


def param(dev, a, n):
    return None if a is None else dev.contiguous(a).reshape(n)


@dataclasses.dataclass(frozen=True)
class RowsPlan:
    TC: int               # threads across columns
    CT: int               # column tiles
    S: int                # row splits per outer slice
    rows_per_split: int


def rows_plan(O, R, K, nv):
    units = cdiv(K, nv)
    TC = min(ROWS_THREADS, next_pow2(units))
    TR = ROWS_THREADS // TC
    CT = cdiv(units, TC)
    S = max(1, min(cdiv(R, MIN_ROWS_PER_THREAD * TR), cdiv(TARGET_BLOCKS, O * CT), MAX_GRID_YZ))
    rows = cdiv(R, S)
    return RowsPlan(TC, CT, cdiv(R, rows), rows)


def chunk_splits(A, C, U):
    units = A * U
    return max(1, min(cdiv(units, MIN_UNITS_PER_THREAD * CHUNK_THREADS),
                      cdiv(TARGET_BLOCKS, C), MAX_GRID_YZ))


class Rows:
    """x as (O, R, K) rows with W columns per statistic group, and its kernels.

    ``prefix`` names the family's instances (``batch_norm_fwd_f32`` ...);
    ``arrays`` are every (O, R, K) array of the call, for the alignment test.
    """

    def __init__(self, dev, module, tag, O, R, K, W, arrays):
        if O > MAX_GRID_YZ:
            raise ValueError(f"{O} outer slices exceed the rows kernels' limit of {MAX_GRID_YZ}")
        self.dev, self.module, self.tag = dev, module, tag
        self.O, self.R, self.K, self.W = O, R, K, W
        self.vec = vec_ok(dev, K, VEC[tag], arrays)
        self.nv = VEC[tag] if self.vec else 1
        self.plan = rows_plan(O, R, K, self.nv)
        self.S = self.plan.S
        self.grid = (self.plan.CT, self.plan.S, O)
        self.shift = (R * K, W)  # a group's shift: x[o * R * K + g * W]

    def _geometry(self):
        p = self.plan
        return (np.int32(p.rows_per_split), np.int32(p.TC), np.int32(self.vec))

    def stats(self, name, x, P):
        """Partials (3, O, S, K) of P: per column and split, (n, mean - k, M2)."""
        P = np.dtype(P)
        part = self.dev.empty((3, self.O, self.S, self.K), P)
        self.dev.launch(self.module, f"{name}_rows", self.grid, ROWS_THREADS,
                        (x, part, np.int32(self.R), np.int32(self.K), np.int32(self.W),
                         *self._geometry()),
                        shared_mem=(2 * self.nv + 1) * ROWS_THREADS * P.itemsize)
        return part

    def reduce(self, name, dy, x, y, center, P):
        """Partials (2, O, S, K) of P: sum(dz), sum(dz * (x - center))."""
        P = np.dtype(P)
        part = self.dev.empty((2, self.O, self.S, self.K), P)
        self.dev.launch(self.module, f"{name}_rows", self.grid, ROWS_THREADS,
                        (dy, x, y, center, part, np.int32(self.R), np.int32(self.K),
                         np.int32(self.W), *self._geometry()),
                        shared_mem=2 * self.nv * ROWS_THREADS * P.itemsize)
        return part

    def apply(self, name, x, coef, y, relu):
        p = self.plan
        self.dev.launch(self.module, f"{name}_rows", self.grid, ROWS_THREADS,
                        (x, coef, y, np.int32(self.R), np.int32(self.K),
                         np.int32(p.rows_per_split), np.int32(p.TC), np.int32(relu),
                         np.int32(self.vec)))

    def bwd_apply(self, name, dy, x, y, coef, dx):
        self.dev.launch(self.module, f"{name}_rows", self.grid, ROWS_THREADS,
                        (dy, x, y, coef, dx, np.int32(self.R), np.int32(self.K),
                         *self._geometry()))


class Chunks:
    """x as (A, C, B), each channel A chunks of B contiguous elements (batch norm)."""

    def __init__(self, dev, module, tag, A, C, B, arrays):
        self.dev, self.module, self.tag = dev, module, tag
        self.A, self.C, self.B = A, C, B
        self.vec = vec_ok(dev, B, VEC[tag], arrays)
        nv = VEC[tag] if self.vec else 1
        if A * (B // nv) >= 2**31:
            raise ValueError(f"a channel of {A * B} elements exceeds the kernels' 2**31 units")
        self.O, self.K, self.W = 1, C, 1
        self.S = chunk_splits(A, C, B // nv)
        self.grid = (C, self.S)
        self.shift = (0, B)  # channel c's shift: x[c * B]

    def _sizes(self):
        return (np.int32(self.A), np.int32(self.C), np.int32(self.B))

    def stats(self, name, x, P):
        part = self.dev.empty((3, 1, self.S, self.C), P)
        self.dev.launch(self.module, f"{name}_chunks", self.grid, CHUNK_THREADS,
                        (x, part, *self._sizes(), np.int32(self.vec)))
        return part

    def reduce(self, name, dy, x, y, center, P):
        part = self.dev.empty((2, 1, self.S, self.C), P)
        self.dev.launch(self.module, f"{name}_chunks", self.grid, CHUNK_THREADS,
                        (dy, x, y, center, part, *self._sizes(), np.int32(self.vec)))
        return part

    def apply(self, name, x, coef, y, relu):
        self.dev.launch(self.module, f"{name}_chunks", self.grid, CHUNK_THREADS,
                        (x, coef, y, *self._sizes(), np.int32(relu), np.int32(self.vec)))

    def bwd_apply(self, name, dy, x, y, coef, dx):
        self.dev.launch(self.module, f"{name}_chunks", self.grid, CHUNK_THREADS,
                        (dy, x, y, coef, dx, *self._sizes(), np.int32(self.vec)))


def merge_stats(view, name, x, part, count, mean, m2):
    """Per statistic group (O * K / W of them): count, mean, M2 in float64, into
    the given contiguous float64 arrays."""
    groups = view.O * (view.K // view.W)
    view.dev.launch(view.module, f"{name}_merge", cdiv(groups, MERGE_THREADS // 32),
                    MERGE_THREADS,
                    (x, part, np.int32(view.O), np.int32(view.S), np.int32(view.K),
                     np.int32(view.W), np.int64(view.shift[0]), np.int32(view.shift[1]),
                     count, mean, m2))


def fwd_coef(view, name, count, mean, stat, training, weight, bias, eps, per_column,
             mean_out, rstd_out, var_out, coef):
    """Per-column (mean, scale, shift) from merged statistics (training) or from
    the given mean and rstd (inference, ``stat`` = rstd)."""
    G = view.K // view.W
    total = view.O * view.K
    view.dev.launch(view.module, f"{name}_coef", cdiv(total, COEF_THREADS), COEF_THREADS,
                    (count, mean, stat, np.int32(training), weight, bias, np.float64(eps),
                     np.int32(view.O), np.int32(G), np.int32(view.W), np.int32(per_column),
                     mean_out, rstd_out, var_out, coef))
