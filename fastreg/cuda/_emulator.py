"""Host emulation of the CUDA kernels: g++ builds, ctypes launches.

``library("norm")`` compiles ``kernels/emu/cuda_emu.h`` + the inlined
``kernels/norm.cu`` (``_source.emulator_source``) into a shared library with
``g++ -O2 -shared -fPIC -pthread`` on first use and caches it under
``$FASTREG_EMU_CACHE`` (default ``~/.cache/fastreg/emu``), keyed by a hash of
the final source, the compiler's identity and the flags. Nothing compiles at
import time.

Each ``extern "C"`` kernel ``name`` comes with ``fastreg_launch_<name>``
(grid, block, dynamic shared bytes, ``void**`` arguments: cuLaunchKernel's
convention) and ``fastreg_signature_<name>`` (one character per parameter),
against which every launch checks its arguments, so the argument lists the
launchers build are checked here exactly as CuPy would receive them.

Scheduling (see the header): fibers by default, real threads with
``FASTREG_EMU_MODE=threads`` or :func:`set_mode`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

import numpy as np

from . import _source

FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-pthread",
         # the kernels reinterpret 16-byte vectors (uint4) as rows of T, as on the GPU
         "-fno-strict-aliasing", "-Wno-unknown-pragmas",
         # IEEE rounding of every operation (no a * b + c fused), as __fmul_rn & co. on the GPU
         "-ffp-contract=off")
MODES = {"fibers": 0, "threads": 1}

_CODES = {np.dtype(np.int32): "i", np.dtype(np.uint32): "I", np.dtype(np.int64): "l",
          np.dtype(np.uint64): "L", np.dtype(np.float32): "f", np.dtype(np.float64): "d"}
_CTYPES = {"i": ctypes.c_int32, "I": ctypes.c_uint32, "l": ctypes.c_int64,
           "L": ctypes.c_uint64, "f": ctypes.c_float, "d": ctypes.c_double}
_build_lock = threading.Lock()
_mode = os.environ.get("FASTREG_EMU_MODE", "fibers")


class EmulatorError(RuntimeError):
    """A kernel misbehaved under the emulation (deadlock, divergent collective, bad launch)."""


class EmulatorBuildError(RuntimeError):
    """The C++ compiler rejected a module's host-emulation source."""


def compiler():
    """The C++ compiler used (``$CXX`` or g++), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


@functools.lru_cache(maxsize=None)
def _compiler_identity(cxx):
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def cache_dir() -> pathlib.Path:
    env = os.environ.get("FASTREG_EMU_CACHE")
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fastreg" / "emu"


def build(source: str, name: str = "module") -> pathlib.Path:
    """Compile ``source`` into a shared library (cached); returns its path."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("the CUDA host emulation needs a C++ compiler (g++ or $CXX); "
                           "none was found on PATH")
    key = hashlib.sha256("\0".join([_compiler_identity(cxx), *FLAGS, source]).encode())
    directory = cache_dir()
    path = directory / f"{name}-{key.hexdigest()[:24]}.so"
    with _build_lock:
        if path.exists():
            return path
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            cpp = pathlib.Path(tmp) / f"{name}.cpp"
            cpp.write_text(source)
            so = pathlib.Path(tmp) / f"{name}.so"
            proc = subprocess.run([cxx, *FLAGS, str(cpp), "-o", str(so)], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                raise EmulatorBuildError(f"compiling the host emulation of {name} failed:\n"
                                   f"{proc.stderr[-8000:]}")
            os.replace(so, path)  # atomic: concurrent builders race harmlessly
    return path


class Library:
    """A compiled module: launch its kernels on NumPy arrays."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        self._lib.fastreg_emu_last_error.restype = ctypes.c_char_p
        self._lib.fastreg_emu_set_mode.argtypes = [ctypes.c_int]
        self._kernels = {}
        self.set_mode(_mode)

    def set_mode(self, mode):
        if mode not in MODES:
            raise ValueError(f"emulation mode must be one of {sorted(MODES)}, got {mode!r}")
        self._lib.fastreg_emu_set_mode(MODES[mode])

    def set_barrier_timeout(self, seconds):
        """Threads mode: how long a barrier waits before reporting a deadlock."""
        f = self._lib.fastreg_emu_set_barrier_timeout
        f.argtypes = [ctypes.c_double]
        f(float(seconds))

    def signature(self, kernel):
        return self._kernel(kernel)[1]

    def _kernel(self, kernel):
        k = self._kernels.get(kernel)
        if k is None:
            try:
                launch = getattr(self._lib, f"fastreg_launch_{kernel}")
                sig = getattr(self._lib, f"fastreg_signature_{kernel}")
            except AttributeError:
                raise LookupError(f"kernel {kernel!r} is not in {self.path.name}") from None
            launch.restype = ctypes.c_int
            launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                               ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_void_p)]
            sig.restype = ctypes.c_char_p
            k = self._kernels[kernel] = (launch, sig().decode())
        return k

    def launch(self, kernel, grid, block, args, shared_mem=0):
        """Run ``kernel<<<grid, block, shared_mem>>>(*args)``.

        args: NumPy arrays (passed as pointers to their data), None (a null
        pointer) and NumPy scalars of the kernel's parameter types
        (np.int32, np.float32, ...), checked against the kernel's signature.
        """
        fn, sig = self._kernel(kernel)
        if len(args) != len(sig):
            raise TypeError(f"{kernel} takes {len(sig)} arguments, got {len(args)}")
        holders = []
        for i, (a, code) in enumerate(zip(args, sig)):
            if code == "p":
                if a is None:
                    holders.append(ctypes.c_void_p(None))
                elif isinstance(a, np.ndarray):
                    if not a.flags.c_contiguous:  # as a device pointer: the data, in C order
                        raise ValueError(f"{kernel} argument {i}: arrays must be C-contiguous")
                    holders.append(ctypes.c_void_p(a.ctypes.data))
                else:
                    raise TypeError(f"{kernel} argument {i}: expected an array or None, "
                                    f"got {type(a).__name__}")
            else:
                got = _CODES.get(getattr(a, "dtype", None)) if isinstance(a, np.generic) else None
                if got != code:
                    raise TypeError(f"{kernel} argument {i}: expected a NumPy scalar of type "
                                    f"code {code!r}, got {type(a).__name__}")
                holders.append(_CTYPES[code](a.item()))
        argv = (ctypes.c_void_p * max(1, len(holders)))(
            *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        g = (ctypes.c_uint * 3)(*_dim3(grid))
        b = (ctypes.c_uint * 3)(*_dim3(block))
        if fn(g, b, int(shared_mem), argv) != 0:
            raise EmulatorError(f"{kernel}: {self._lib.fastreg_emu_last_error().decode()}")


def _dim3(v):
    v = tuple(int(e) for e in (v if isinstance(v, (tuple, list)) else (v,)))
    return v + (1,) * (3 - len(v))


_libraries = {}


def library(module: str, directory=None) -> Library:
    """The emulation library of ``kernels/<module>.cu`` (built on first use)."""
    key = (module, None if directory is None else str(directory))
    lib = _libraries.get(key)
    if lib is None:
        path = build(_source.emulator_source(module, directory), module)
        with _build_lock:
            lib = _libraries.setdefault(key, Library(path))
    return lib


def set_mode(mode):
    """Fibers or real threads for every library loaded now or later."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"emulation mode must be one of {sorted(MODES)}, got {mode!r}")
    _mode = mode
    for lib in list(_libraries.values()):
        lib.set_mode(mode)
