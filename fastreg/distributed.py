"""Batch norm over a batch spread across processes (data-parallel training).

fastreg computes each process's partial statistics with its own kernels and
lets an existing engine move them; it has no transport of its own. A step
sends, per process, 5 numbers per channel and nothing else:

    forward   stats -> ONE allgather of (count, mean, M2) per channel -> combine -> apply
    backward  reduce -> ONE allreduce(sum) of (sum_dy, sum_dy_xhat) per channel -> apply

Forward: the partials are gathered rather than summed, and every process
merges them with Chan et al.'s formula in rank order
(:func:`fastreg.batch_norm_combine`). This is exact to rounding for any
offset of the data and any split of the batch (uneven, or empty on some
processes), and every process gets bitwise the same statistics, hence the
same running statistics. An allreduce of shifted sums would send the same 3
numbers per channel but needs a shift agreed by every process and, with a
poor one (the running mean at the start of training, for data far from 0),
loses digits to cancellation; its summation order is also up to the engine.
Each process receives R*3 numbers per channel instead of 3, which is
negligible next to the activations for any realistic R and C.

Backward: the two per-channel sums are summed over processes by the
engine's allreduce, then each process computes its slice of dx with the
global count. With ``reduce_param_grads=True`` dweight and dbias are those
global sums, so every process holds the gradient of the whole batch; with
False they are this process's own sums, as torch.nn.SyncBatchNorm returns
them for DistributedDataParallel to average.

The numbers travel as float64 whatever x's dtype: 8 bytes each, 40 bytes per
channel per process per step (see :class:`CountingComm` to measure it).

Communicators (``comm=``) are thin adapters exposing ``rank``, ``size``,
``allgather(send, recv)`` and ``allreduce_sum(buf)`` on float64 arrays of the
library of x:

- :class:`MPIComm`: an mpi4py communicator, NumPy arrays;
- :class:`TorchComm`: a torch.distributed process group: gloo for NumPy
  arrays (viewed as CPU tensors without a copy), NCCL for CuPy arrays
  (viewed as CUDA tensors through DLPack);
- :class:`CupyNcclComm`: a ``cupy.cuda.nccl.NcclCommunicator``, CuPy arrays.

Every process must make the same calls with the same channel count,
``training``, and weight/bias presence, as with any collective: a process
that raises before the collective (bad arguments) leaves the others waiting.
Arguments are validated before anything is sent.
"""

from __future__ import annotations

import numpy as np

from . import _backend, _checks
from .norm import (
    _ACTIVATIONS,
    _F64,
    _channel_axis,
    _channel_stat,
    _check_dy,
    _check_running,
    batch_norm_apply,
    batch_norm_backward_apply,
    batch_norm_backward_reduce,
    batch_norm_combine,
    batch_norm_stats,
)

__all__ = ["sync_batch_norm", "sync_batch_norm_backward",
           "MPIComm", "TorchComm", "CupyNcclComm", "CountingComm"]


# --------------------------------------------------------------------------- communicators

class MPIComm:
    """Collectives over an mpi4py communicator, on NumPy arrays.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, default ``MPI.COMM_WORLD``
    """

    def __init__(self, comm=None):
        from mpi4py import MPI
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def allgather(self, send, recv):
        """recv[r] = process r's send, for every r (``MPI_Allgather``)."""
        self.comm.Allgather(send, recv)

    def allreduce_sum(self, buf):
        """buf = the sum of every process's buf, in place (``MPI_Allreduce``)."""
        self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)


class TorchComm:
    """Collectives over a torch.distributed process group.

    NumPy arrays are viewed as CPU tensors (``torch.from_numpy``, no copy)
    and go through the group's CPU backend (gloo). CuPy arrays are viewed as
    CUDA tensors through DLPack (no copy) and go through its CUDA backend
    (NCCL); the collective is issued on CuPy's current stream (as torch's
    current stream, through ``torch.cuda.ExternalStream``), so it is ordered
    after the kernels that wrote its input and before those that read its
    output, with no synchronization of the host. Tensors are used as given.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup or None (the default group)
    """

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist
        self._torch, self._dist = torch, dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # torch >= 2.13 names the single-tensor allgather all_gather_single.
        self._gather_into = getattr(dist, "all_gather_single", None) or \
            dist.all_gather_into_tensor

    def _tensor(self, a):
        torch = self._torch
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, np.ndarray):
            return torch.from_numpy(a)
        return torch.from_dlpack(a)

    def _stream(self, a):
        """Torch's current stream set to CuPy's for a CuPy array; else nothing."""
        import contextlib
        if _backend.array_kind(a) != "cupy":
            return contextlib.nullcontext()
        import cupy
        torch = self._torch
        stream = torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr,
                                           device=torch.device("cuda", a.device.id))
        return torch.cuda.stream(stream)

    def allgather(self, send, recv):
        with self._stream(send):
            s, r = self._tensor(send), self._tensor(recv)
            if s.is_cuda:
                self._gather_into(r.view(-1), s.reshape(-1), group=self.group)
            else:
                # gloo has no single-tensor allgather in every torch version;
                # the list form writes into views of recv, so nothing is copied twice.
                self._dist.all_gather(list(r.unbind(0)), s, group=self.group)

    def allreduce_sum(self, buf):
        with self._stream(buf):
            self._dist.all_reduce(self._tensor(buf), op=self._dist.ReduceOp.SUM,
                                  group=self.group)


class CupyNcclComm:
    """Collectives over a ``cupy.cuda.nccl.NcclCommunicator``, on CuPy arrays,
    issued on CuPy's current stream (no host synchronization).

    Parameters
    ----------
    comm : cupy.cuda.nccl.NcclCommunicator (one device per process)
    """

    def __init__(self, comm):
        from cupy.cuda import nccl
        self._nccl = nccl
        self.comm = comm
        self.rank = comm.rank_id()
        self.size = comm.size()

    def _dtype(self, a):
        types = {np.dtype(np.float64): self._nccl.NCCL_FLOAT64,
                 np.dtype(np.float32): self._nccl.NCCL_FLOAT32}
        if a.dtype not in types or not a.flags.c_contiguous:
            raise TypeError("CupyNcclComm: buffers must be C-contiguous float32 or float64, "
                            f"got {a.dtype} (contiguous: {a.flags.c_contiguous}).")
        return types[a.dtype]

    def allgather(self, send, recv):
        import cupy
        self.comm.allGather(send.data.ptr, recv.data.ptr, send.size, self._dtype(send),
                            cupy.cuda.get_current_stream().ptr)

    def allreduce_sum(self, buf):
        import cupy
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype(buf),
                            self._nccl.NCCL_SUM, cupy.cuda.get_current_stream().ptr)


class CountingComm:
    """Wraps a communicator and records what each collective carries.

    ``calls`` lists ``(op, payload_bytes, result_bytes)``: the bytes this
    process contributes (its send buffer) and the size of the result it gets
    back. The payload is what the step must move per process; the traffic on
    the links also depends on the engine's algorithm (a ring allreduce sends
    about twice its payload). ``payload_bytes`` sums the payloads.
    """

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.size
        self.calls = []

    @property
    def payload_bytes(self):
        return sum(p for _, p, _ in self.calls)

    def reset(self):
        self.calls = []

    def allgather(self, send, recv):
        self.calls.append(("allgather", int(send.nbytes), int(recv.nbytes)))
        self.comm.allgather(send, recv)

    def allreduce_sum(self, buf):
        self.calls.append(("allreduce_sum", int(buf.nbytes), int(buf.nbytes)))
        self.comm.allreduce_sum(buf)


# --------------------------------------------------------------------------- sync batch norm

def _check_comm(caller, comm):
    missing = [m for m in ("rank", "size", "allgather", "allreduce_sum")
               if not hasattr(comm, m)]
    if missing:
        raise TypeError(f"{caller}: 'comm' must be a communicator adapter (MPIComm, TorchComm, "
                        "CupyNcclComm, or an object with rank, size, allgather and "
                        f"allreduce_sum), got {type(comm).__name__} without "
                        f"{', '.join(missing)}.")


def _empty(shape, like):
    """A float64 buffer in the library of ``like``."""
    if _backend.array_kind(like) == "cupy":
        import cupy
        return cupy.empty(shape, np.float64)
    return np.empty(shape, np.float64)


def sync_batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *, comm,
                    training=True, momentum=0.1, eps=1e-5, axis=1, activation=None, out=None):
    """Batch normalization of a batch whose slices are held by several processes.

    Each process passes its slice ``x`` (any number of samples, 0 included);
    every process gets back the same statistics and its slice of what
    :func:`fastreg.batch_norm` would give on the whole batch::

        y = act((x - mean) * rstd * weight + bias),  rstd = 1 / sqrt(var + eps)

    with the mean and biased variance of the whole batch. Running statistics
    (if given; the same on every process) are updated in place by PyTorch's
    rule, the variance made unbiased by the whole batch's count, so they stay
    identical on every process. In inference (``training=False``) the running
    statistics normalize and nothing is communicated.

    Parameters
    ----------
    x : ndarray (N, C, ...) for ``axis=1`` or (N, ..., C) for ``axis=-1``: NumPy
        (float32, float64) or CuPy (also float16, bfloat16; the split steps run the
        CUDA kernels, with float64 partials)
    weight, bias : ndarray (C,) of x's dtype, or None
    running_mean, running_var : ndarray (C,), float32 or float64, or None
    comm : a communicator adapter (:class:`MPIComm`, :class:`TorchComm`,
        :class:`CupyNcclComm`)
    out : tuple ``(y, mean, rstd)`` of preallocated outputs (mean, rstd float64)

    Returns
    -------
    y : ndarray like x
    mean, rstd : float64 ndarrays (C,), the statistics used
    count : int, the whole batch's count per channel (None in inference), for
        :func:`sync_batch_norm_backward`

    Raises
    ------
    ValueError
        on every process, after the exchange, when the whole batch has exactly
        one value per channel (as PyTorch does); before it on bad arguments.

    Notes
    -----
    Communication: one allgather of 3 float64 per channel per process.
    Memory: reads x twice (statistics, then y; the exchange sits between),
    writes y once.
    """
    caller = "sync_batch_norm"
    _check_comm(caller, comm)
    _checks.same_kind(caller, x=x, weight=weight, bias=bias, running_mean=running_mean,
                      running_var=running_var)
    _, dtypes = _backend.dtypes("norm", x, backend=None, caller=caller)
    _checks.array("x", x, caller=caller, dtypes=dtypes, min_ndim=2)
    training = _checks.flag("training", training, caller=caller)
    momentum = _checks.scalar("momentum", momentum, caller=caller, ge=0, le=1)
    eps = _checks.scalar("eps", eps, caller=caller, gt=0)
    ax = _channel_axis(caller, axis, x)
    activation = _checks.choice("activation", activation, caller=caller, choices=_ACTIVATIONS)
    C = x.shape[ax]
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    _check_running(caller, running_mean, running_var, C, required=not training)
    y, mean, rstd = _checks.out(caller, out, [("y", x.shape, x.dtype, x),
                                              ("mean", (C,), _F64, None),
                                              ("rstd", (C,), _F64, None)],
                                dict(x=x, weight=weight, bias=bias, running_mean=running_mean,
                                     running_var=running_var))
    if not training:
        mean[...] = running_mean
        batch_norm_apply(x, mean, running_var.astype(np.float64), weight, bias, eps=eps,
                         axis=ax, activation=activation, out=(y, rstd))
        return y, mean, rstd, None

    send = _empty((3, C), x)
    batch_norm_stats(x, axis=ax, out=(send[0], send[1], send[2]))
    gathered = _empty((comm.size, 3, C), x)
    comm.allgather(send, gathered)
    count, _, var = batch_norm_combine(gathered[:, 0], gathered[:, 1], gathered[:, 2],
                                       out=(None, mean, None))
    n = int(count[0]) if C else 0  # every channel has the same count
    if n == 1:
        raise ValueError(f"{caller}: the whole batch must have more than 1 value per channel "
                         f"when training, got 1 (this process's x has shape {x.shape}).")
    batch_norm_apply(x, mean, var, weight, bias, running_mean, running_var, count=n,
                     momentum=momentum, eps=eps, axis=ax, activation=activation, out=(y, rstd))
    return y, mean, rstd, n


def sync_batch_norm_backward(dy, x, mean, rstd, count, weight=None, bias=None, *, comm,
                             training=True, axis=1, y=None, activation=None,
                             reduce_param_grads=True, out=None):
    """Gradients of :func:`sync_batch_norm` for this process's slice.

    With ``dz = dy * (y > 0)`` for ``activation="relu"``, else ``dy``, and
    ``xhat = (x - mean) * rstd``, sums over the whole batch (every process)::

        dbias = sum(dz), dweight = sum(dz * xhat)
        dx = weight * rstd * (dz - dbias / count - xhat * dweight / count)   (training)
        dx = weight * rstd * dz                                               (inference)

    Parameters
    ----------
    dy, x : ndarray, this process's slice
    mean, rstd, count : what :func:`sync_batch_norm` returned
    weight, bias : as given to the forward; dweight is computed iff weight is
        given, dbias iff bias is given
    comm : the forward's communicator
    reduce_param_grads : bool
        True: dweight and dbias are the whole batch's sums, the same on every
        process (the gradient of a loss summed over the batch). False: this
        process's own sums, as torch.nn.SyncBatchNorm returns them, for a
        data-parallel wrapper that averages parameter gradients itself.
    out : tuple ``(dx, dweight, dbias)`` of preallocated outputs

    Returns
    -------
    dx : ndarray like x;  dweight, dbias : ndarray (C,) of x's dtype, or None

    Notes
    -----
    Communication: one allreduce(sum) of 2 float64 per channel per process
    (in inference, only when dweight or dbias is wanted and
    ``reduce_param_grads``). Memory: reads dy and x twice (sums, then dx),
    writes dx once.
    """
    caller = "sync_batch_norm_backward"
    _check_comm(caller, comm)
    _checks.same_kind(caller, dy=dy, x=x, mean=mean, rstd=rstd, weight=weight, bias=bias, y=y)
    _, dtypes = _backend.dtypes("norm", x, backend=None, caller=caller)
    _checks.array("x", x, caller=caller, dtypes=dtypes, min_ndim=2)
    _check_dy(caller, dy, x)
    training = _checks.flag("training", training, caller=caller)
    reduce_param_grads = _checks.flag("reduce_param_grads", reduce_param_grads, caller=caller)
    ax = _channel_axis(caller, axis, x)
    activation = _checks.choice("activation", activation, caller=caller, choices=_ACTIVATIONS)
    C = x.shape[ax]
    _channel_stat(caller, "mean", mean, C)
    _channel_stat(caller, "rstd", rstd, C)
    if training:
        count = _checks.integer("count", count, caller=caller, ge=0)
    _checks.like("weight", weight, caller=caller, shape=(C,), dtype=x.dtype)
    _checks.like("bias", bias, caller=caller, shape=(C,), dtype=x.dtype)
    if activation is not None:
        _checks.like("y", y, caller=caller, shape=x.shape, dtype=x.dtype, none_ok=False)
    else:
        y = None
    dx, dweight, dbias = _checks.out(caller, out, [
        ("dx", x.shape, x.dtype, x),
        ("dweight", (C,), None if weight is None else x.dtype, None),
        ("dbias", (C,), None if bias is None else x.dtype, None)],
        dict(dy=dy, x=x, mean=mean, rstd=rstd, weight=weight, y=y))
    params = weight is not None or bias is not None
    sums = _empty((2, C), x)
    if training:
        batch_norm_backward_reduce(dy, x, mean, rstd, axis=ax, y=y, activation=activation,
                                   out=(sums[0], sums[1]))
        local = sums.copy() if params and not reduce_param_grads else sums
        comm.allreduce_sum(sums)
        batch_norm_backward_apply(dy, x, mean, rstd, weight, sums[0], sums[1], count=count,
                                  axis=ax, y=y, activation=activation, out=dx)
        sums = local
    else:
        batch_norm_backward_apply(dy, x, mean, rstd, weight, None, None, count=None,
                                  training=False, axis=ax, y=y, activation=activation, out=dx)
        if params:
            batch_norm_backward_reduce(dy, x, mean, rstd, axis=ax, y=y, activation=activation,
                                       out=(sums[0], sums[1]))
            if reduce_param_grads:
                comm.allreduce_sum(sums)
    if dweight is not None:
        dweight[...] = sums[1]
    if dbias is not None:
        dbias[...] = sums[0]
    return dx, dweight, dbias
