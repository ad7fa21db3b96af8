"""Helpers shared by the Numba kernels: JIT options and host-side shaping.

Determinism: every kernel reduces in an order fixed by the shapes alone.
Per-row statistics are computed by one thread in index order; reductions
across rows (dweight, dbias, batch statistics) go through per-block partials,
where the blocks are fixed by the shape (never by the thread count) and the
partials are summed in block order.

Floating point: kernels use ``fastmath={"reassoc", "contract"}`` so that LLVM
can vectorize the float64 accumulations; the order it picks is fixed at
compile time, so results are still identical run to run and at any thread
count. NaN and Inf keep IEEE semantics (no ``nnan``/``ninf``).

Caching: ``cache=True`` unless ``FASTREG_NUMBA_CACHE=0``. Numba does not see
edits to helpers in other files, so kernels do not call across modules.
"""

import math
import os

import numba
import numpy as np

CACHE = os.environ.get("FASTREG_NUMBA_CACHE", "1") != "0"
FASTMATH = {"reassoc", "contract"}
JIT = dict(nogil=True, cache=CACHE, fastmath=FASTMATH, error_model="numpy")
PARALLEL_JIT = dict(JIT, parallel=True)

# Cross-row reductions split the rows into at most this many fixed blocks.
REDUCE_BLOCKS = 32


def block_rows(M, blocks=REDUCE_BLOCKS):
    """Rows per block and block count for a fixed partition of M rows."""
    rows = max(1, -(-M // blocks))
    return rows, max(1, -(-M // rows)) if M else 0


@numba.njit(nogil=True, cache=CACHE, parallel=True)
def _sum_rows_in_order(part, out):
    """out[j] = sum over rows b of part[b, j], in row order (no reassociation)."""
    nb, D = part.shape
    for j in numba.prange(D):
        s = 0.0
        for blk in range(nb):
            s += part[blk, j]
        out[j] = s


def reduce_blocks(part, out):
    """Sum per-block partials (blocks, n) into ``out`` (n elements, any layout) in
    block order; with no blocks, out is zeroed. ``out`` None is skipped."""
    if out is None:
        return
    t = target(out)
    _sum_rows_in_order(part, t.reshape(-1))
    finish(out, t)


def contiguous(a):
    """a itself when C-contiguous, else a C-contiguous copy (inputs only)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def target(out):
    """Where a kernel may write ``out``: itself if C-contiguous, else a temporary."""
    return out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)


def finish(out, t):
    """Copy a temporary from :func:`target` back into ``out``."""
    if t is not out:
        out[...] = t


def param(a, n, dtype, fill):
    """A weight/bias as a contiguous 1-D array; ``fill`` where it is absent."""
    if a is None:
        return np.full(n, fill, dtype)
    return contiguous(a).reshape(n)


def layout_order(x, keep_first=False):
    """The axis order in which ``x`` is a C-contiguous block, or None.

    NHWC storage behind an NCHW shape (PyTorch's channels_last) gives
    (0, 2, 3, 1); a C-contiguous array gives the identity. ``keep_first``
    requires the sample axis to stay outermost (group norm needs it).
    """
    if x.flags.c_contiguous:
        return tuple(range(x.ndim))
    order = tuple(sorted(range(x.ndim), key=lambda k: (-abs(x.strides[k]), k)))
    if x.transpose(order).flags.c_contiguous and not (keep_first and order[0] != 0):
        return order
    return None


class ChannelLayout:
    """Views of same-shaped arrays as (A, C, B) around the channel axis.

    A is the product of the axes stored before the channel axis, B of those
    after it: NCHW gives (N, C, H*W), NHWC gives (N*H*W, C, 1). Arrays stored
    in x's axis order are viewed without copying; others are copied (inputs)
    or written through a temporary (outputs, see :meth:`finish`).
    """

    def __init__(self, x, axis, keep_first=False):
        order = layout_order(x, keep_first)
        self.order = order if order is not None else tuple(range(x.ndim))
        shape = tuple(x.shape[k] for k in self.order)
        pos = self.order.index(axis)
        self.shape3 = (int(math.prod(shape[:pos])), shape[pos], int(math.prod(shape[pos + 1:])))

    def input(self, a):
        t = a.transpose(self.order)
        return (t if t.flags.c_contiguous else np.ascontiguousarray(t)).reshape(self.shape3)

    def output(self, out):
        t = out.transpose(self.order)
        if t.flags.c_contiguous:
            return t.reshape(self.shape3)
        return np.empty(self.shape3, out.dtype)

    def finish(self, out, view):
        t = out.transpose(self.order)
        if not np.may_share_memory(t, view):
            t[...] = view.reshape(t.shape)
