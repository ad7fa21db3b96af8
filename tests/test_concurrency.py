"""Determinism and thread safety of every public function (tests/api_table.py).

- Repeated calls give identical bits (CPU, reference, CUDA kernels under the
  host emulation).
- Calls from 8 Python threads at once give the bits of a serial call (CPU and
  emulation): no shared scratch, no races in the launchers.
- In subprocesses: NUMBA_NUM_THREADS=1 against 2, the second run also calling
  every function from 8 threads at once under Numba's "workqueue" threading
  layer, which terminates the process on concurrent parallel launches unless
  fastreg serializes them (fastreg._backend).
- On a GPU: identical bits on two CUDA streams and over repeated launches.
"""

import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from _assert import assert_bitwise
from _cuda_targets import GPU, needs_emulator
from api_table import ALL, build, fresh, results, runs_on

HERE = pathlib.Path(__file__).resolve().parent

CPU_ROWS = [pytest.param(api, id=api.name) for api in ALL]
EMU_ROWS = [pytest.param(api, id=api.name) for api in ALL
            if api.backend_kw and runs_on(api, "cuda_emulator")]


def _call(api, kw, backend):
    k = fresh(kw)
    return results(api, k, api.call(k, backend if api.backend_kw else None))


def _same(a_list, b_list, case):
    assert len(a_list) == len(b_list), case
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert_bitwise(a, b, case=f"{case}, result {i}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("api", CPU_ROWS)
def test_repeated_calls_are_bitwise_identical(api, backend):
    kw = build(api, np.float32, big=backend == "cpu")
    first = _call(api, kw, backend)
    for r in range(2):
        _same(_call(api, kw, backend), first, f"{api.name} on {backend}, repeat {r + 1}")


@needs_emulator
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("api", EMU_ROWS)
def test_repeated_emulated_launches_are_bitwise_identical(api, dtype):
    kw = build(api, np.dtype(dtype))
    first = _call(api, kw, "cuda_emulator")
    _same(_call(api, kw, "cuda_emulator"), first, f"{api.name} {dtype} emulated, repeat")


def _threaded(api, kw, backend, threads=8, calls=2):
    out, errors = [], []
    start = threading.Barrier(threads)

    def work():
        try:
            mine = [fresh(kw) for _ in range(calls)]
            start.wait()
            for k in mine:
                out.append(results(api, k, api.call(k, backend if api.backend_kw else None)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("api", CPU_ROWS)
def test_calls_from_8_threads_at_once_match_a_serial_call_on_cpu(api):
    kw = build(api, np.float32, big=True)
    serial = _call(api, kw, "cpu")
    for i, res in enumerate(_threaded(api, kw, "cpu")):
        _same(res, serial, f"{api.name}, concurrent call {i}")


@needs_emulator
@pytest.mark.gpu
@pytest.mark.parametrize("api", EMU_ROWS)
def test_calls_from_8_threads_at_once_match_a_serial_call_emulated(api):
    kw = build(api, np.float32)
    serial = _call(api, kw, "cuda_emulator")
    for i, res in enumerate(_threaded(api, kw, "cuda_emulator", calls=1)):
        _same(res, serial, f"{api.name} emulated, concurrent call {i}")


def _subprocess(tmp_path, name, env_extra, *args):
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    out = tmp_path / f"{name}.npz"
    proc = subprocess.run([sys.executable, str(HERE / "_run_api_table.py"), str(out), *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return dict(np.load(out))


@pytest.mark.slow
def test_every_function_identical_at_1_and_2_threads_and_under_workqueue_concurrency(tmp_path):
    one = _subprocess(tmp_path, "one-thread", {"NUMBA_NUM_THREADS": "1"})
    two = _subprocess(tmp_path, "two-threads-workqueue",
                      {"NUMBA_NUM_THREADS": "2", "NUMBA_THREADING_LAYER": "workqueue"},
                      "--threads", "8")
    assert one.keys() == two.keys()
    assert {k.rsplit("_", 1)[0] for k in one} == {api.name for api in ALL}
    for k in one:
        assert_bitwise(two[k], one[k], case=f"{k}: 2 threads (workqueue) vs 1 thread")


needs_gpu = pytest.mark.skipif(not GPU, reason="needs CuPy and a CUDA device")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("api", [pytest.param(a, id=a.name) for a in ALL
                                 if a.backend_kw and runs_on(a, "cuda")])
def test_gpu_results_identical_across_streams_and_launches(api):
    import cupy

    import fastreg
    from api_table import on_device

    def host(value, out):
        """Every array of a result on the host (masks as their position and bits)."""
        if isinstance(value, (list, tuple)):
            for v in value:
                host(v, out)
        elif isinstance(value, (fastreg.DropoutMask, fastreg.GaussianMask)):
            out.append(np.array([value.seed or 0, value.offset or 0], np.uint64))
            host(getattr(value, "bits", None), out)
        elif isinstance(value, cupy.ndarray):
            out.append(cupy.asnumpy(value))
        elif isinstance(value, (np.ndarray, int, float)):
            out.append(np.array(value))
        return out

    kw = build(api, np.float32, big=True)
    runs = []
    for stream in (cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)):
        with stream:
            for _ in range(2):
                k = on_device(kw)
                res = api.call(k, "cuda")
                runs.append(host((res, [k[n] for n in api.inplace]), []))
        stream.synchronize()
    assert runs[0], f"{api.name}: no results to compare"
    for i, r in enumerate(runs[1:]):
        _same(r, runs[0], f"{api.name} on the GPU, run {i + 1}")
