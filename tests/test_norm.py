"""Every norm op, forward and backward: the CPU kernels against the NumPy reference.

Fresh random data each run, float32 and float64, the shapes and layouts of
tests/cases.py, outputs poisoned with NaN before the call, and the inputs
checked unchanged afterwards.
"""

import copy

import numpy as np
import pytest

from _assert import assert_close, tol
from cases import BATCH_NORM, all_cases
from conftest import poisoned

CASES = list(all_cases())
DTYPES = [np.float32, np.float64]


def _snapshot(d):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _assert_unchanged(before, after, case, skip=()):
    for k, v in before.items():
        if isinstance(v, np.ndarray) and k not in skip:
            assert np.array_equal(v, after[k], equal_nan=True), f"{case}: input '{k}' was modified"


def _run_both(op, d, fn, *args):
    """Run fn on the CPU backend and the reference, each on its own copy of the inputs
    (running statistics are updated in place), poisoning preallocated outputs."""
    d_cpu, d_ref = copy.deepcopy(d), copy.deepcopy(d)
    ref = fn(d_ref, *args, "reference")
    out = tuple(None if r is None else poisoned(r) for r in ref)
    got = fn(d_cpu, *args, "cpu", out)
    for g, o in zip(got, out):
        assert g is o, "the kernel must return the out= arrays it was given"
    fresh = fn(copy.deepcopy(d), *args, "cpu")
    return got, fresh, ref, d_cpu, d_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,shape,variant", [c[:3] for c in CASES], ids=[c[3] for c in CASES])
def test_forward_matches_reference(op, shape, variant, dtype, rng):
    d = op.make(rng, shape, dtype, variant)
    before = _snapshot(d)
    got, fresh, ref, d_cpu, d_ref = _run_both(
        op, d, lambda dd, backend, out=None: op.forward(dd, backend, out))
    case = f"{op.name} fwd {np.dtype(dtype).name} {shape} {variant}"
    rtol, atol = tol(dtype)
    for i, (g, f, r) in enumerate(zip(got, fresh, ref)):
        assert_close(g, r, rtol=rtol, atol=atol, case=f"{case} out[{i}] (out=)")
        assert_close(f, r, rtol=rtol, atol=atol, case=f"{case} out[{i}] (fresh)")
        assert f.dtype == r.dtype, case
    # running statistics move exactly as the reference moves them
    for k in ("running_mean", "running_var"):
        if d.get(k) is not None:
            assert_close(d_cpu[k], d_ref[k], rtol=1e-6, atol=1e-6, case=f"{case} {k}")
    _assert_unchanged(before, d, case)
    # a fresh output keeps x's memory layout (channels_last stays channels_last)
    if op.name in ("batch_norm", "group_norm", "instance_norm") and d["x"].size:
        order = np.argsort([-s for s in d["x"].strides], kind="stable")
        assert np.argsort([-s for s in fresh[0].strides], kind="stable").tolist() == \
            order.tolist(), f"{case}: layout not kept"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,shape,variant", [c[:3] for c in CASES], ids=[c[3] for c in CASES])
def test_backward_matches_reference(op, shape, variant, dtype, rng):
    d = op.make(rng, shape, dtype, variant)
    saved = op.forward(copy.deepcopy(d), "reference")
    dy = np.empty_like(d["x"])
    dy[...] = rng.standard_normal(d["x"].shape)
    before = _snapshot(d)
    saved_before = [s.copy() for s in saved]
    got, fresh, ref, _, _ = _run_both(
        op, d, lambda dd, s, g, backend, out=None: op.backward(dd, s, g, backend, out), saved, dy)
    case = f"{op.name} bwd {np.dtype(dtype).name} {shape} {variant}"
    rtol, atol = tol(dtype, "grad")
    names = ("dx", "dweight", "dbias")
    for name, g, f, r in zip(names, got, fresh, ref):
        if r is None:
            assert g is None and f is None, f"{case}: {name} should be None"
            continue
        # Sums over many elements: scale the tolerance with the gradient's size.
        scale = max(1.0, float(np.max(np.abs(r), initial=0.0)))
        assert_close(g, r, rtol=rtol, atol=atol * scale, case=f"{case} {name} (out=)")
        assert_close(f, r, rtol=rtol, atol=atol * scale, case=f"{case} {name} (fresh)")
    _assert_unchanged(before, d, case)
    for s0, s1 in zip(saved_before, saved):
        assert np.array_equal(s0, s1, equal_nan=True), f"{case}: saved statistics modified"


# the table's batch norm rows, and NCHW chunks with many sample blocks, with
# channel blocks (few samples) and with the fused ReLU
BATCH_NORM_CASES = [c for c in CASES if c[0].name == "batch_norm"] + [
    (BATCH_NORM, shape, variant,
     f"batch_norm-{'x'.join(map(str, shape))}-" + ",".join(f"{k}={v}" for k, v in variant.items()))
    for shape, variant in [((33, 2, 64), {"activation": "relu"}), ((2, 3, 40), {}),
                           ((1, 40, 33), {})]]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("op,shape,variant", [c[:3] for c in BATCH_NORM_CASES],
                         ids=[c[3] for c in BATCH_NORM_CASES])
def test_batch_norm_training_walks_chunks_in_memory_order(op, shape, variant, dtype, rng,
                                                          monkeypatch):
    """Batches of 8 MiB and more train in memory order; here every size does."""
    from fastreg.cpu import _batch_norm
    monkeypatch.setattr(_batch_norm, "_CHANNELS_MAX_BYTES", 0)
    test_forward_matches_reference(op, shape, variant, dtype, rng)


def test_batch_norm_chunk_tasks_cover_every_chunk_once():
    from fastreg.cpu import _batch_norm
    for A, C in [(0, 3), (1, 1), (1, 40), (2, 5), (7, 3), (17, 6), (64, 64), (100, 2), (33, 1)]:
        rows, nab, cpb, ncb = _batch_norm._chunk_tasks(A, C)
        assert nab == -(-A // rows)
        seen = np.zeros((A, C), int)
        for task in range(nab * ncb):
            ablk, a0, a1, c0, c1 = _batch_norm._task(task, rows, cpb, ncb, A, C)
            assert ablk == task // ncb and a0 < a1 and c0 < c1
            seen[a0:a1, c0:c1] += 1
        assert (seen == 1).all(), (A, C)
        assert nab * ncb >= min(A * C, _batch_norm._MIN_TASKS) and nab <= 32, (A, C)


@pytest.mark.parametrize("op_name", ["layer_norm", "rms_norm"])
def test_row_norm_large_row_float32_accumulates_in_float64(op_name, rng):
    """D = 8192 with an offset: float32 accumulation would drift; float64 does not."""
    from cases import LAYER_NORM, RMS_NORM
    op = LAYER_NORM if op_name == "layer_norm" else RMS_NORM
    d = op.make(rng, (4, 8192), np.float32, {}, offset=3.0)
    got = op.forward(d, "cpu")
    ref = op.forward(d, "reference")
    for g, r in zip(got, ref):
        assert_close(g, r, rtol=1e-5, atol=1e-5, case=f"{op_name} D=8192")
