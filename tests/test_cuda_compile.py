"""Every CUDA kernel instance compiles for sm_90, without spills or local memory.

NVRTC (the compiler CuPy drives) gets exactly the options CuPy will pass:
the loader's ``_source.OPTIONS``, CuPy's ``-ftz=true`` and the architecture,
plus the toolkit's include directory (as CuPy adds it) and ``-Xptxas -v``
for the register report. nvcc compiles the same source string with
``-arch=sm_90 -Xptxas -v`` as a second opinion. Each check skips, with the
reason, where its compiler or the CUDA headers are missing.
"""

import pathlib
import re
import subprocess

import pytest

import _nvrtc
from fastreg.cuda import _batch_norm, _group_norm, _source
from fastreg.cuda import dropout as cuda_dropout
from fastreg.cuda import norm as cuda_norm
from fastreg.cuda import prox as cuda_prox

pytestmark = pytest.mark.gpu

HERE = pathlib.Path(__file__).resolve().parent
ARCH = "sm_90"
# kernel module -> the launcher module that names its kernels
MODULES = {"norm": cuda_norm, "batch_norm": _batch_norm, "group_norm": _group_norm,
           "prox": cuda_prox, "dropout": cuda_dropout}


@pytest.fixture(scope="module")
def nvrtc():
    lib = _nvrtc.find_library()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or a CUDA toolkit)")
    include = _nvrtc.find_include()
    if include is None:
        pytest.skip("CUDA headers (cuda_fp16.h) not found: set CUDA_PATH")
    return lib, include


@pytest.fixture(scope="module", params=sorted(MODULES))
def nvrtc_module(request, nvrtc):
    """(module name, cubin, log, ptxas report) of each kernel module."""
    lib, include = nvrtc
    options = _source.nvrtc_options(ARCH, [include]) + ("--ptxas-options=-v",)
    name = request.param
    cubin, log = _nvrtc.compile_source(lib, _source.module_source(name), f"{name}.cu", options)
    return name, cubin, log, _nvrtc.ptxas_report(log)


def test_loader_options_are_what_cupy_is_given():
    assert _source.nvrtc_options(ARCH)[:len(_source.OPTIONS)] == _source.OPTIONS
    assert "-ftz=true" in _source.nvrtc_options(ARCH)
    assert not any(o.startswith("-I") for o in _source.OPTIONS), \
        "our headers are inlined: include paths are not part of CuPy's cache key"


def test_every_instance_compiles_with_nvrtc(nvrtc_module):
    module, cubin, log, report = nvrtc_module
    names = MODULES[module].kernel_names()
    missing = [n for n in names if f"{n}\0".encode() not in cubin]
    assert not missing, f"{module}: kernels the launchers name but the cubin lacks: {missing}"
    assert sorted(report) == sorted(names), f"{module} holds kernels no launcher names"
    assert "warning" not in log.lower(), log


def test_nvrtc_build_has_no_spills_or_local_memory(nvrtc_module):
    module, _, _, report = nvrtc_module
    bad = {k: v for k, v in report.items() if v["stack"] or v["spill_stores"] or v["spill_loads"]}
    assert not bad, f"{module}: spills or stack frames: {bad}"


def test_emulator_check_kernels_are_valid_cuda(nvrtc):
    """The kernels tests/test_cuda_emulator.py runs compile for the GPU too."""
    lib, include = nvrtc
    source = _source.module_source("emu_checks", HERE / "kernels")
    cubin, _ = _nvrtc.compile_source(lib, source, "emu_checks.cu",
                                     _source.nvrtc_options(ARCH, [include]))
    assert b"block_moments\0" in cubin


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(MODULES))
def test_nvcc_reports_no_spills_in_the_hot_kernels(module, tmp_path):
    nvcc = _nvrtc.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = tmp_path / f"{module}.cu"
    src.write_text(_source.module_source(module))
    proc = subprocess.run([nvcc, f"-arch={ARCH}", "-cubin", "-Xptxas", "-v",
                           *_source.OPTIONS, *_source.CUPY_ADDED_OPTIONS, str(src),
                           "-o", str(tmp_path / f"{module}.cubin")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = _nvrtc.ptxas_report(proc.stderr + proc.stdout)
    hot = MODULES[module].hot_kernel_names()
    assert set(hot) <= set(report)
    bad = {k: report[k] for k in hot
           if report[k]["stack"] or report[k]["spill_stores"] or report[k]["spill_loads"]}
    assert not bad, f"{module}: hot kernels with spills or stack frames: {bad}"


def _ptx_entries(ptx):
    """{kernel: its PTX body} (device functions are inlined into the entries)."""
    parts = re.split(r"\.visible \.entry (\w+)\(", ptx)
    return dict(zip(parts[1::2], parts[2::2]))


def test_prox_exact_kernels_contain_no_fused_multiply_add(nvrtc):
    """The rounding contract (fastreg.prox "Update rules"): the elementwise prox, the
    optimizer steps and the group apply pass round every operation on its own
    (__fmul_rn & co.), so the PTX the compiler produces holds no fma at all;
    the cross-entropy, which may contract, does."""
    lib, include = nvrtc
    options = _source.OPTIONS + _source.CUPY_ADDED_OPTIONS + ("--gpu-architecture=compute_90",
                                                             f"-I{include}")
    ptx, _ = _nvrtc.compile_source(lib, _source.module_source("prox"), "prox.cu", options,
                                   output="PTX")
    entries = _ptx_entries(ptx)
    exact = [n for n in cuda_prox.kernel_names()
             if n.startswith(("prox_elementwise", "sgd_step", "adam_step", "group_apply"))]
    assert len(exact) == 16 and set(exact) <= set(entries)
    fma = re.compile(r"\bfma\.")  # fma.rn.f64, fma.rn.ftz.f32 (CuPy's -ftz=true), ...
    fused = {n: len(fma.findall(entries[n])) for n in exact if fma.search(entries[n])}
    assert not fused, f"fused multiply-adds in kernels bound by the rounding contract: {fused}"
    assert fma.search(entries["cross_entropy_rows_k8_f32"]), "the check would see an fma"
