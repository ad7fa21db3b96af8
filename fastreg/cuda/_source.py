"""Finding the CUDA sources and building the strings that get compiled.

Where: an installed wheel carries the sources as ``fastreg/_kernels``
(hatch force-include of the repo's ``kernels/``); a source checkout or an
editable install has them in the repo's ``kernels/``. The installed copy
comes first: an editable install leaves a stale copy in site-packages that
Python never imports, and in that case ``importlib.resources`` points into the
checkout, where ``fastreg/_kernels`` does not exist.

What: ``module_source("norm")`` is ``kernels/norm.cu`` with every
``#include "<file>"`` of our own headers (``common.cuh``, ``philox.cuh``)
replaced by the header's text, framed by ``#line`` markers with relative
names (``fastreg/kernels/common.cuh``). No ``-I`` for our headers: CuPy's
disk-cache key hashes the source string and the options, not headers found
through include paths, so inlining makes an edited header recompile, and
relative names keep the key independent of the install location.
System headers (``<cuda_fp16.h>``) stay includes: CuPy adds the toolkit's
include directory itself.

Compiler options (``OPTIONS``) are what the loader passes to
``cupy.RawModule``. CuPy adds ``-ftz=true`` and the device's architecture;
``nvrtc_options`` spells out the whole list, which the compile checks use.

Flush to zero: CuPy appends ``-ftz=true`` after the caller's options, for
every kernel it compiles, so float32 denormals are flushed in arithmetic on
the GPU (float64, and the float -> half/bfloat16 conversions, are not
affected). We keep it rather than patch CuPy's compiler: results change only
for values below 1.2e-38, where every output here differs from the reference
by far less than the float32 tolerances; the one visible effect is that a
denormal ``eps`` (< 1.2e-38) acts as 0 on the GPU. The host emulation keeps
IEEE denormals; tests/test_cuda_norm.py checks denormal inputs against the
reference within tolerance.
"""

from __future__ import annotations

import importlib.resources
import pathlib
import re

# Options given to cupy.RawModule. C++17 is NVRTC 12/13's default; named so the
# cache key does not depend on a future default.
OPTIONS = ("--std=c++17",)
# What CuPy appends to OPTIONS before calling NVRTC (cupy/cuda/compiler.py).
CUPY_ADDED_OPTIONS = ("-ftz=true",)

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.M)


def kernel_dir() -> pathlib.Path:
    """The directory holding the kernels' sources (installed copy first)."""
    installed = importlib.resources.files("fastreg") / "_kernels"
    if installed.is_dir():
        return pathlib.Path(str(installed))
    checkout = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("fastreg's CUDA sources were not found: looked in "
                            f"{installed} and {checkout}; reinstall fastreg.")


def _inline(name, directory, seen):
    """The text of ``name`` with our includes inlined once each, with #line markers.
    Includes are looked up beside ``name``, then in :func:`kernel_dir`."""
    path = directory / name
    text = _PRAGMA_ONCE.sub("", path.read_text())
    out, pos, line = [f'#line 1 "fastreg/kernels/{name}"\n'], 0, 1
    for m in _INCLUDE.finditer(text):
        inc = m.group(1)
        where = next((d for d in (path.parent, kernel_dir()) if (d / inc).is_file()), None)
        if where is None:
            raise FileNotFoundError(f"{name} includes \"{inc}\", found neither beside it nor "
                                    f"in {kernel_dir()}")
        out.append(text[pos:m.start()])
        line += text.count("\n", pos, m.start())
        if inc not in seen:
            seen.add(inc)
            out.append(_inline(inc, where, seen))
            # the rest of the include line keeps its number; the next line is line + 1
            out.append(f'\n#line {line} "fastreg/kernels/{name}"')
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def module_source(module: str, directory: pathlib.Path | None = None) -> str:
    """The source string of ``kernels/<module>.cu`` with our headers inlined."""
    directory = kernel_dir() if directory is None else pathlib.Path(directory)
    return _inline(f"{module}.cu", directory, set())


def emulator_source(module: str, directory: pathlib.Path | None = None) -> str:
    """The host-emulation source: kernels/emu/cuda_emu.h, then the module's source."""
    directory = kernel_dir() if directory is None else pathlib.Path(directory)
    header = _inline("emu/cuda_emu.h", kernel_dir(), set())
    return header + "\n" + module_source(module, directory)


def nvrtc_options(arch: str = "sm_90", include_dirs=()) -> tuple:
    """The options NVRTC sees when CuPy compiles a module for ``arch``
    (plus the toolkit include directories CuPy would add)."""
    return (OPTIONS + CUPY_ADDED_OPTIONS + (f"--gpu-architecture={arch}",)
            + tuple(f"-I{d}" for d in include_dirs))
