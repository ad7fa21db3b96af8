"""A kernel that fails to compile on its first call surfaces as fastreg.CompileError
naming the public function, the backend and the dtype, with the compiler's
error chained; other exceptions from the kernels pass through unchanged."""

import numba
import numpy as np
import pytest

import fastreg
import fastreg.cpu.norm
import fastreg.cpu.prox
from _cuda_targets import needs_emulator
from fastreg.cuda import _emulator, _source


def test_a_numba_typing_error_names_the_function_backend_and_dtype(monkeypatch):
    @numba.njit(cache=False)
    def untypable(x):
        return x + "a string"   # no float + str: a TypingError at the first call

    def kernel(x, *args, **kwargs):
        return untypable(x)

    monkeypatch.setattr(fastreg.cpu.norm, "layer_norm", kernel)
    x = np.ones((3, 4), np.float32)
    with pytest.raises(fastreg.CompileError) as info:
        fastreg.layer_norm(x)
    msg = str(info.value)
    assert msg.startswith("layer_norm:") and "'cpu'" in msg and "float32" in msg, msg
    assert "TypingError" in msg
    assert isinstance(info.value.__cause__, numba.core.errors.TypingError)


def test_the_guarded_kernel_is_replaced_when_the_module_function_is(monkeypatch):
    x = np.ones((3, 4), np.float64)
    fastreg.prox_l1(x, 0.5)            # the original, wrapped and cached

    class CompileException(Exception):  # CuPy's NVRTC failure, matched by name
        pass

    def kernel(*args, **kwargs):
        raise CompileException("nvrtc: error: identifier \"oops\" is undefined")

    monkeypatch.setattr(fastreg.cpu.prox, "prox_l1", kernel)
    with pytest.raises(fastreg.CompileError, match=r"prox_l1: .*float64.*identifier"):
        fastreg.prox_l1(x, 0.5)


def test_other_kernel_errors_pass_through_unchanged(monkeypatch):
    def kernel(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(fastreg.cpu.norm, "rms_norm", kernel)
    with pytest.raises(MemoryError, match="out of memory"):
        fastreg.rms_norm(np.ones((2, 3), np.float32))


@needs_emulator
@pytest.mark.gpu
def test_a_failed_emulator_build_names_the_function_backend_and_dtype(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTREG_EMU_CACHE", str(tmp_path))
    monkeypatch.setattr(_emulator, "_libraries", {})   # nothing built yet in this test
    monkeypatch.setattr(_source, "emulator_source",
                        lambda module, directory=None: "this is not C++;\n")
    x = np.ones((3, 4), np.float16)
    with pytest.raises(fastreg.CompileError) as info:
        fastreg.group_norm(x, 2, backend="cuda_emulator")
    msg = str(info.value)
    assert msg.startswith("group_norm:") and "'cuda_emulator'" in msg and "float16" in msg, msg
    assert isinstance(info.value.__cause__, _emulator.EmulatorBuildError)
