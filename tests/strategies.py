"""Hypothesis strategies for every op family, shared by the CPU and the GPU tests.

A strategy draws a ``Call``: one public function with keyword arguments of
random shapes (0- and 1-sized dimensions included), layouts (contiguous,
strided, transposed storage, reversed), dtypes (from the ``dtypes`` given:
the CPU tests pass float32/float64, the GPU tests add float16/bfloat16),
weights present or absent, and scalars at the edges of their ranges (eps
tiny and large, momentum 0 and 1, p 0 and near 1, thresholds 0 and huge).
Array values come from a NumPy generator seeded by hypothesis (fast, and
shrinks to small seeds).

``Call.run(backend)`` calls the function on its own deep copy of the
arguments and returns the results and the arrays it updated in place;
``compare(got, ref, ...)`` checks two runs against each other.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

import fastreg
from _assert import assert_bitwise, assert_close, tol

SEEDS = st.integers(0, 2**32 - 1)
LAYOUTS = st.sampled_from(["contig", "strided", "transposed", "reversed"])
SIZES = st.one_of(st.integers(0, 6), st.sampled_from([1, 7, 17, 33]))
EPS = st.sampled_from([1e-12, 1e-6, 1e-5, 0.1, 1e3])
MOMENTUM = st.sampled_from([0.0, 0.1, 1.0])
P = st.sampled_from([0.0, 1e-7, 0.3, 0.5, 0.999])
# norm forwards: y = x * (rstd * w) + (b - mean * rstd * w) is how the kernels apply
# the statistics (one multiply-add per element); its rounding is eps * |x| * rstd * |w|,
# beyond the tolerances where eps is tiny and a row nearly constant (rstd ~ 1e6)
FOLDED = {"folded": True}
# dropout + add + LayerNorm normalizes the residual sum as stored (in x's dtype), so its
# float32 statistics of 16-bit inputs carry the sum's rounding
ROUNDED_SUM = {"rounded_sum": True}


@dataclass
class Call:
    name: str
    fn: object
    kwargs: dict
    inplace: tuple = ()
    bitwise: tuple = ()            # result indices compared bit for bit (masks, bits)
    kind: str = "out"              # tolerance kind of the float results: "out" or "grad"
    dtype: object = np.float32
    extra: dict = field(default_factory=dict)

    def run(self, backend):
        if backend == "cuda":            # CuPy arrays in, NumPy arrays out
            from api_table import on_device
            kw = on_device(self.kwargs)
        else:
            kw = copy.deepcopy(self.kwargs)
        res = self.fn(**kw, backend=backend)
        moved = [kw[k] for k in self.inplace]
        if "generator" in self.extra:    # the stream position the call leaves behind
            moved.append(np.array(kw[self.extra["generator"]].state, np.uint64))
        return to_host(res), to_host(moved)

    def __repr__(self):
        def show(v):
            if isinstance(v, np.ndarray):
                return f"array{v.shape}:{v.dtype}:{'C' if v.flags.c_contiguous else v.strides}"
            return repr(v)
        return f"{self.name}({', '.join(f'{k}={show(v)}' for k, v in self.kwargs.items())})"


def to_host(value):
    """value with every CuPy array (in tuples, lists and masks too) copied to NumPy."""
    if type(value).__module__.split(".")[0] == "cupy" and hasattr(value, "get"):
        return value.get()
    if isinstance(value, tuple):
        return tuple(to_host(v) for v in value)
    if isinstance(value, list):
        return [to_host(v) for v in value]
    if isinstance(value, (fastreg.DropoutMask, fastreg.GaussianMask)) and \
            getattr(value, "bits", None) is not None and not isinstance(value.bits, np.ndarray):
        m = copy.copy(value)
        m.bits = value.bits.get()
        return m
    return value


def place(rng, shape, dtype, layout="contig", scale=1.0, offset=0.0):
    """Random normal values of ``shape`` in the given storage layout."""
    shape = tuple(shape)
    if layout == "strided" and shape:
        a = np.empty((*shape[:-1], 2 * shape[-1]), dtype)[..., ::2]
    elif layout == "transposed" and len(shape) > 1:
        a = np.empty(shape[::-1], dtype).T
    elif layout == "reversed" and shape:
        a = np.empty(shape, dtype)[..., ::-1]
    else:
        a = np.empty(shape, dtype)
    a[...] = rng.standard_normal(shape) * scale + offset
    return a


def _aux(dtype):
    """Where a strategy runs the forward whose saved state a backward needs."""
    return "reference" if np.dtype(dtype) in (np.float32, np.float64) else "cuda_emulator"


def _shape(draw, min_ndim, max_ndim):
    ndim = draw(st.integers(min_ndim, max_ndim))
    return tuple(draw(st.lists(SIZES, min_size=ndim, max_size=ndim)))


def _maybe(draw, rng, shape, dtype):
    return place(rng, shape, dtype) if draw(st.booleans()) else None


# --------------------------------------------------------------------------- norm

@st.composite
def row_norm_calls(draw, dtypes, backward=None):
    """layer_norm / rms_norm and their backward (normalized_ndim, weight, bias, eps)."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(SEEDS))
    shape = _shape(draw, 1, 3)
    k = draw(st.integers(1, len(shape)))
    x = place(rng, shape, dtype, draw(LAYOUTS))
    rms = draw(st.booleans())
    w = _maybe(draw, rng, shape[len(shape) - k:], dtype)
    b = None if rms else _maybe(draw, rng, shape[len(shape) - k:], dtype)
    eps = draw(EPS)
    if rms:
        fwd = Call("rms_norm", fastreg.rms_norm, dict(x=x, weight=w, eps=eps, normalized_ndim=k),
                   dtype=dtype, extra=FOLDED)
    else:
        fwd = Call("layer_norm", fastreg.layer_norm,
                   dict(x=x, weight=w, bias=b, eps=eps, normalized_ndim=k), dtype=dtype,
                   extra=FOLDED)
    if not (draw(st.booleans()) if backward is None else backward):
        return fwd
    stats = fwd.run("reference")[0][1:]
    dy = place(rng, shape, dtype, draw(LAYOUTS))
    if rms:
        return Call("rms_norm_backward", fastreg.rms_norm_backward,
                    dict(dy=dy, x=x, rstd=stats[0], weight=w, normalized_ndim=k), kind="grad",
                    dtype=dtype, extra=FOLDED)
    return Call("layer_norm_backward", fastreg.layer_norm_backward,
                dict(dy=dy, x=x, mean=stats[0], rstd=stats[1], weight=w, bias=b,
                     normalized_ndim=k), kind="grad", dtype=dtype, extra=FOLDED)


def _channel_x(draw, rng, dtype, C, min_spatial=0):
    N = draw(SIZES)
    spatial = _shape(draw, min_spatial, 2)
    axis = draw(st.sampled_from([1, -1]))
    shape = (N, C, *spatial) if axis == 1 else (N, *spatial, C)
    return place(rng, shape, dtype, draw(LAYOUTS)), axis


@st.composite
def batch_norm_calls(draw, dtypes, backward=None):
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(SEEDS))
    C = draw(st.integers(1, 5))
    x, axis = _channel_x(draw, rng, dtype, C)
    training = draw(st.booleans())
    running = (not training) or draw(st.booleans())
    rm = rng.standard_normal(C).astype(np.float32) if running else None
    rv = rng.uniform(0.5, 2.0, C).astype(np.float32) if running else None
    activation = draw(st.sampled_from([None, "relu"]))
    w, b = _maybe(draw, rng, (C,), dtype), _maybe(draw, rng, (C,), dtype)
    kw = dict(x=x, weight=w, bias=b, running_mean=rm, running_var=rv, training=training,
              momentum=draw(MOMENTUM), eps=draw(EPS), axis=axis, activation=activation)
    fwd = Call("batch_norm", fastreg.batch_norm, kw,
               inplace=("running_mean", "running_var") if running else (), dtype=dtype,
               extra=FOLDED)
    if not (draw(st.booleans()) if backward is None else backward):
        return fwd
    try:
        y, mean, rstd = fwd.run("reference")[0]
    except ValueError:      # e.g. no elements per channel in training: the forward's error
        return fwd
    return Call("batch_norm_backward", fastreg.batch_norm_backward,
                dict(dy=place(rng, x.shape, dtype), x=x, mean=mean, rstd=rstd, weight=w,
                     bias=b, training=training, axis=axis, activation=activation,
                     y=y if activation else None), kind="grad", dtype=dtype, extra=FOLDED)


@st.composite
def group_norm_calls(draw, dtypes, backward=None):
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(SEEDS))
    G = draw(st.integers(1, 3))
    C = G * draw(st.integers(1, 3))
    x, axis = _channel_x(draw, rng, dtype, C)
    w, b = _maybe(draw, rng, (C,), dtype), _maybe(draw, rng, (C,), dtype)
    fwd = Call("group_norm", fastreg.group_norm,
               dict(x=x, num_groups=G, weight=w, bias=b, eps=draw(EPS), axis=axis), dtype=dtype,
               extra=FOLDED)
    if not (draw(st.booleans()) if backward is None else backward):
        return fwd
    _, mean, rstd = fwd.run("reference")[0]
    return Call("group_norm_backward", fastreg.group_norm_backward,
                dict(dy=place(rng, x.shape, dtype), x=x, mean=mean, rstd=rstd, num_groups=G,
                     weight=w, bias=b, axis=axis), kind="grad", dtype=dtype, extra=FOLDED)


@st.composite
def instance_norm_calls(draw, dtypes, backward=None):
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(SEEDS))
    C = draw(st.integers(1, 4))
    x, axis = _channel_x(draw, rng, dtype, C, min_spatial=1)
    use_input_stats = draw(st.booleans())
    running = (not use_input_stats) or draw(st.booleans())
    rm = rng.standard_normal(C).astype(np.float32) if running else None
    rv = rng.uniform(0.5, 2.0, C).astype(np.float32) if running else None
    w, b = _maybe(draw, rng, (C,), dtype), _maybe(draw, rng, (C,), dtype)
    fwd = Call("instance_norm", fastreg.instance_norm,
               dict(x=x, weight=w, bias=b, running_mean=rm, running_var=rv,
                    use_input_stats=use_input_stats, momentum=draw(MOMENTUM), eps=draw(EPS),
                    axis=axis),
               inplace=("running_mean", "running_var") if running else (), dtype=dtype,
               extra=FOLDED)
    if not (draw(st.booleans()) if backward is None else backward):
        return fwd
    try:
        _, mean, rstd = fwd.run("reference")[0]
    except ValueError:
        return fwd
    return Call("instance_norm_backward", fastreg.instance_norm_backward,
                dict(dy=place(rng, x.shape, dtype), x=x, mean=mean, rstd=rstd, weight=w, bias=b,
                     use_input_stats=use_input_stats, axis=axis), kind="grad", dtype=dtype,
                extra=FOLDED)


def norm_calls(dtypes, backward=None):
    return st.one_of(row_norm_calls(dtypes, backward), batch_norm_calls(dtypes, backward),
                     group_norm_calls(dtypes, backward), instance_norm_calls(dtypes, backward))


# --------------------------------------------------------------------------- dropout

@st.composite
def dropout_calls(draw, dtypes):
    """dropout (both mask kinds), gaussian noise/dropout, their backward, DropConnect and
    the fused dropout + add + LayerNorm, at p from 0 to near 1, training or not."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(SEEDS))
    seed = draw(st.integers(0, 2**64 - 1))
    op = draw(st.sampled_from(["dropout", "dropout_backward", "gaussian_noise",
                               "gaussian_dropout", "drop_connect", "dropout_add_layer_norm"]))
    training = draw(st.booleans())
    mode = draw(st.sampled_from(["inverted", "weight_scaling"]))
    p = draw(P)
    if op in ("dropout", "dropout_backward"):
        x = place(rng, _shape(draw, 0, 3), dtype, draw(LAYOUTS))
        kw = dict(x=x, p=p, rng=seed, training=training, mode=mode,
                  mask=draw(st.sampled_from(["bits", "seed"])))
        fwd = Call("dropout", fastreg.dropout, kw, bitwise=(0, 1), dtype=dtype)
        if op == "dropout":
            return fwd
        try:
            _, mask = fwd.run(_aux(dtype))[0]
        except RuntimeError:    # a CUDA backend that does not run dropout yet
            return fwd
        return Call("dropout_backward", fastreg.dropout_backward,
                    dict(dy=place(rng, x.shape, dtype, draw(LAYOUTS)), mask=mask),
                    bitwise=(0,), dtype=dtype)
    if op == "gaussian_noise":
        x = place(rng, _shape(draw, 0, 3), dtype, draw(LAYOUTS))
        return Call(op, fastreg.gaussian_noise,
                    dict(x=x, std=draw(st.sampled_from([0.0, 1e-3, 1.0, 1e3])), rng=seed,
                         training=training), dtype=dtype)
    if op == "gaussian_dropout":
        x = place(rng, _shape(draw, 0, 3), dtype, draw(LAYOUTS))
        return Call(op, fastreg.gaussian_dropout, dict(x=x, p=p, rng=seed, training=training),
                    dtype=dtype)
    if op == "drop_connect":
        N, K, O = draw(SIZES), draw(SIZES), draw(SIZES)
        x = place(rng, (N, K), dtype, draw(LAYOUTS))
        w = place(rng, (O, K), dtype, draw(LAYOUTS), scale=1 / math.sqrt(max(K, 1)))
        return Call(op, fastreg.drop_connect,
                    dict(x=x, weight=w, bias=_maybe(draw, rng, (O,), dtype), p=p, rng=seed,
                         per_example=draw(st.booleans()), training=training, mode=mode),
                    kind="grad", dtype=dtype)
    shape = _shape(draw, 1, 3)
    k = draw(st.integers(1, len(shape)))
    x = place(rng, shape, dtype, draw(LAYOUTS))
    return Call(op, fastreg.dropout_add_layer_norm,
                dict(x=x, residual=place(rng, shape, dtype, draw(LAYOUTS)),
                     weight=_maybe(draw, rng, shape[len(shape) - k:], dtype),
                     bias=_maybe(draw, rng, shape[len(shape) - k:], dtype), p=p, rng=seed,
                     eps=draw(EPS), training=training, mode=mode,
                     mask=draw(st.sampled_from(["bits", "seed"])), normalized_ndim=k),
                bitwise=(4,), dtype=dtype, extra=ROUNDED_SUM)


# --------------------------------------------------------------------------- random

OFFSETS = st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**64 - 3])


@st.composite
def random_calls(draw, dtypes):
    """Philox blocks, raw bits, uniform and normal draws: shapes with 0- and 1-sized
    dimensions, generators at offsets where the counter's words carry or wrap."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(SEEDS))
    op = draw(st.sampled_from(["philox4x32", "random_bits", "uniform", "normal"]))
    if op == "philox4x32":
        n = draw(SIZES)
        counter = rng.integers(0, 2**32, (n, 4), dtype=np.uint64).astype(np.uint32)
        key = rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
        return Call(op, fastreg.random.philox4x32, dict(counter=counter, key=key),
                    dtype=dtype)
    gen = fastreg.random.Generator(draw(st.integers(0, 2**64 - 1)), draw(OFFSETS))
    kw = dict(shape=_shape(draw, 0, 3), rng=gen)
    if op == "random_bits":
        return Call(op, fastreg.random.random_bits, kw, dtype=dtype)
    kw["dtype"] = dtype
    fn = fastreg.random.uniform if op == "uniform" else fastreg.random.normal
    return Call(op, fn, kw, dtype=dtype, extra={"generator": "rng"})


# --------------------------------------------------------------------------- batch norm, split

@st.composite
def batch_norm_split_calls(draw, dtypes):
    """The split batch norm (stats, combine, apply, backward reduce and apply) as
    fastreg.distributed runs it, on random shapes and layouts."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(SEEDS))
    C = draw(st.integers(1, 5))
    x, axis = _channel_x(draw, rng, dtype, C)
    count = x.size // C
    op = draw(st.sampled_from(["stats", "combine", "apply", "backward_reduce",
                               "backward_apply"]))
    if op == "stats":
        return Call("batch_norm_stats", fastreg.batch_norm_stats, dict(x=x, axis=axis),
                    dtype=dtype)
    if op == "combine":
        P = draw(st.integers(1, 4))
        counts = rng.integers(0, 5, (P, C)).astype(np.float64)
        return Call("batch_norm_combine", fastreg.batch_norm_combine,
                    dict(counts=counts, means=rng.standard_normal((P, C)),
                         m2s=rng.uniform(0, 4, (P, C)) * counts), dtype=np.float64)
    mean = rng.standard_normal(C)
    var = rng.uniform(0.0, 2.0, C)
    activation = draw(st.sampled_from([None, "relu"]))
    w, b = _maybe(draw, rng, (C,), dtype), _maybe(draw, rng, (C,), dtype)
    if op == "apply":
        running = draw(st.booleans())
        return Call("batch_norm_apply", fastreg.batch_norm_apply,
                    dict(x=x, mean=mean, var=var, weight=w, bias=b,
                         running_mean=rng.standard_normal(C).astype(np.float32) if running
                         else None,
                         running_var=np.ones(C, np.float32) if running else None,
                         count=count, momentum=draw(MOMENTUM), eps=draw(EPS), axis=axis,
                         activation=activation),
                    inplace=("running_mean", "running_var") if running else (), dtype=dtype,
                    extra=dict(FOLDED, rstd_of_var=True))
    rstd = 1 / np.sqrt(var + 1e-5)
    y = place(rng, x.shape, dtype) if activation else None
    dy = place(rng, x.shape, dtype, draw(LAYOUTS))
    if op == "backward_reduce":
        return Call("batch_norm_backward_reduce", fastreg.batch_norm_backward_reduce,
                    dict(dy=dy, x=x, mean=mean, rstd=rstd, axis=axis, y=y,
                         activation=activation), kind="grad", dtype=dtype)
    return Call("batch_norm_backward_apply", fastreg.batch_norm_backward_apply,
                dict(dy=dy, x=x, mean=mean, rstd=rstd, weight=w if w is not None else
                     place(rng, (C,), dtype), sum_dy=rng.standard_normal(C) * count,
                     sum_dy_xhat=rng.standard_normal(C) * count, count=count,
                     training=draw(st.booleans()), axis=axis, y=y, activation=activation),
                kind="grad", dtype=dtype, extra=FOLDED)


# --------------------------------------------------------------------------- prox

THRESHOLDS = st.sampled_from([0.0, 1e-6, 0.5, 3.0, 1e30])


def _abs(a, plus=0.0):
    """|a| + plus in place (a stays an array when 0-d)."""
    np.abs(a, out=a)
    a += plus
    return a


def _axes(draw, ndim):
    if ndim == 0:
        return ()
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(sorted(axes)) if len(axes) > 1 else axes[0]


@st.composite
def prox_calls(draw, dtypes):
    """Elementwise and group proxes, max-norm, SGD/Adam/AdamW steps, label-smoothed
    cross-entropy and the feature scalers, with scalars at their edges."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(SEEDS))
    op = draw(st.sampled_from(["prox_l1", "prox_elastic_net", "prox_group_l1", "max_norm",
                               "sgd_step", "adam_step", "adamw_step",
                               "cross_entropy_label_smoothing", "standardize",
                               "min_max_scale"]))
    if op in ("prox_l1", "prox_elastic_net"):
        w = place(rng, _shape(draw, 0, 3), dtype, draw(LAYOUTS))
        if op == "prox_l1":
            return Call(op, fastreg.prox_l1, dict(w=w, threshold=draw(THRESHOLDS)), dtype=dtype)
        return Call(op, fastreg.prox_elastic_net,
                    dict(w=w, l1=draw(THRESHOLDS), l2=draw(THRESHOLDS)), dtype=dtype)
    if op in ("prox_group_l1", "max_norm"):
        shape = _shape(draw, 1, 3)
        w = place(rng, shape, dtype, draw(LAYOUTS))
        axis = _axes(draw, len(shape))
        if op == "prox_group_l1":
            return Call(op, fastreg.prox_group_l1,
                        dict(w=w, threshold=draw(THRESHOLDS), axis=axis), dtype=dtype)
        return Call(op, fastreg.max_norm,
                    dict(w=w, max_value=draw(st.sampled_from([1e-6, 1.0, 1e30])), axis=axis,
                         eps=draw(st.sampled_from([0.0, 1e-7]))), dtype=dtype)
    if op == "sgd_step":
        shape = _shape(draw, 0, 2)
        momentum = draw(st.sampled_from([0.0, 0.9, 1.0]))
        nesterov = momentum > 0 and draw(st.booleans())
        kw = dict(w=place(rng, shape, dtype), g=place(rng, shape, dtype, draw(LAYOUTS)),
                  lr=draw(st.sampled_from([0.0, 1e-3, 1.0])), momentum=momentum,
                  dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.5])),
                  nesterov=nesterov, maximize=draw(st.booleans()),
                  weight_decay=draw(st.sampled_from([0.0, 0.01])),
                  decoupled_weight_decay=draw(st.sampled_from([0.0, 0.1])),
                  l1=draw(st.sampled_from([0.0, 1e-3, 10.0])),
                  momentum_buffer=place(rng, shape, dtype) if momentum else None,
                  first_step=draw(st.booleans()))
        return Call(op, fastreg.sgd_step, kw,
                    inplace=("w", "momentum_buffer") if momentum else ("w",), kind="grad",
                    dtype=dtype)
    if op in ("adam_step", "adamw_step"):
        shape = _shape(draw, 0, 2)
        amsgrad = draw(st.booleans())
        kw = dict(w=place(rng, shape, dtype), g=place(rng, shape, dtype, draw(LAYOUTS)),
                  exp_avg=place(rng, shape, dtype, scale=0.1),
                  exp_avg_sq=_abs(place(rng, shape, dtype)),
                  step=draw(st.sampled_from([1, 2, 1000])),
                  lr=draw(st.sampled_from([0.0, 1e-3, 1.0])),
                  betas=draw(st.sampled_from([(0.9, 0.999), (0.0, 0.0), (0.5, 0.9999)])),
                  eps=draw(st.sampled_from([1e-8, 0.0, 1.0])),
                  weight_decay=draw(st.sampled_from([0.0, 0.01])), amsgrad=amsgrad,
                  max_exp_avg_sq=_abs(place(rng, shape, dtype), 1.0) if amsgrad else None,
                  l1=draw(st.sampled_from([0.0, 1e-3])), maximize=draw(st.booleans()))
        names = ("w", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        fn = fastreg.adam_step if op == "adam_step" else fastreg.adamw_step
        return Call(op, fn, kw, inplace=names, kind="grad", dtype=dtype)
    if op == "cross_entropy_label_smoothing":
        N, K = draw(SIZES), draw(st.integers(1, 40))
        logits = place(rng, (N, K), dtype, draw(LAYOUTS), scale=draw(st.sampled_from([1, 30])))
        target = rng.integers(0, K, N)
        ignore = draw(st.sampled_from([None, -100]))
        if ignore is not None and N:
            target[rng.random(N) < 0.3] = ignore
        return Call(op, fastreg.cross_entropy_label_smoothing,
                    dict(logits=logits, target=target,
                         smoothing=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                         reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                         ignore_index=ignore, style=draw(st.sampled_from(["uniform", "others"]))),
                    kind="grad", dtype=dtype)
    shape = _shape(draw, 1, 3)
    x = place(rng, shape, dtype, draw(LAYOUTS), scale=2.0, offset=3.0)
    axis = _axes(draw, len(shape))
    if op == "standardize":
        return Call(op, fastreg.standardize,
                    dict(x=x, axis=axis, eps=draw(st.sampled_from([0.0, 1e-6, 1.0]))),
                    dtype=dtype)
    lo = draw(st.sampled_from([-1.0, 0.0, 5.0]))
    return Call(op, fastreg.min_max_scale,
                dict(x=x, axis=axis, feature_range=(lo, lo + draw(st.sampled_from([1e-3, 1.0,
                                                                                   7.0])))),
                dtype=dtype)


# --------------------------------------------------------------------------- comparison

def flatten(value, out=None):
    """Every array of a result (masks as their position and bits), in order."""
    out = [] if out is None else out
    if value is None or isinstance(value, np.ndarray):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            flatten(v, out)
    elif isinstance(value, (fastreg.DropoutMask, fastreg.GaussianMask)):
        out.append(np.array([value.seed or 0, value.offset or 0], np.uint64))
        bits = getattr(value, "bits", None)
        if bits is not None:
            out.append(np.asarray(bits))
    elif isinstance(value, (int, float, np.generic)):
        out.append(np.asarray(value))
    else:
        out.append(np.asarray(value))
    return out


def _fold_floor(call, r_res):
    """The absolute rounding of the statistics applied in folded form: forward
    y = x * (rstd * w) + shift, backward dx = alpha * dy - beta * (x - mean) - gamma
    (terms of size rstd * |dy * w|)."""
    kw = call.kwargs
    x, w = kw["x"], kw.get("weight")
    if call.extra.get("rstd_of_var"):
        rstd = 1 / np.sqrt(kw["var"] + kw["eps"])
    else:
        rstd = kw["rstd"] if "rstd" in kw else r_res[-1]
    big = kw["dy"] if "dy" in kw else x
    if big.size == 0 or rstd is None or rstd.size == 0:
        return 0.0
    wmax = 1.0 if w is None or w.size == 0 else max(1.0, float(np.abs(w).max()))
    eps = float(np.finfo(call.dtype).eps)
    return 8 * eps * float(np.abs(big).max()) * float(np.abs(rstd).max()) * wmax


def compare(call, got, ref, backend):
    """got (on ``backend``) against ref (the reference): results and in-place arrays."""
    g_res, g_in = got
    r_res, r_in = ref
    floor = _fold_floor(call, r_res) if call.extra.get("folded") else 0.0
    g_all = flatten(g_res) + flatten(g_in)
    r_all = flatten(r_res) + flatten(r_in)
    case = f"{backend} vs reference: {call!r}"
    assert len(g_all) == len(r_all), case
    n_res = len(flatten(r_res))
    rtol, atol = tol(np.float64 if call.dtype == np.float64 else np.float32, call.kind)
    for i, (g, r) in enumerate(zip(g_all, r_all)):
        if r is None:
            assert g is None, f"{case}: result {i} should be None"
            continue
        g = np.asarray(g)
        assert g.shape == r.shape and g.dtype == r.dtype, \
            f"{case}: result {i} is {g.shape} {g.dtype}, expected {r.shape} {r.dtype}"
        if not np.issubdtype(r.dtype, np.floating) or (i < n_res and i in call.bitwise):
            assert_bitwise(g, r, case=f"{case}, result {i}")
            continue
        scale = max(1.0, float(np.max(np.abs(np.nan_to_num(r.astype(np.float64),
                                                               posinf=0, neginf=0)),
                                      initial=0.0)))
        assert_close(g, r, rtol=rtol, atol=atol * scale + (floor if i == 0 else 0.0),
                     case=f"{case}, result {i}")


def check_against_reference(call, backend):
    """Run on the reference and on ``backend``: the same error, or matching results;
    the inputs unchanged (in-place arrays aside)."""
    before = copy.deepcopy(call.kwargs)
    try:
        ref = call.run("reference")
    except (ValueError, TypeError) as exc:
        # a validation error names the function; anything else is a crash in the reference
        assert str(exc).startswith(f"{call.name}:"), f"{call!r}: the reference failed: {exc!r}"
        err = type(exc)
        try:
            call.run(backend)
        except err as got:
            assert str(got) == str(exc), f"{call!r}: {got} != {exc}"
            return
        raise AssertionError(f"{call!r}: the reference raised {exc!r}, {backend} did not")
    got = call.run(backend)
    compare(call, got, ref, backend)
    for k, v in before.items():   # run() works on copies: the originals never move
        if isinstance(v, np.ndarray):
            assert_bitwise(call.kwargs[k], v, case=f"{call!r}: input {k}")


# --------------------------------------------------------------------------- 16-bit (CUDA)

def _cast_call(call, dtype):
    """The call with its arrays of the call's dtype cast to ``dtype``."""
    def cast(v):
        if isinstance(v, np.ndarray) and v.dtype == call.dtype:
            return v.astype(dtype)
        if isinstance(v, tuple) and any(isinstance(e, np.ndarray) for e in v):
            return tuple(cast(e) for e in v)
        return v
    return Call(call.name, call.fn, {k: cast(v) for k, v in call.kwargs.items()}, call.inplace,
                call.bitwise, call.kind, np.dtype(dtype), call.extra)


# The scalers apply the statistics they return (stored in x's dtype, so that fit then
# apply gives the same y): their fit is checked as the float64 statistics rounded to the
# dtype, then y as the apply on those statistics.
SCALER_STATS = {"standardize": ("mean", "std"), "min_max_scale": ("data_min", "data_max")}


def _scaler_fit(call, backend, names):
    try:
        exact = _cast_call(call, np.float64).run("reference")[0][1:]
    except (ValueError, TypeError):
        return call                      # the error is checked as any other
    got = call.run(backend)[0][1:]
    for name, g, e in zip(names, got, exact):
        ulp = np.spacing(np.abs(e).astype(call.dtype)).astype(np.float64)
        assert (np.abs(np.asarray(g, np.float64) - e) <= ulp).all(), \
            f"{backend}: {call!r}: fitted {name} is not the exact one rounded to {call.dtype}"
    return Call(call.name, call.fn, dict(call.kwargs, **dict(zip(names, got))), call.inplace,
                call.bitwise, call.kind, call.dtype, call.extra)


def check_low_precision(call, backend):
    """A float16/bfloat16 call on ``backend`` against the float64 reference: each
    16-bit result within twice the error of the low-precision reference (the
    reference on float32 copies, stored in the dtype) plus the dtype's atol
    (tests/_cuda_targets.py); float32 results (statistics) to float32 tolerances;
    masks and integers bit for bit."""
    from _cuda_targets import ATOL_LOW
    names = SCALER_STATS.get(call.name)
    if names and all(call.kwargs.get(n) is None for n in names):
        call = _scaler_fit(call, backend, names)
    before = copy.deepcopy(call.kwargs)
    c64, c32 = _cast_call(call, np.float64), _cast_call(call, np.float32)
    try:
        ref64 = c64.run("reference")
    except (ValueError, TypeError) as exc:
        assert str(exc).startswith(f"{call.name}:"), f"{call!r}: the reference failed: {exc!r}"
        try:
            call.run(backend)
        except type(exc):
            return
        raise AssertionError(f"{call!r}: the reference raised {exc!r}, {backend} did not")
    ref32 = c32.run("reference")
    got = call.run(backend)
    g_all = flatten(got[0]) + flatten(got[1])
    r64 = flatten(ref64[0]) + flatten(ref64[1])
    r32 = flatten(ref32[0]) + flatten(ref32[1])
    case = f"{backend} vs reference ({call.dtype}): {call!r}"
    assert len(g_all) == len(r64), case
    for i, (g, r, lo) in enumerate(zip(g_all, r64, r32)):
        if r is None:
            assert g is None, f"{case}: result {i} should be None"
            continue
        g = np.asarray(g)
        assert g.shape == r.shape, f"{case}: result {i} shape {g.shape} != {r.shape}"
        if not np.issubdtype(r.dtype, np.floating):     # masks, bits, integers
            assert_bitwise(g, r, case=f"{case}, result {i}")
            continue
        g64 = g.astype(np.float64)
        finite = np.isfinite(r)
        scale = max(1.0, float(np.max(np.abs(r[finite]), initial=0.0)))
        if np.dtype(g.dtype) == call.dtype:
            bound = 2 * np.abs(lo.astype(call.dtype).astype(np.float64) - r) + \
                ATOL_LOW[call.dtype] * scale
            err = np.abs(g64 - r)
            ok = (err <= bound) | (np.isnan(g64) & np.isnan(r)) | (g64 == r)
            assert ok.all(), f"{case}, result {i}: max error {np.max(err[~ok]):.3g} exceeds " \
                             f"the low-precision bound"
        elif call.extra.get("rounded_sum"):
            rtol = 2 * float(ml_dtypes.finfo(call.dtype).eps)
            assert_close(g64, r, rtol=rtol, atol=ATOL_LOW[call.dtype] * scale,
                         case=f"{case}, result {i}")
        else:
            rtol, atol = tol(np.float32, call.kind)
            assert_close(g64, r, rtol=rtol, atol=atol * scale, case=f"{case}, result {i}")
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert_bitwise(call.kwargs[k], v, case=f"{call!r}: input {k}")
