"""Sync batch norm on several ranks against single-process batch_norm on the whole batch.

Every rank builds the same whole batch from a seed, keeps its slice (uneven
slices; some cases give a rank no samples), runs sync_batch_norm forward and
backward through a communicator, and checks against fastreg.batch_norm and
batch_norm_backward on the whole batch: its slice of y and dx, the
statistics, the running statistics and dweight/dbias (float64 within 1e-12
relative to the largest value, float32 within the per-dtype tolerance). It
also checks that every rank holds bitwise the same statistics and running
statistics, and that a step sends 5 float64 per channel per rank.

Used in three ways:
- in-process, by tests/test_distributed.py, with ``ThreadGroup`` (ranks as threads);
- ``mpiexec -n R python _sync_bn_cases.py mpi SEED`` (mpi4py);
- ``python _sync_bn_cases.py torch SEED RANK WORLD STORE`` (torch.distributed, gloo).
A rank exits with status 1 and prints the failure if any check fails.
"""

import sys
import threading
import traceback

import numpy as np

import fastreg
from fastreg.distributed import CountingComm, sync_batch_norm, sync_batch_norm_backward

TOL = {  # (rtol, atol relative to the largest magnitude of the expected array)
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 2e-5,
}
TOL_GRAD = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-4}


def sizes(N, R, pattern):
    """Samples per rank: 'uneven' (rank r gets about (r+1)/sum share) or
    'first_empty' (rank 0 gets none, the others uneven)."""
    if pattern == "first_empty" and R > 1:
        return [0] + sizes(N, R - 1, "uneven")
    weights = np.arange(1, R + 1, dtype=float)
    cuts = np.floor(np.cumsum(weights) / weights.sum() * N).astype(int)
    return list(np.diff(np.concatenate([[0], cuts])))


# (name, whole-batch shape, axis, dtype, pattern, options)
CASES = [
    ("nchw-f64", (7, 5, 6, 9), 1, np.float64, "uneven", {}),
    ("nchw-f64-empty-rank", (6, 4, 5, 5), 1, np.float64, "first_empty", {"activation": "relu"}),
    ("nhwc-f64", (9, 5, 4, 6), -1, np.float64, "first_empty", {}),
    ("2d-f64-offset", (50, 7), 1, np.float64, "uneven", {"offset": 1e4, "affine": False}),
    ("nchw-f32", (8, 6, 7, 11), 1, np.float32, "uneven", {}),
    ("nhwc-f32-relu", (7, 5, 6, 8), -1, np.float32, "first_empty", {"activation": "relu"}),
    ("nchw-f64-inference", (6, 4, 3, 5), 1, np.float64, "uneven", {"training": False}),
]


def _close(name, got, want, tol, case):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = float(np.max(np.abs(got - want), initial=0.0))
    if not err <= tol * scale:
        raise AssertionError(f"{case}: {name} differs from single-process batch_norm by {err:.3g} "
                             f"(allowed {tol * scale:.3g})")


def _same_on_every_rank(comm, arrays, case):
    """Gather the arrays from every rank (test traffic, not counted) and compare bitwise."""
    mine = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    every = np.empty((comm.size, mine.size))
    comm.allgather(mine, every)
    for r in range(comm.size):
        if every[r].tobytes() != every[0].tobytes():
            raise AssertionError(f"{case}: rank {r}'s statistics differ from rank 0's")


def run_case(comm, seed, case):
    name, shape, axis, dtype, pattern, opt = case
    rank, R = comm.rank, comm.size
    training = opt.get("training", True)
    activation = opt.get("activation")
    rng = np.random.default_rng([seed, *name.encode()])
    x = (rng.standard_normal(shape) * 2 + opt.get("offset", 0.5)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w = b = None
    if opt.get("affine", True):
        w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm0 = rng.standard_normal(C).astype(np.float32)
    rv0 = rng.uniform(0.5, 2.0, C).astype(np.float32)

    # the whole batch on one process
    rm1, rv1 = rm0.copy(), rv0.copy()
    y1, m1, r1 = fastreg.batch_norm(x, w, b, rm1, rv1, training=training, momentum=0.3,
                                    axis=axis, activation=activation)
    dx1, dw1, db1 = fastreg.batch_norm_backward(dy, x, m1, r1, w, b, training=training,
                                                axis=axis, y=y1, activation=activation)

    # this rank's slice
    n = sizes(shape[0], R, pattern)
    lo, hi = sum(n[:rank]), sum(n[:rank + 1])
    xs, dys = x[lo:hi].copy(), dy[lo:hi].copy()
    rm, rv = rm0.copy(), rv0.copy()
    counting = CountingComm(comm)
    y, mean, rstd, count = sync_batch_norm(xs, w, b, rm, rv, comm=counting, training=training,
                                           momentum=0.3, axis=axis, activation=activation)
    sent_fwd = counting.payload_bytes
    dx, dw, db = sync_batch_norm_backward(dys, xs, mean, rstd, count, w, b, comm=counting,
                                          training=training, axis=axis, y=y,
                                          activation=activation)
    tag = f"{name} rank {rank}/{R} slice {lo}:{hi}"
    t, tg = TOL[np.dtype(dtype)], TOL_GRAD[np.dtype(dtype)]
    _close("y", y, y1[lo:hi], t, tag)
    _close("mean", mean, m1, t, tag)
    _close("rstd", rstd, r1, t, tag)
    _close("running_mean", rm, rm1, t, tag)
    _close("running_var", rv, rv1, t, tag)
    _close("dx", dx, dx1[lo:hi], tg, tag)
    if w is not None:
        _close("dweight", dw, dw1, tg, tag)
        _close("dbias", db, db1, tg, tag)
    # one collective each way, 3 + 2 float64 per channel
    ops = [op for op, _, _ in counting.calls]
    if training:
        assert count == x.size // C, f"{tag}: count {count}"
        assert ops == ["allgather", "allreduce_sum"], f"{tag}: collectives {ops}"
        assert sent_fwd == 3 * C * 8 and counting.payload_bytes == 5 * C * 8, \
            f"{tag}: payload {counting.calls}"
    else:
        assert ops == (["allreduce_sum"] if w is not None else []), f"{tag}: collectives {ops}"
    _same_on_every_rank(comm, [mean, rstd, rm, rv], tag)


def run_all(comm, seed, cases=CASES):
    for case in cases:
        run_case(comm, seed, case)


# --------------------------------------------------------------------------- ranks as threads

class ThreadGroup:
    """R ranks as threads of one process, with blocking collectives (for tests)."""

    def __init__(self, size, timeout=120):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size

    def comm(self, rank):
        return _ThreadComm(self, rank)

    def run(self, fn):
        """fn(comm) on every rank; re-raises the first rank's exception."""
        errors = [None] * self.size

        def target(r):
            try:
                fn(self.comm(r))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors[r] = e
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if e is not None
                and not isinstance(e, threading.BrokenBarrierError)]
        if real:
            raise real[0]
        if any(e is not None for e in errors):
            raise next(e for e in errors if e is not None)


class _ThreadComm:
    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, buf):
        g = self.group
        g.slots[self.rank] = np.array(buf, copy=True)
        g.barrier.wait()
        parts = list(g.slots)
        g.barrier.wait()
        return parts

    def allgather(self, send, recv):
        for r, part in enumerate(self._exchange(send)):
            recv[r] = part

    def allreduce_sum(self, buf):
        parts = self._exchange(buf)
        total = parts[0].copy()
        for p in parts[1:]:
            total += p
        buf[...] = total


# --------------------------------------------------------------------------- as a rank

def _main(argv):
    mode, seed = argv[1], int(argv[2])
    if mode == "mpi":
        from fastreg.distributed import MPIComm
        comm = MPIComm()
    elif mode == "torch":
        import torch.distributed as dist
        from fastreg.distributed import TorchComm
        rank, world, store = int(argv[3]), int(argv[4]), argv[5]
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                                world_size=world)
        comm = TorchComm()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    try:
        run_all(comm, seed)
    except BaseException:
        traceback.print_exc()
        print(f"rank {comm.rank}: FAILED", flush=True)
        sys.stdout.flush()
        if mode == "mpi":
            comm.comm.Abort(1)
        raise SystemExit(1)
    print(f"rank {comm.rank}/{comm.size}: {len(CASES)} cases ok", flush=True)
    if mode == "torch":
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    _main(sys.argv)
