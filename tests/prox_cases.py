"""Inputs for the prox-family tests: arrays placed inside larger guarded buffers.

``place(rng, shape, dtype, layout)`` puts an array in a buffer filled with a
sentinel, so a test can check afterwards that an in-place update touched only
the elements it owns (``Placed.untouched()``). Layouts:

- "contig":     C-contiguous, with guard elements before and after
- "strided":    every other element of the last axis (the others are guards)
- "transposed": Fortran order (a transposed C-contiguous buffer), no guards
"""

import numpy as np

SENTINEL = 7.25
LAYOUTS = ("contig", "strided", "transposed")


class Placed:
    def __init__(self, buf, owned, a):
        self.buf, self.owned, self.a = buf, owned, a
        self.guard = buf[~owned].copy()

    def untouched(self):
        """True when every element outside the array still holds its sentinel."""
        return np.array_equal(self.buf[~self.owned], self.guard)


def place(rng, shape, dtype, layout="contig", values=None):
    """An array of ``shape`` and ``dtype`` laid out as ``layout`` inside a guarded buffer,
    holding ``values`` (default: standard normal draws)."""
    shape = tuple(shape)
    if len(shape) == 0 or layout == "contig":
        n = int(np.prod(shape))
        buf = np.full(n + 6, SENTINEL, dtype)
        owned = np.zeros(buf.shape, bool)
        view = lambda b: b[3:3 + n].reshape(shape)
    elif layout == "strided":
        buf = np.full((*shape[:-1], 2 * shape[-1]), SENTINEL, dtype)
        owned = np.zeros(buf.shape, bool)
        view = lambda b: b[..., ::2]
    elif layout == "transposed":
        buf = np.full(shape[::-1], SENTINEL, dtype)
        owned = np.zeros(buf.shape, bool)
        view = lambda b: b.T
    else:
        raise ValueError(layout)
    view(owned)[...] = True
    a = view(buf)
    a[...] = rng.standard_normal(shape) if values is None else values
    return Placed(buf, owned, a)


def clone(placed, layout):
    """A fresh placed array with the same values (and the given layout)."""
    return place(np.random.default_rng(0), placed.a.shape, placed.a.dtype, layout,
                 values=placed.a)
