"""The CUDA sources ship in the wheel and the loader finds them.

``kernels/`` goes into the wheel as ``fastreg/_kernels`` (hatch
force-include); ``kernel_dir()`` prefers that installed copy and falls back
to the checkout's ``kernels/``.
"""

import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

from fastreg.cuda import _source

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_PY = sorted((ROOT / "fastreg" / "cuda").glob("*.py"))


def _named_modules():
    """Kernel modules the launchers name (``MODULE = "norm"``)."""
    names = set()
    for path in CUDA_PY:
        names |= set(re.findall(r'^MODULE = "(\w+)"', path.read_text(), re.M))
    return sorted(names)


def _needed_files(directory):
    """Each named module's .cu, the headers it includes, and the emulation header."""
    files = {"emu/cuda_emu.h"}
    for module in _named_modules():
        files.add(f"{module}.cu")
        files |= set(re.findall(r'#line 1 "fastreg/kernels/([^"]+)"',
                                _source.module_source(module, directory)))
    return sorted(files)


def test_kernel_dir_holds_every_file_the_launchers_name():
    assert _named_modules() == ["batch_norm", "dropout", "group_norm", "norm", "prox"]
    directory = _source.kernel_dir()
    for name in _needed_files(directory):
        assert (directory / name).is_file(), f"{name} missing from {directory}"


def test_checkout_uses_the_repo_kernels():
    assert _source.kernel_dir() == ROOT / "kernels"


@pytest.mark.slow
def test_wheel_contains_the_kernels_and_the_installed_copy_wins(tmp_path, monkeypatch):
    hatchling_build = pytest.importorskip("hatchling.build", reason="hatchling not installed")
    monkeypatch.chdir(ROOT)
    wheel = tmp_path / hatchling_build.build_wheel(str(tmp_path))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for f in _needed_files(ROOT / "kernels"):
            assert f"fastreg/_kernels/{f}" in names, f"{f} is not in {wheel.name}"
        site = tmp_path / "site"
        zf.extractall(site)
    # an installed wheel resolves its own copy, and builds the same source string
    code = ("from fastreg.cuda import _source; print(_source.kernel_dir()); "
            "import hashlib; print(hashlib.sha256(_source.module_source('norm').encode())"
            ".hexdigest())")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout.split()
    assert pathlib.Path(out[0]) == site / "fastreg" / "_kernels"
    import hashlib
    assert out[1] == hashlib.sha256(_source.module_source("norm").encode()).hexdigest(), \
        "the source string (CuPy's cache key) must not depend on the install location"
