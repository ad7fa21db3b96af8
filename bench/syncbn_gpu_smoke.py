"""1-rank NCCL smoke run of fastreg.distributed's GPU communicators.

    python bench/syncbn_gpu_smoke.py

For bench/gpu_check.py on a GPU machine. Checks, on one process and device:
- ``CupyNcclComm`` over a 1-rank ``cupy.cuda.nccl.NcclCommunicator``: allgather
  and allreduce_sum of float64 CuPy arrays, on a non-default CuPy stream;
- ``TorchComm`` over a 1-rank torch.distributed NCCL group: the same on CuPy
  arrays (through DLPack) on that stream;
- where the CUDA backend has the split batch-norm kernels: sync_batch_norm
  and its backward through both, against fastreg.batch_norm on the GPU.
Prints one line per check and exits 1 if one fails; a missing CuPy, torch or
NCCL skips its checks with the reason.
"""

import os
import sys
import tempfile


def _check_comm(name, comm, cupy):
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        send = cupy.arange(6, dtype=cupy.float64).reshape(2, 3)
        recv = cupy.full((1, 2, 3), cupy.nan)
        comm.allgather(send, recv)
        buf = send * 2
        comm.allreduce_sum(buf)
        ok = bool(cupy.array_equal(recv[0], send)) and bool(cupy.array_equal(buf, send * 2))
    stream.synchronize()
    print(f"{name}: allgather/allreduce_sum on a side stream: {'ok' if ok else 'FAILED'}")
    return ok


def _check_sync_bn(name, comm, cupy):
    import fastreg
    from fastreg.distributed import sync_batch_norm, sync_batch_norm_backward
    rng = cupy.random.default_rng(0)
    x = rng.standard_normal((8, 16, 9, 9), dtype=cupy.float32) * 2 + 3
    dy = rng.standard_normal(x.shape, dtype=cupy.float32)
    w, b = cupy.ones(16, cupy.float32), cupy.zeros(16, cupy.float32)
    try:
        y, mean, rstd, n = sync_batch_norm(x, w, b, comm=comm)
    except RuntimeError as error:  # the CUDA backend without the split kernels
        print(f"{name}: sync_batch_norm skipped: {error}")
        return True
    dx, dw, db = sync_batch_norm_backward(dy, x, mean, rstd, n, w, b, comm=comm)
    y1, m1, r1 = fastreg.batch_norm(x, w, b)
    dx1, dw1, db1 = fastreg.batch_norm_backward(dy, x, m1, r1, w, b)
    err = max(float(cupy.abs(a - e).max()) for a, e in ((y, y1), (dx, dx1), (dw, dw1), (db, db1)))
    ok = err < 1e-3
    print(f"{name}: sync_batch_norm fwd+bwd vs batch_norm: max err {err:.2e} "
          f"{'ok' if ok else 'FAILED'}")
    return ok


def main():
    try:
        import cupy
        from cupy.cuda import nccl
    except Exception as error:  # noqa: BLE001 - reported
        print(f"skipped: CuPy with NCCL is not available ({error})")
        return 0
    from fastreg.distributed import CupyNcclComm, TorchComm
    results = []
    uid = nccl.get_unique_id()
    nc = nccl.NcclCommunicator(1, uid, 0)
    comm = CupyNcclComm(nc)
    results += [_check_comm("CupyNcclComm", comm, cupy), _check_sync_bn("CupyNcclComm", comm, cupy)]
    try:
        import torch
        import torch.distributed as dist
    except ImportError as error:
        print(f"TorchComm skipped: {error}")
    else:
        torch.cuda.set_device(cupy.cuda.Device().id)
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group("nccl", store=dist.FileStore(os.path.join(tmp, "s"), 1),
                                    rank=0, world_size=1)
            tc = TorchComm()
            results += [_check_comm("TorchComm(nccl)", tc, cupy),
                        _check_sync_bn("TorchComm(nccl)", tc, cupy)]
            dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
