"""Dispatch: NumPy arrays run the Numba kernels unless a backend is forced."""

import numpy as np
import pytest

import fastreg
import fastreg.reference.norm as reference


@pytest.fixture
def reference_calls(monkeypatch):
    calls = []
    original = reference.layer_norm

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(reference, "layer_norm", spy)
    return calls


def test_numpy_arrays_default_to_the_cpu_kernels(reference_calls):
    fastreg.layer_norm(np.ones((2, 3), np.float32))
    assert reference_calls == []


def test_backend_argument_forces_the_reference(reference_calls):
    fastreg.layer_norm(np.ones((2, 3), np.float32), backend="reference")
    assert len(reference_calls) == 1


def test_use_backend_context_nests_and_restores(reference_calls):
    x = np.ones((2, 3))
    with fastreg.use_backend("reference"):
        fastreg.layer_norm(x)
        with fastreg.use_backend("cpu"):
            fastreg.layer_norm(x)
        fastreg.layer_norm(x)
    fastreg.layer_norm(x)
    assert len(reference_calls) == 2


def test_backend_argument_wins_over_context(reference_calls):
    with fastreg.use_backend("cpu"):
        fastreg.layer_norm(np.ones((2, 3)), backend="reference")
    assert len(reference_calls) == 1


def test_environment_variable_selects_backend(reference_calls, monkeypatch):
    monkeypatch.setenv("FASTREG_BACKEND", "reference")
    fastreg.layer_norm(np.ones((2, 3)))
    assert len(reference_calls) == 1


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="'backend' must be one of 'cpu', 'cuda', "
                                         "'cuda_emulator', 'reference'"):
        with fastreg.use_backend("gpu"):
            pass


def test_import_compiles_nothing():
    import subprocess
    import sys
    code = "import sys, fastreg; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "importing fastreg must not load Numba or compile"


def test_import_loads_neither_cupy_nor_the_cuda_backend():
    import subprocess
    import sys
    code = ("import sys, fastreg; "
            "print(sorted(m for m in ('cupy', 'ml_dtypes', 'fastreg.cuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_cached_selection_still_refuses_an_op_listed_unsupported(monkeypatch):
    """The dispatcher remembers a (family, backend, op) after its first call; an op
    the module lists as unsupported afterwards is still refused by name."""
    from fastreg.reference import norm as reference_norm
    x = np.ones((3, 4), np.float32)
    fastreg.layer_norm(x, backend="reference")          # remembered from here on
    monkeypatch.setattr(reference_norm, "UNSUPPORTED", frozenset({"layer_norm"}), raising=False)
    with pytest.raises(RuntimeError, match="layer_norm: the 'reference' backend does not "
                                           "implement layer_norm"):
        fastreg.layer_norm(x, backend="reference")
    fastreg.rms_norm(x, backend="reference")             # other ops of the family still run


# --------------------------------------------------------------------------- fresh outputs

def test_large_fresh_outputs_start_on_a_huge_page_boundary():
    from fastreg import _backend
    n = _backend.ALIGN_FROM // 4
    a = _backend.empty((n,), np.float32, inputs={"x": np.zeros(1, np.float32)})
    assert a.shape == (n,) and a.dtype == np.float32
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % _backend.HUGE_PAGE == 0
    # just below the threshold: NumPy's own allocation, whatever its address
    b = _backend.empty((n - 1,), np.float32)
    assert b.shape == (n - 1,) and b.flags.owndata


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (0, 2, 3, 1), (3, 2, 1, 0)])
def test_an_aligned_output_keeps_the_layout_of_like(order):
    from fastreg import _backend
    stored = (8, 64, 128, 128)                     # 32 MiB of float32, never touched
    like = np.empty([stored[k] for k in order], np.float32).transpose(np.argsort(order))
    a = _backend.empty(None, np.float32, like=like, inputs={"x": like})
    ref = np.empty_like(like, order="K")
    assert a.shape == like.shape and a.strides == ref.strides
    assert a.ctypes.data % _backend.HUGE_PAGE == 0


def test_an_aligned_output_frees_its_memory_with_the_array():
    import gc
    import weakref
    from fastreg import _backend
    a = _backend.empty((_backend.ALIGN_FROM // 8,), np.float64)
    owner = weakref.ref(a.base)
    del a
    gc.collect()
    assert owner() is None


def test_ops_write_aligned_fresh_outputs_correctly(monkeypatch):
    # lower the threshold so a small case takes the aligned path, channels last included
    from fastreg import _backend
    monkeypatch.setattr(_backend, "ALIGN_FROM", 1024)
    rng = np.random.default_rng()
    x = rng.standard_normal((4, 6, 5, 7)).astype(np.float32).transpose(0, 3, 1, 2)
    w, b = rng.standard_normal(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    y, mean, rstd = fastreg.batch_norm(x, w, b, training=True)
    assert y.ctypes.data % _backend.HUGE_PAGE == 0
    assert y.strides == np.empty_like(x, order="K").strides
    for got, ref in zip((y, mean, rstd),
                        fastreg.batch_norm(x, w, b, training=True, backend="reference")):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
