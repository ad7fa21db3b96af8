"""Every public function of fastreg, with a valid call: the table that drives the
bad-input battery, the determinism and concurrency tests and the resource checks.

A row (``Api``) knows how to build the keyword arguments of one valid call
(``build(rng, dtype, big)``: NumPy arrays, with ``out=`` buffers where the
function takes them), which of them are arrays the battery may corrupt, which
scalars it may push out of range (``scalars``: name -> kind, see ``BAD_SCALARS``),
and which arrays the call updates in place (``inplace``). Adding a public
function adds a row here; every test built on the table then covers it.

Random ops are given an integer seed (``rng=<int>``, a fresh stream position
each call), so repeated calls must give identical bits.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import math
from dataclasses import dataclass, field

import numpy as np

import fastreg
import fastreg.distributed
import fastreg.random

# --------------------------------------------------------------------------- rows


@dataclass
class Api:
    name: str                    # the caller name in error messages
    fn: object                   # called as fn(**kwargs[, backend=...])
    build: object                # (rng, dtype, big) -> kwargs of a valid call
    arrays: tuple = ()           # array arguments, the first the primary one (x, w, dy, ...)
    scalars: dict = field(default_factory=dict)  # argument -> kind of BAD_SCALARS
    inplace: tuple = ()          # arrays updated in place by a successful call
    family: str = "norm"
    gpu: bool = True             # has CUDA kernels (runs under "cuda_emulator")
    backend_kw: bool = True      # takes backend=
    special: list = field(default_factory=list)  # (id, mutate(kw) -> None, exception, names)
    names: dict = field(default_factory=dict)    # argument -> other names a message may use
    int_arrays: tuple = ()       # integer arrays (class targets): their dtype must be integer
    stat_arrays: tuple = ()      # float32/float64 whatever x's dtype (statistics)

    def call(self, kw, backend=None):
        if self.backend_kw and backend is not None:
            return self.fn(**kw, backend=backend)
        return self.fn(**kw)

    def __repr__(self):
        return self.name


def _f(rng, shape, dtype, scale=1.0, offset=0.0):
    a = np.empty(shape, dtype)
    a[...] = rng.standard_normal(shape) * scale + offset
    return a


def poisoned(shape, dtype):
    a = np.empty(shape, dtype)
    a[...] = np.nan
    return a


def _aux(dtype):
    """Where a builder runs the forward whose saved statistics or mask it needs: the
    reference for the CPU dtypes, the emulated CUDA kernels for 16-bit ones."""
    return "reference" if np.dtype(dtype) in (np.float32, np.float64) else "cuda_emulator"


def _stat(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# shapes: (N, C, L) with C = 6 channels (3 groups of 2), L positions; "big" makes the
# parallel and multi-block paths run (2**17+ elements)
def _ncl(big):
    return (64, 12, 257) if big else (4, 6, 5)


ROW_SHAPE = {False: (5, 7), True: (1001, 257)}


class LocalComm:
    """A one-process communicator for fastreg.distributed (the collectives are copies)."""

    rank, size = 0, 1

    def allgather(self, send, recv):
        recv[0] = send

    def allreduce_sum(self, buf):
        pass


# --------------------------------------------------------------------------- norm rows

def _ln(rng, dt, big):
    x = _f(rng, ROW_SHAPE[big], dt)
    D, M = x.shape[-1], x.shape[0]
    sd = _stat(dt)
    return dict(x=x, weight=_f(rng, D, dt), bias=_f(rng, D, dt), eps=1e-5, normalized_ndim=1,
                out=(poisoned(x.shape, dt), poisoned(M, sd), poisoned(M, sd)))


def _ln_bwd(rng, dt, big):
    f = _ln(rng, dt, big)
    _, m, r = fastreg.layer_norm(f["x"], f["weight"], f["bias"], backend=_aux(dt))
    x = f["x"]
    D = x.shape[-1]
    return dict(dy=_f(rng, x.shape, dt), x=x, mean=m, rstd=r, weight=f["weight"],
                bias=f["bias"], normalized_ndim=1,
                out=(poisoned(x.shape, dt), poisoned(D, dt), poisoned(D, dt)))


def _rms(rng, dt, big):
    x = _f(rng, ROW_SHAPE[big], dt)
    return dict(x=x, weight=_f(rng, x.shape[-1], dt), eps=1e-6, normalized_ndim=1,
                out=(poisoned(x.shape, dt), poisoned(x.shape[0], _stat(dt))))


def _rms_bwd(rng, dt, big):
    f = _rms(rng, dt, big)
    _, r = fastreg.rms_norm(f["x"], f["weight"], backend=_aux(dt))
    x = f["x"]
    return dict(dy=_f(rng, x.shape, dt), x=x, rstd=r, weight=f["weight"], normalized_ndim=1,
                out=(poisoned(x.shape, dt), poisoned(x.shape[-1], dt)))


def _bn(rng, dt, big):
    x = _f(rng, _ncl(big), dt)
    C, sd = x.shape[1], _stat(dt)
    return dict(x=x, weight=_f(rng, C, dt), bias=_f(rng, C, dt),
                running_mean=_f(rng, C, np.float32), running_var=np.ones(C, np.float32),
                training=True, momentum=0.1, eps=1e-5, axis=1, activation="relu",
                out=(poisoned(x.shape, dt), poisoned(C, sd), poisoned(C, sd)))


def _bn_bwd(rng, dt, big):
    f = _bn(rng, dt, big)
    y, m, r = fastreg.batch_norm(f["x"], f["weight"], f["bias"], activation="relu",
                                 backend=_aux(dt))
    x, C = f["x"], f["x"].shape[1]
    return dict(dy=_f(rng, x.shape, dt), x=x, mean=m, rstd=r, weight=f["weight"],
                bias=f["bias"], training=True, axis=1, y=y, activation="relu",
                out=(poisoned(x.shape, dt), poisoned(C, dt), poisoned(C, dt)))


def _bn_stats(rng, dt, big):
    x = _f(rng, _ncl(big), dt)
    C = x.shape[1]
    return dict(x=x, axis=1, out=tuple(poisoned(C, np.float64) for _ in range(3)))


def _bn_combine(rng, dt, big):
    C = 6
    counts = np.array([[5.0] * C, [7.0] * C])
    return dict(counts=counts, means=_f(rng, (2, C), np.float64),
                m2s=np.abs(_f(rng, (2, C), np.float64)) * 4,
                out=tuple(poisoned(C, np.float64) for _ in range(3)))


def _bn_apply(rng, dt, big):
    x = _f(rng, _ncl(big), dt)
    C = x.shape[1]
    count = x.size // C
    return dict(x=x, mean=_f(rng, C, np.float64), var=np.abs(_f(rng, C, np.float64)) + 0.5,
                weight=_f(rng, C, dt), bias=_f(rng, C, dt),
                running_mean=_f(rng, C, np.float32), running_var=np.ones(C, np.float32),
                count=count, momentum=0.1, eps=1e-5, axis=1, activation=None,
                out=(poisoned(x.shape, dt), poisoned(C, np.float64)))


def _bn_bwd_reduce(rng, dt, big):
    f = _bn_bwd(rng, dt, big)
    C = f["x"].shape[1]
    return dict(dy=f["dy"], x=f["x"], mean=f["mean"], rstd=f["rstd"], axis=1, y=f["y"],
                activation="relu", out=(poisoned(C, np.float64), poisoned(C, np.float64)))


def _bn_bwd_apply(rng, dt, big):
    f = _bn_bwd(rng, dt, big)
    x = f["x"]
    C = x.shape[1]
    return dict(dy=f["dy"], x=x, mean=f["mean"], rstd=f["rstd"], weight=f["weight"],
                sum_dy=_f(rng, C, np.float64), sum_dy_xhat=_f(rng, C, np.float64),
                count=x.size // C, training=True, axis=1, y=f["y"], activation="relu",
                out=poisoned(x.shape, dt))


def _gn(rng, dt, big):
    x = _f(rng, _ncl(big), dt)
    N, C, sd = x.shape[0], x.shape[1], _stat(dt)
    return dict(x=x, num_groups=3, weight=_f(rng, C, dt), bias=_f(rng, C, dt), eps=1e-5,
                axis=1, out=(poisoned(x.shape, dt), poisoned((N, 3), sd), poisoned((N, 3), sd)))


def _gn_bwd(rng, dt, big):
    f = _gn(rng, dt, big)
    _, m, r = fastreg.group_norm(f["x"], 3, f["weight"], f["bias"], backend=_aux(dt))
    x, C = f["x"], f["x"].shape[1]
    return dict(dy=_f(rng, x.shape, dt), x=x, mean=m, rstd=r, num_groups=3,
                weight=f["weight"], bias=f["bias"], axis=1,
                out=(poisoned(x.shape, dt), poisoned(C, dt), poisoned(C, dt)))


def _in(rng, dt, big):
    x = _f(rng, _ncl(big), dt)
    N, C, sd = x.shape[0], x.shape[1], _stat(dt)
    return dict(x=x, weight=_f(rng, C, dt), bias=_f(rng, C, dt),
                running_mean=_f(rng, C, np.float32), running_var=np.ones(C, np.float32),
                use_input_stats=True, momentum=0.1, eps=1e-5, axis=1,
                out=(poisoned(x.shape, dt), poisoned((N, C), sd), poisoned((N, C), sd)))


def _in_bwd(rng, dt, big):
    f = _in(rng, dt, big)
    _, m, r = fastreg.instance_norm(f["x"], f["weight"], f["bias"], backend=_aux(dt))
    x, C = f["x"], f["x"].shape[1]
    return dict(dy=_f(rng, x.shape, dt), x=x, mean=m, rstd=r, weight=f["weight"],
                bias=f["bias"], use_input_stats=True, axis=1,
                out=(poisoned(x.shape, dt), poisoned(C, dt), poisoned(C, dt)))


def _sync_bn(rng, dt, big):
    f = _bn(rng, dt, big)
    f.pop("out")
    C = f["x"].shape[1]
    f["out"] = (poisoned(f["x"].shape, dt), poisoned(C, np.float64), poisoned(C, np.float64))
    f["comm"] = LocalComm()
    return f


def _sync_bn_bwd(rng, dt, big):
    f = _bn(rng, dt, big)
    with fastreg.use_backend(_aux(dt)):
        y, m, r, n = fastreg.distributed.sync_batch_norm(f["x"], f["weight"], f["bias"],
                                                         comm=LocalComm(), activation="relu")
    x, C = f["x"], f["x"].shape[1]
    return dict(dy=_f(rng, x.shape, dt), x=x, mean=m, rstd=r, count=n, weight=f["weight"],
                bias=f["bias"], comm=LocalComm(), training=True, axis=1, y=y,
                activation="relu", reduce_param_grads=True,
                out=(poisoned(x.shape, dt), poisoned(C, dt), poisoned(C, dt)))


def _groups_special():
    return [("groups-do-not-divide", lambda kw: kw.update(num_groups=4), ValueError,
             ("num_groups",))]


NORM = [
    Api("layer_norm", fastreg.layer_norm, _ln, ("x", "weight", "bias"),
        {"eps": "pos", "normalized_ndim": "ndim"}),
    Api("layer_norm_backward", fastreg.layer_norm_backward, _ln_bwd,
        ("x", "dy", "mean", "rstd", "weight", "bias"), {"normalized_ndim": "ndim"}),
    Api("rms_norm", fastreg.rms_norm, _rms, ("x", "weight"),
        {"eps": "pos", "normalized_ndim": "ndim"}),
    Api("rms_norm_backward", fastreg.rms_norm_backward, _rms_bwd, ("x", "dy", "rstd", "weight"),
        {"normalized_ndim": "ndim"}),
    Api("batch_norm", fastreg.batch_norm, _bn,
        ("x", "weight", "bias", "running_mean", "running_var"),
        {"eps": "pos", "momentum": "unit", "training": "flag", "axis": "axis",
         "activation": "activation"}, inplace=("running_mean", "running_var"),
        stat_arrays=("running_mean", "running_var")),
    Api("batch_norm_backward", fastreg.batch_norm_backward, _bn_bwd,
        ("x", "dy", "mean", "rstd", "weight", "bias", "y"),
        {"training": "flag", "axis": "axis", "activation": "activation"}),
    Api("batch_norm_stats", fastreg.batch_norm_stats, _bn_stats, ("x",), {"axis": "axis"}),
    Api("batch_norm_combine", fastreg.batch_norm_combine, _bn_combine,
        ("counts", "means", "m2s"), {},
        special=[("negative-count", lambda kw: kw.update(counts=-kw["counts"]), ValueError,
                  ("counts",))],
        stat_arrays=("counts", "means", "m2s")),
    Api("batch_norm_apply", fastreg.batch_norm_apply, _bn_apply,
        ("x", "mean", "var", "weight", "bias", "running_mean", "running_var"),
        {"eps": "pos", "momentum": "unit", "count": "count", "axis": "axis",
         "activation": "activation"}, inplace=("running_mean", "running_var"),
        stat_arrays=("mean", "var", "running_mean", "running_var")),
    Api("batch_norm_backward_reduce", fastreg.batch_norm_backward_reduce, _bn_bwd_reduce,
        ("x", "dy", "mean", "rstd", "y"), {"axis": "axis", "activation": "activation"},
        stat_arrays=("mean", "rstd")),
    Api("batch_norm_backward_apply", fastreg.batch_norm_backward_apply, _bn_bwd_apply,
        ("x", "dy", "mean", "rstd", "weight", "sum_dy", "sum_dy_xhat", "y"),
        {"count": "count", "training": "flag", "axis": "axis", "activation": "activation"},
        stat_arrays=("mean", "rstd", "sum_dy", "sum_dy_xhat")),
    Api("group_norm", fastreg.group_norm, _gn, ("x", "weight", "bias"),
        {"eps": "pos", "num_groups": "int_pos", "axis": "end_axis"},
        special=_groups_special()),
    Api("group_norm_backward", fastreg.group_norm_backward, _gn_bwd,
        ("x", "dy", "mean", "rstd", "weight", "bias"),
        {"num_groups": "int_pos", "axis": "end_axis"}, special=_groups_special()),
    Api("instance_norm", fastreg.instance_norm, _in,
        ("x", "weight", "bias", "running_mean", "running_var"),
        {"eps": "pos", "momentum": "unit", "use_input_stats": "flag", "axis": "end_axis"},
        inplace=("running_mean", "running_var"), stat_arrays=("running_mean", "running_var")),
    Api("instance_norm_backward", fastreg.instance_norm_backward, _in_bwd,
        ("x", "dy", "mean", "rstd", "weight", "bias"),
        {"use_input_stats": "flag", "axis": "end_axis"}),
    Api("sync_batch_norm", fastreg.distributed.sync_batch_norm, _sync_bn,
        ("x", "weight", "bias", "running_mean", "running_var"),
        {"eps": "pos", "momentum": "unit", "training": "flag", "axis": "axis",
         "activation": "activation"}, inplace=("running_mean", "running_var"),
        backend_kw=False, stat_arrays=("running_mean", "running_var"),
        special=[("comm-not-a-communicator", lambda kw: kw.update(comm=object()), TypeError,
                  ("comm",))]),
    Api("sync_batch_norm_backward", fastreg.distributed.sync_batch_norm_backward, _sync_bn_bwd,
        ("x", "dy", "mean", "rstd", "weight", "bias", "y"),
        {"count": "int_count", "training": "flag", "axis": "axis",
         "activation": "activation", "reduce_param_grads": "flag"},
        backend_kw=False, stat_arrays=("mean", "rstd")),
]


# --------------------------------------------------------------------------- dropout rows

SEED = 2**33 + 17


def _dropout(rng, dt, big):
    x = _f(rng, (300, 1031) if big else (7, 9), dt)
    return dict(x=x, p=0.3, rng=SEED, training=True, mode="inverted", mask="bits",
                out=(poisoned(x.shape, dt), np.zeros(-(-x.size // 32), np.uint32)))


def _dropout_bwd(rng, dt, big):
    f = _dropout(rng, dt, big)
    _, mask = fastreg.dropout(f["x"], 0.3, rng=SEED, backend=_aux(dt))
    return dict(dy=_f(rng, f["x"].shape, dt), mask=mask, out=poisoned(f["x"].shape, dt))


def _noise(rng, dt, big):
    x = _dropout(rng, dt, big)["x"]
    return dict(x=x, std=0.5, rng=SEED, training=True, out=poisoned(x.shape, dt))


def _gdrop(rng, dt, big):
    x = _dropout(rng, dt, big)["x"]
    return dict(x=x, p=0.3, rng=SEED, training=True, out=poisoned(x.shape, dt))


def _gdrop_bwd(rng, dt, big):
    x = _dropout(rng, dt, big)["x"]
    _, mask = fastreg.gaussian_dropout(x, 0.3, rng=SEED, backend=_aux(dt))
    return dict(dy=_f(rng, x.shape, dt), mask=mask, out=poisoned(x.shape, dt))


def _linear(rng, dt, big):
    N, K, O = (256, 257, 129) if big else (5, 7, 3)
    return _f(rng, (N, K), dt), _f(rng, (O, K), dt) / math.sqrt(K), _f(rng, O, dt)


def _dc(rng, dt, big):
    x, w, b = _linear(rng, dt, big)
    return dict(x=x, weight=w, bias=b, p=0.3, rng=SEED, per_example=True, training=True,
                mode="inverted", out=poisoned((x.shape[0], w.shape[0]), dt))


def _dc_bwd(rng, dt, big):
    x, w, b = _linear(rng, dt, big)
    _, mask = fastreg.drop_connect(x, w, b, 0.3, rng=SEED, per_example=True,
                                   backend=_aux(dt))
    return dict(dy=_f(rng, (x.shape[0], w.shape[0]), dt), x=x, weight=w, mask=mask,
                out=(poisoned(x.shape, dt), poisoned(w.shape, dt), poisoned(w.shape[0], dt)))


def _dc_inf(rng, dt, big):
    x, w, b = _linear(rng, dt, big)
    return dict(x=x, weight=w, bias=b, p=0.3, activation="relu", n_samples=5, rng=SEED,
                mode="inverted", out=poisoned((x.shape[0], w.shape[0]), dt))


def _dal(rng, dt, big):
    x = _f(rng, ROW_SHAPE[big], dt)
    M, D, sd = x.shape[0], x.shape[1], _stat(dt)
    return dict(x=x, residual=_f(rng, x.shape, dt), weight=_f(rng, D, dt), bias=_f(rng, D, dt),
                p=0.3, rng=SEED, eps=1e-5, training=True, mode="inverted", mask="bits",
                normalized_ndim=1,
                out=(poisoned(x.shape, dt), poisoned(x.shape, dt), poisoned(M, sd),
                     poisoned(M, sd), np.zeros(-(-x.size // 32), np.uint32)))


def _dal_bwd(rng, dt, big):
    f = _dal(rng, dt, big)
    _, s, m, r, mask = fastreg.dropout_add_layer_norm(
        f["x"], f["residual"], f["weight"], f["bias"], 0.3, rng=SEED, mask="bits",
        backend=_aux(dt))
    x, D = f["x"], f["x"].shape[1]
    return dict(dy=_f(rng, x.shape, dt), residual_sum=s, mean=m, rstd=r, weight=f["weight"],
                bias=f["bias"], mask=mask, dresidual_sum=_f(rng, x.shape, dt), normalized_ndim=1,
                out=(poisoned(x.shape, dt), poisoned(x.shape, dt), poisoned(D, dt),
                     poisoned(D, dt)))


DROPOUT = [
    Api("dropout", fastreg.dropout, _dropout, ("x",),
        {"p": "unit", "rng": "rng", "training": "flag", "mode": "mode", "mask": "mask_kind"},
        family="dropout"),
    Api("dropout_backward", fastreg.dropout_backward, _dropout_bwd, ("dy",),
        {"mask": "mask_obj"}, family="dropout", names={"dy": ("mask",)}),
    Api("gaussian_noise", fastreg.gaussian_noise, _noise, ("x",),
        {"std": "nonneg", "rng": "rng", "training": "flag"}, family="dropout"),
    Api("gaussian_dropout", fastreg.gaussian_dropout, _gdrop, ("x",),
        {"p": "unit_open", "rng": "rng", "training": "flag"}, family="dropout"),
    Api("gaussian_dropout_backward", fastreg.gaussian_dropout_backward, _gdrop_bwd, ("dy",),
        {"mask": "mask_obj"}, family="dropout", names={"dy": ("mask",)}),
    Api("drop_connect", fastreg.drop_connect, _dc, ("x", "weight", "bias"),
        {"p": "unit", "rng": "rng", "per_example": "flag", "training": "flag", "mode": "mode"},
        family="dropout", names={"weight": ("x",)}),
    Api("drop_connect_backward", fastreg.drop_connect_backward, _dc_bwd,
        ("x", "dy", "weight"), {"mask": "mask_obj"}, family="dropout",
        names={"weight": ("x", "mask"), "dy": ("mask",)}),
    Api("drop_connect_inference", fastreg.drop_connect_inference, _dc_inf,
        ("x", "weight", "bias"),
        {"p": "unit_open", "activation": "dc_activation", "n_samples": "int_pos",
         "rng": "rng_required", "mode": "mode"}, family="dropout", names={"weight": ("x",)}),
    Api("dropout_add_layer_norm", fastreg.dropout_add_layer_norm, _dal,
        ("x", "residual", "weight", "bias"),
        {"p": "unit", "rng": "rng", "eps": "pos", "training": "flag", "mode": "mode",
         "mask": "mask_kind", "normalized_ndim": "ndim"}, family="dropout"),
    Api("dropout_add_layer_norm_backward", fastreg.dropout_add_layer_norm_backward, _dal_bwd,
        ("residual_sum", "dy", "mean", "rstd", "weight", "bias", "dresidual_sum"),
        {"mask": "mask_obj", "normalized_ndim": "ndim"}, family="dropout"),
]


# --------------------------------------------------------------------------- random rows

def _philox(rng, dt, big):
    n = 4096 if big else 5
    counter = rng.integers(0, 2**32, (n, 4), dtype=np.uint64).astype(np.uint32)
    return dict(counter=counter, key=np.array([7, 9], np.uint32),
                out=np.zeros((n, 4), np.uint32))


def _bits(rng, dt, big):
    shape = (513, 257) if big else (3, 5)
    return dict(shape=shape, rng=SEED, out=np.zeros(shape, np.uint32))


def _uniform(rng, dt, big):
    shape = (513, 257) if big else (3, 5)
    return dict(shape=shape, rng=SEED, dtype=dt, out=poisoned(shape, dt))


RANDOM = [
    Api("philox4x32", fastreg.random.philox4x32, _philox, ("counter", "key"), {},
        family="random", int_arrays=("counter", "key")),
    Api("random_bits", fastreg.random.random_bits, _bits, (), {"rng": "rng_required"},
        family="random",
        special=[("negative-shape", lambda kw: kw.update(shape=(-1, 3)), ValueError,
                  ("shape",)),
                 ("shape-of-floats", lambda kw: kw.update(shape=(1.5, 3)), TypeError,
                  ("shape",))]),
    Api("uniform", fastreg.random.uniform, _uniform, (), {"rng": "rng_required"},
        family="random",
        special=[("dtype-int", lambda kw: kw.update(dtype=np.int32, out=None), TypeError,
                  ("dtype",))]),
    Api("normal", fastreg.random.normal, _uniform, (), {"rng": "rng_required"},
        family="random",
        special=[("dtype-complex", lambda kw: kw.update(dtype=np.complex64, out=None),
                  TypeError, ("dtype",))]),
]


# --------------------------------------------------------------------------- prox rows

def _w(rng, dt, big):
    return _f(rng, (257, 1025) if big else (4, 6), dt)


def _prox_l1(rng, dt, big):
    w = _w(rng, dt, big)
    return dict(w=w, threshold=0.3, out=poisoned(w.shape, dt))


def _prox_en(rng, dt, big):
    w = _w(rng, dt, big)
    return dict(w=w, l1=0.3, l2=0.5, out=poisoned(w.shape, dt))


def _prox_group(rng, dt, big):
    w = _w(rng, dt, big)
    return dict(w=w, threshold=1.5, axis=1, out=poisoned(w.shape, dt))


def _max_norm(rng, dt, big):
    w = _w(rng, dt, big)
    return dict(w=w, max_value=1.5, axis=1, eps=1e-7, out=poisoned(w.shape, dt))


def _sgd(rng, dt, big):
    w = _w(rng, dt, big)
    return dict(w=w, g=_f(rng, w.shape, dt), lr=0.1, momentum=0.9, dampening=0.1,
                nesterov=False, maximize=False, weight_decay=0.01, decoupled_weight_decay=0.02,
                l1=0.05, momentum_buffer=_f(rng, w.shape, dt), first_step=False)


def _adam(rng, dt, big):
    w = _w(rng, dt, big)
    return dict(w=w, g=_f(rng, w.shape, dt), exp_avg=_f(rng, w.shape, dt) * 0.1,
                exp_avg_sq=np.abs(_f(rng, w.shape, dt)), step=3, lr=0.01, betas=(0.9, 0.999),
                eps=1e-8, weight_decay=0.01, amsgrad=True,
                max_exp_avg_sq=np.abs(_f(rng, w.shape, dt)) + 1, l1=0.01, maximize=False)


def _ce(rng, dt, big):
    N, K = (512, 1031) if big else (5, 7)
    logits = _f(rng, (N, K), dt)
    target = rng.integers(0, K, N)
    target[1] = -100
    return dict(logits=logits, target=target, smoothing=0.1, reduction="mean",
                ignore_index=-100, style="uniform",
                out=(poisoned((), dt), poisoned((N, K), dt)))


def _standardize(rng, dt, big):
    x = _f(rng, (1000, 129) if big else (9, 4), dt, 2.0, 3.0)
    D = x.shape[1]
    return dict(x=x, axis=0, eps=1e-6, out=(poisoned(x.shape, dt), poisoned(D, dt),
                                             poisoned(D, dt)))


def _minmax(rng, dt, big):
    x = _f(rng, (1000, 129) if big else (9, 4), dt, 2.0, 3.0)
    D = x.shape[1]
    return dict(x=x, axis=0, feature_range=(-1.0, 2.0),
                out=(poisoned(x.shape, dt), poisoned(D, dt), poisoned(D, dt)))


_STATE = ("w", "g", "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _listed(change):
    """The list form of an optimizer step (every tensor argument a list of one), then
    ``change(kw)`` breaks one list."""
    def mutate(kw):
        for k in _STATE:
            if k in kw:
                kw[k] = [kw[k]]
        change(kw)
    return mutate


_STEP_SPECIAL = [
    ("w-list-g-array", lambda kw: kw.update(w=[kw["w"]]), TypeError, ("g",)),
    ("g-is-w", lambda kw: kw.update(g=kw["w"]), ValueError, ("g", "w")),
    ("list-g-too-long", _listed(lambda kw: kw["g"].append(kw["g"][0].copy())), ValueError,
     ("g",)),
    ("list-w-entry-not-an-array", _listed(lambda kw: kw["w"].__setitem__(0, 3.0)), TypeError,
     ("w[0]",)),
    ("list-g-entry-float64", _listed(lambda kw: kw["g"].__setitem__(0, kw["g"][0].astype(
        np.float64))), TypeError, ("g[0]",)),
    ("list-w-twice", _listed(lambda kw: [kw[k].append(kw[k][0] if k == "w" else kw[k][0].copy())
                                         for k in _STATE if k in kw]),
     ValueError, ("w[1]", "w[0]")),
]

PROX = [
    Api("prox_l1", fastreg.prox_l1, _prox_l1, ("w",), {"threshold": "nonneg"}, family="prox",
        special=[("out-partial-overlap", lambda kw: kw.update(out=kw["w"][:, ::-1]),
                  ValueError, ("out",))]),
    Api("prox_elastic_net", fastreg.prox_elastic_net, _prox_en, ("w",),
        {"l1": "nonneg", "l2": "nonneg"}, family="prox"),
    Api("prox_group_l1", fastreg.prox_group_l1, _prox_group, ("w",),
        {"threshold": "nonneg", "axis": "axes"}, family="prox"),
    Api("max_norm", fastreg.max_norm, _max_norm, ("w",),
        {"max_value": "pos", "eps": "nonneg", "axis": "axes"}, family="prox"),
    Api("sgd_step", fastreg.sgd_step, _sgd, ("w", "g", "momentum_buffer"),
        {"lr": "nonneg", "momentum": "nonneg", "dampening": "real", "nesterov": "flag",
         "maximize": "flag", "weight_decay": "nonneg", "decoupled_weight_decay": "nonneg",
         "l1": "nonneg", "first_step": "flag"}, inplace=("w", "momentum_buffer"),
        family="prox",
        special=_STEP_SPECIAL + [
            ("nesterov-with-dampening", lambda kw: kw.update(nesterov=True), ValueError,
             ("nesterov",)),
            ("buffer-is-g", lambda kw: kw.update(momentum_buffer=kw["g"]), ValueError,
             ("momentum_buffer", "g"))]),
    Api("adam_step", fastreg.adam_step, _adam,
        ("w", "g", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        {"step": "int_pos", "lr": "nonneg", "betas": "betas", "eps": "nonneg",
         "weight_decay": "nonneg", "amsgrad": "flag", "l1": "nonneg", "maximize": "flag"},
        inplace=("w", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), family="prox",
        special=_STEP_SPECIAL + [
            ("exp_avg-aliases-exp_avg_sq",
             lambda kw: kw.update(exp_avg_sq=kw["exp_avg"]), ValueError,
             ("exp_avg_sq", "exp_avg"))]),
    Api("adamw_step", fastreg.adamw_step, _adam,
        ("w", "g", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        {"step": "int_pos", "lr": "nonneg", "betas": "betas", "eps": "nonneg",
         "weight_decay": "nonneg", "amsgrad": "flag", "l1": "nonneg", "maximize": "flag"},
        inplace=("w", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), family="prox",
        special=_STEP_SPECIAL),
    Api("cross_entropy_label_smoothing", fastreg.cross_entropy_label_smoothing, _ce,
        ("logits", "target"),
        {"smoothing": "unit", "reduction": "reduction", "style": "style",
         "ignore_index": "int_or_none"}, family="prox", int_arrays=("target",),
        special=[("target-out-of-range",
                  lambda kw: kw.update(target=np.where(np.arange(kw["target"].size) == 0, 10**6,
                                                       kw["target"])),
                  ValueError, ("target",))]),
    Api("standardize", fastreg.standardize, _standardize, ("x",),
        {"eps": "nonneg", "axis": "axes"}, family="prox",
        special=[("std-zero", lambda kw: kw.update(
            mean=np.zeros(kw["x"].shape[1], kw["x"].dtype),
            std=np.zeros(kw["x"].shape[1], kw["x"].dtype), out=(kw["out"][0], None, None)),
            ValueError, ("std",))]),
    Api("min_max_scale", fastreg.min_max_scale, _minmax, ("x",),
        {"feature_range": "feature_range", "axis": "axes"}, family="prox"),
]


ALL = NORM + DROPOUT + RANDOM + PROX
BY_NAME = {api.name: api for api in ALL}


def public_functions():
    """Every public function of fastreg (and of fastreg.random / fastreg.distributed)."""
    names = {n for n in fastreg.__all__
             if callable(getattr(fastreg, n)) and not isinstance(getattr(fastreg, n), type)}
    names.discard("use_backend")
    names |= {"philox4x32", "random_bits", "uniform", "normal",
              "sync_batch_norm", "sync_batch_norm_backward"}
    return names


# --------------------------------------------------------------------------- helpers

def arrays_in(value):
    """Every NumPy array reachable from a value (kwargs, tuples, lists, masks)."""
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from arrays_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from arrays_in(v)
    elif isinstance(value, (fastreg.DropoutMask, fastreg.GaussianMask)):
        if getattr(value, "bits", None) is not None:
            yield value.bits


def fingerprint(value):
    """A hash of every array reachable from ``value`` (contents, shape, strides, dtype)
    and of the state of any Generator in it."""
    h = hashlib.sha256()
    for a in arrays_in(value):
        if a.dtype == object:
            h.update(repr(a.tolist()).encode())
        else:
            h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
        h.update(repr((a.shape, a.strides, a.dtype.str)).encode())
    gens = [v for v in (value.values() if isinstance(value, dict) else ())
            if isinstance(v, fastreg.random.Generator)]
    h.update(repr([g.state for g in gens]).encode())
    return h.hexdigest()


def results(api, kw, res):
    """The arrays a call produced: its returns (masks as their stream position and bits)
    and the arrays it updated in place, as a flat list for bitwise comparisons."""
    flat = []

    def walk(v):
        if isinstance(v, np.ndarray):
            flat.append(v)
        elif isinstance(v, (list, tuple)):
            for e in v:
                walk(e)
        elif isinstance(v, (fastreg.DropoutMask, fastreg.GaussianMask)):
            flat.append(np.array([v.seed or 0, v.offset or 0], np.uint64))
            if getattr(v, "bits", None) is not None:
                flat.append(v.bits)
        elif isinstance(v, (int, float)):
            flat.append(np.array(v))
    walk(res)
    for name in api.inplace:
        walk(kw[name])
    return [np.array(a, copy=True) for a in flat]


def fresh(kw):
    """A deep copy of a call's arguments (in-place updates of one call do not leak)."""
    return copy.deepcopy(kw)


def runs_on(api, backend):
    """Whether ``backend`` implements this row (the CUDA backends list what they do not)."""
    if backend in ("cuda", "cuda_emulator"):
        if not api.gpu:
            return False
        module = importlib.import_module(f"fastreg.cuda.{api.family}")
        return api.name not in getattr(module, "UNSUPPORTED", ())
    return True


def on_device(kw):
    """A copy of a call's arguments with every NumPy array (in tuples and masks too) on
    the GPU (CuPy), for the "cuda" backend."""
    import cupy

    def move(v):
        if isinstance(v, np.ndarray):
            return cupy.asarray(v)
        if isinstance(v, tuple) and any(isinstance(e, np.ndarray) for e in v):
            return tuple(move(e) for e in v)
        if isinstance(v, (fastreg.DropoutMask, fastreg.GaussianMask)) and \
                getattr(v, "bits", None) is not None:
            m = copy.copy(v)
            m.bits = cupy.asarray(v.bits)
            return m
        return v
    return {k: move(v) for k, v in fresh(kw).items()}


def build(api, dtype=np.float32, big=False, seed=0):
    return api.build(np.random.default_rng([seed, *api.name.encode()]), np.dtype(dtype), big)
