"""NVRTC through ctypes, for the compile checks (no driver or GPU needed).

libnvrtc comes from the ``nvidia-cuda-nvrtc`` wheel (the test extra), a CUDA
toolkit, or the library path; the CUDA headers (cuda_fp16.h, cuda_bf16.h)
from ``$CUDA_PATH`` or the toolkit next to nvcc, as CuPy finds them.
"""

import ctypes
import ctypes.util
import glob
import os
import pathlib
import shutil


def find_library():
    """Path of libnvrtc, or None."""
    candidates = []
    try:
        import nvidia
        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so*")))
            candidates += sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for home in _cuda_homes():
        candidates += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for c in candidates:
        if "builtins" in os.path.basename(c) or "alt" in os.path.basename(c):
            continue
        try:
            ctypes.CDLL(c)
            return c
        except OSError:
            continue
    return None


def _cuda_homes():
    homes = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    homes.append(str(pathlib.Path(nvcc).resolve().parent.parent))
    homes.append("/usr/local/cuda")
    return [h for h in homes if h and os.path.isdir(h)]


def find_include():
    """A CUDA include directory holding cuda_fp16.h, or None."""
    for home in _cuda_homes():
        inc = os.path.join(home, "include")
        if os.path.isfile(os.path.join(inc, "cuda_fp16.h")):
            return inc
    return None


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in _cuda_homes():
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


class CompileError(RuntimeError):
    pass


def compile_source(library, source, name, options):
    """Compile with NVRTC; returns (cubin bytes, log text)."""
    lib = ctypes.CDLL(library)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None):
        raise CompileError("nvrtcCreateProgram failed")
    try:
        opts = [o.encode() for o in options]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if status:
            raise CompileError(f"NVRTC failed ({status}):\n{log[-6000:]}")
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def version(library):
    lib = ctypes.CDLL(library)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def ptxas_report(log):
    """{kernel: {"registers", "stack", "spill_stores", "spill_loads"}} from ptxas -v output."""
    import re
    parts = re.split(r"Compiling entry function '(\w+)' for '\w+'", log)
    report = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads", body)
        regs = re.search(r"Used (\d+) registers", body)
        report[name] = {"registers": int(regs.group(1)) if regs else None,
                        "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
                        "spill_loads": int(frame.group(3))}
    return report
