"""Where the launchers' kernels run: a CUDA device through CuPy, or the host emulation.

The launchers (``norm.py``) compute grid sizes, allocate partial buffers and
chain second passes once, against this small interface; ``of(array)`` picks
the device from the arrays' library:

- ``CupyDevice``: CuPy arrays. One ``cupy.RawModule`` per (device, module),
  built from ``_source.module_source`` with ``_source.OPTIONS`` and memoized;
  CuPy compiles it on the first ``get_function`` and keeps the cubin in its
  on-disk cache. Kernels go to the current stream; nothing synchronizes.
- ``EmulatedDevice``: NumPy arrays, run by ``_emulator`` on the host.

Launch limits are checked here for both (block <= 1024 threads, grid.y/z <=
65535, dynamic shared memory <= 48 KiB, the limit without opt-in), so a
launch the GPU would refuse fails under the emulation too.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import _backend
from . import _emulator, _source

MAX_THREADS = 1024
MAX_DYNAMIC_SHARED = 48 * 1024


def _dim3(v, what):
    v = tuple(int(e) for e in (v if isinstance(v, (tuple, list)) else (v,)))
    v = v + (1,) * (3 - len(v))
    if len(v) != 3 or min(v) < 1:
        raise ValueError(f"{what} must have 1 to 3 positive sizes, got {v}")
    return v


def check_launch(kernel, grid, block, shared_mem):
    grid, block = _dim3(grid, "grid"), _dim3(block, "block")
    if block[0] * block[1] * block[2] > MAX_THREADS:
        raise ValueError(f"{kernel}: block {block} has more than {MAX_THREADS} threads")
    if grid[0] >= 2**31 or grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(f"{kernel}: grid {grid} exceeds the CUDA limits")
    if not 0 <= shared_mem <= MAX_DYNAMIC_SHARED:
        raise ValueError(f"{kernel}: {shared_mem} bytes of dynamic shared memory "
                         f"(at most {MAX_DYNAMIC_SHARED})")
    return grid, block


class Device:
    """The interface the launchers use."""

    xp = np

    def launch(self, module, kernel, grid, block, args, shared_mem=0):
        raise NotImplementedError

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def contiguous(self, a):
        """a itself when C-contiguous, else a C-contiguous copy (inputs only)."""
        return a if a.flags.c_contiguous else self.xp.ascontiguousarray(a)

    def target(self, out):
        """Where a kernel may write ``out``: itself if C-contiguous, else a temporary."""
        return out if out.flags.c_contiguous else self.empty(out.shape, out.dtype)

    @staticmethod
    def finish(out, t):
        """Copy a temporary from :meth:`target` back into ``out``."""
        if t is not out:
            out[...] = t

    def address(self, a):
        raise NotImplementedError


class EmulatedDevice(Device):
    name = "host emulation"

    def launch(self, module, kernel, grid, block, args, shared_mem=0):
        grid, block = check_launch(kernel, grid, block, shared_mem)
        _emulator.library(module).launch(kernel, grid, block, args, shared_mem)

    def address(self, a):
        return a.ctypes.data


class CupyDevice(Device):
    name = "cuda"

    def __init__(self):
        import cupy
        self.xp = cupy
        self._modules = {}
        self._functions = {}
        self._lock = threading.Lock()

    def _function(self, module, kernel):
        dev = self.xp.cuda.runtime.getDevice()
        key = (dev, module, kernel)
        fn = self._functions.get(key)
        if fn is None:
            with self._lock:
                mod = self._modules.get((dev, module))
                if mod is None:
                    mod = self._modules[(dev, module)] = self.xp.RawModule(
                        code=_source.module_source(module), options=_source.OPTIONS)
                fn = self._functions[key] = mod.get_function(kernel)
        return fn

    def launch(self, module, kernel, grid, block, args, shared_mem=0):
        grid, block = check_launch(kernel, grid, block, shared_mem)
        # a null pointer is 8 zero bytes; CuPy passes NumPy scalars by value
        args = tuple(np.uint64(0) if a is None else a for a in args)
        self._function(module, kernel)(grid, block, args, shared_mem=shared_mem)

    def address(self, a):
        return a.data.ptr


_EMULATED = EmulatedDevice()
_cupy_device = None


def of(array) -> Device:
    """The device that runs kernels on ``array`` (CuPy -> CUDA, NumPy -> emulation)."""
    global _cupy_device
    if _backend.array_kind(array) == "cupy":
        if _cupy_device is None:
            _cupy_device = CupyDevice()
        return _cupy_device
    return _EMULATED
