"""Channel layouts for the CUDA launchers: views of arrays as (A, C, B).

The twin of ``fastreg/cpu/_common.py``'s ``layout_order`` and
``ChannelLayout`` (kept apart because that module imports Numba, which the
CUDA backend does not need), for NumPy and CuPy arrays alike: arrays stored
in x's axis order are viewed without copying, others are copied (inputs)
or written through a temporary (outputs).

A is the product of the axes stored before the channel axis, B of those
after it: NCHW gives (N, C, H*W), NHWC and channels_last storage behind an
NCHW shape give (N*H*W, C, 1), (N, C) gives (N, C, 1).
"""

from __future__ import annotations

import math


def layout_order(x, keep_first=False):
    """The axis order in which ``x`` is a C-contiguous block, or None.

    ``keep_first`` requires the sample axis to stay outermost (group norm).
    """
    if x.flags.c_contiguous:
        return tuple(range(x.ndim))
    order = tuple(sorted(range(x.ndim), key=lambda k: (-abs(x.strides[k]), k)))
    if x.transpose(order).flags.c_contiguous and not (keep_first and order[0] != 0):
        return order
    return None


class ChannelLayout:
    """Views of arrays shaped like ``x`` as (A, C, B) around ``axis``, on ``dev``."""

    def __init__(self, dev, x, axis, keep_first=False):
        self.dev = dev
        order = layout_order(x, keep_first)
        self.order = order if order is not None else tuple(range(x.ndim))
        shape = tuple(x.shape[k] for k in self.order)
        pos = self.order.index(axis)
        self.shape3 = (math.prod(shape[:pos]), shape[pos], math.prod(shape[pos + 1:]))

    def input(self, a):
        """``a`` as a C-contiguous (A, C, B) array (a view when its storage allows)."""
        return self.dev.contiguous(a.transpose(self.order)).reshape(self.shape3)

    def output(self, out):
        """Where a kernel may write ``out`` as (A, C, B): a view of it, or a temporary."""
        t = out.transpose(self.order)
        if t.flags.c_contiguous:
            return t.reshape(self.shape3)
        return self.dev.empty(self.shape3, out.dtype)

    def finish(self, out, view):
        """Copy a temporary from :meth:`output` back into ``out``."""
        t = out.transpose(self.order)
        if not t.flags.c_contiguous:
            t[...] = view.reshape(t.shape)
