"""The table of dropout-family cases: every op, its inputs, forward and backward.

Each ``Op`` builds its inputs for a shape/dtype/variant and calls the public
forward and backward on a given backend with a fresh ``Generator`` at a
given stream position, so two backends draw the same stream. ``bitwise``
names the outputs that must match the reference bit for bit (the rest are
compared with the per-dtype tolerances of tests/_assert.py).

Shapes are chosen around the kernels' boundaries: chunk size 2048 elements,
32-element mask words, 4-element Philox blocks, sizes 0 and 1.
"""

from dataclasses import dataclass, field

import numpy as np

import fastreg
from cases import make_array
from fastreg.random import Generator

# (shape, layout): layouts as in cases.py ("contig", "strided", "channels_last")
ELEMENTWISE_SHAPES = [
    ((0,), "contig"),
    ((1,), "contig"),
    ((3,), "contig"),
    ((31,), "contig"),
    ((33,), "contig"),
    ((7, 13), "contig"),
    ((2047,), "contig"),
    ((2049,), "contig"),
    ((3, 2051), "contig"),
    ((2, 3, 5, 7), "channels_last"),
    ((5, 37), "strided"),
    ((4, 0, 3), "contig"),
]

# (x shape, out_features, layout)
LINEAR_SHAPES = [
    ((5, 7), 3, "contig"),
    ((1, 1), 1, "contig"),
    ((2, 3, 6), 4, "contig"),
    ((9, 33), 5, "strided"),
    ((0, 4), 3, "contig"),
    ((4, 67), 9, "contig"),
    ((6,), 2, "contig"),
]

# (x shape, normalized_ndim, layout)
ROW_SHAPES = [
    ((7, 13), 1, "contig"),
    ((1, 1), 1, "contig"),
    ((2, 3, 5), 2, "contig"),
    ((3, 1030), 1, "contig"),
    ((263, 9), 1, "contig"),        # 9 rows per reduction block: groups of 4, 4 and 1
    ((300, 37), 1, "contig"),       # forward row blocks of 192 rows: 2 blocks of mask words
    ((263, 32), 1, "contig"),       # whole mask words per row: bits applied word by word
    ((9, 2, 32), 2, "strided"),
    ((5, 37), 1, "strided"),
    ((0, 4), 1, "contig"),
    ((4, 3, 2, 5), 1, "channels_last"),
]

P_VALUES = [0.0, 0.3, 1.0]
# Stream positions: the start, and a counter whose low word carries mid-call.
OFFSETS = [0, 2**32 - 3]
SEED = 2**40 + 12345


def gen(offset):
    return Generator(SEED, offset)


def _data(rng, shape, dtype, layout="contig"):
    return make_array(rng, shape, dtype, layout)


@dataclass
class Op:
    name: str
    make: object          # (rng, shape_spec, dtype, variant) -> dict of inputs
    forward: object       # (d, backend, generator, out) -> outputs (arrays + mask objects)
    backward: object      # (d, saved, dy, backend, out) -> grads tuple, or None
    shapes: list = field(default_factory=list)
    variants: list = field(default_factory=list)
    bitwise: tuple = ()   # forward outputs identical to the reference bit for bit
    grad_bitwise: tuple = ()
    outs: object = None   # (reference outputs) -> the out= tuple to preallocate, or None

    def out_like(self, ref, poison):
        """Preallocated outputs shaped like the reference's, filled by ``poison``."""
        if self.outs is not None:
            return self.outs(ref, poison)
        return tuple(poison(a) for a in ref if isinstance(a, np.ndarray))


# --------------------------------------------------------------------------- dropout

def _make_x(rng, spec, dtype, variant):
    shape, layout = spec
    return {"x": _data(rng, shape, dtype, layout), **variant}


DROPOUT = Op(
    "dropout",
    make=_make_x,
    forward=lambda d, backend, g, out=None: fastreg.dropout(
        d["x"], d["p"], rng=g, mask=d["mask"], mode=d.get("mode", "inverted"),
        training=d.get("training", True), out=out, backend=backend),
    backward=lambda d, saved, dy, backend, out=None: (
        fastreg.dropout_backward(dy, saved[1], out=out, backend=backend),),
    shapes=ELEMENTWISE_SHAPES,
    variants=[{"p": p, "mask": m} for p in P_VALUES for m in ("bits", "seed")]
    + [{"p": 0.3, "mask": "bits", "mode": "weight_scaling"},
       {"p": 0.3, "mask": "seed", "training": False},
       {"p": 0.3, "mask": "bits", "mode": "weight_scaling", "training": False}],
    bitwise=(0,),
    grad_bitwise=(0,),
    outs=lambda ref, poison: (poison(ref[0]),
                              None if ref[1].bits is None else poison(ref[1].bits)),
)

GAUSSIAN_NOISE = Op(
    "gaussian_noise",
    make=_make_x,
    forward=lambda d, backend, g, out=None: (fastreg.gaussian_noise(
        d["x"], d["std"], rng=g, training=d.get("training", True), out=out, backend=backend),),
    backward=None,
    shapes=ELEMENTWISE_SHAPES,
    variants=[{"std": 0.5}, {"std": 0.0}, {"std": 2.0, "training": False}],
)

GAUSSIAN_DROPOUT = Op(
    "gaussian_dropout",
    make=_make_x,
    forward=lambda d, backend, g, out=None: fastreg.gaussian_dropout(
        d["x"], d["p"], rng=g, training=d.get("training", True), out=out, backend=backend),
    backward=lambda d, saved, dy, backend, out=None: (
        fastreg.gaussian_dropout_backward(dy, saved[1], out=out, backend=backend),),
    shapes=ELEMENTWISE_SHAPES,
    variants=[{"p": 0.3}, {"p": 0.0}, {"p": 0.5, "training": False}],
)


# --------------------------------------------------------------------------- DropConnect

def _make_linear(rng, spec, dtype, variant):
    xshape, O, layout = spec
    d = dict(variant)
    K = xshape[-1]
    d["x"] = _data(rng, xshape, dtype, layout)
    d["weight"] = _data(rng, (O, K), dtype)
    d["weight"] /= np.sqrt(max(K, 1))
    d["bias"] = _data(rng, (O,), dtype) if d.pop("bias", True) else None
    return d


DROP_CONNECT = Op(
    "drop_connect",
    make=_make_linear,
    forward=lambda d, backend, g, out=None: fastreg.drop_connect(
        d["x"], d["weight"], d["bias"], d["p"], rng=g, per_example=d["per_example"],
        mode=d.get("mode", "inverted"), training=d.get("training", True), out=out,
        backend=backend),
    backward=lambda d, saved, dy, backend, out=None: fastreg.drop_connect_backward(
        dy, d["x"], d["weight"], saved[1], out=out, backend=backend),
    shapes=LINEAR_SHAPES,
    variants=[{"p": p, "per_example": pe} for p in (0.3, 1.0) for pe in (False, True)]
    + [{"p": 0.0, "per_example": False, "bias": False},
       {"p": 0.4, "per_example": True, "mode": "weight_scaling"},
       {"p": 0.4, "per_example": False, "training": False, "mode": "weight_scaling"}],
)

DROP_CONNECT_INFERENCE = Op(
    "drop_connect_inference",
    make=_make_linear,
    forward=lambda d, backend, g, out=None: (fastreg.drop_connect_inference(
        d["x"], d["weight"], d["bias"], d["p"], activation=d["activation"],
        n_samples=d["n_samples"], rng=g, mode=d.get("mode", "inverted"), out=out,
        backend=backend),),
    backward=None,
    shapes=LINEAR_SHAPES,
    variants=[{"p": 0.5, "activation": "relu", "n_samples": 7},
              {"p": 0.2, "activation": "tanh", "n_samples": 1},
              {"p": 0.2, "activation": "sigmoid", "n_samples": 33, "mode": "weight_scaling"},
              {"p": 0.7, "activation": None, "n_samples": 5, "bias": False}],
)


# --------------------------------------------------------------------------- fused LN

def _make_rows(rng, spec, dtype, variant):
    xshape, k, layout = spec
    d = dict(variant)
    d["normalized_ndim"] = k
    pshape = xshape[len(xshape) - k:]
    d["x"] = _data(rng, xshape, dtype, layout)
    d["residual"] = _data(rng, xshape, dtype)
    affine = d.pop("affine", True)
    d["weight"] = _data(rng, pshape, dtype) if affine else None
    d["bias"] = _data(rng, pshape, dtype) if affine else None
    if d.pop("dres", False):
        d["dresidual_sum"] = _data(rng, xshape, dtype)
    return d


DROPOUT_ADD_LAYER_NORM = Op(
    "dropout_add_layer_norm",
    make=_make_rows,
    forward=lambda d, backend, g, out=None: fastreg.dropout_add_layer_norm(
        d["x"], d["residual"], d["weight"], d["bias"], d["p"], rng=g, eps=1e-5,
        training=d.get("training", True), mode=d.get("mode", "inverted"),
        mask=d.get("mask", "seed"), normalized_ndim=d["normalized_ndim"], out=out,
        backend=backend),
    backward=lambda d, saved, dy, backend, out=None: fastreg.dropout_add_layer_norm_backward(
        dy, saved[1], saved[2], saved[3], d["weight"], d["bias"], saved[4],
        dresidual_sum=d.get("dresidual_sum"), normalized_ndim=d["normalized_ndim"], out=out,
        backend=backend),
    shapes=ROW_SHAPES,
    variants=[{"p": 0.3}, {"p": 0.3, "dres": True}, {"p": 0.0, "affine": False},
              {"p": 1.0}, {"p": 0.3, "training": False},
              {"p": 0.3, "mode": "weight_scaling", "dres": True},
              {"p": 0.3, "mask": "bits"}, {"p": 0.6, "mask": "bits", "dres": True}],
    bitwise=(1,),
    outs=lambda ref, poison: (*(poison(a) for a in ref[:4]),
                              None if ref[4].bits is None else poison(ref[4].bits)),
)

OPS = [DROPOUT, GAUSSIAN_NOISE, GAUSSIAN_DROPOUT, DROP_CONNECT, DROP_CONNECT_INFERENCE,
       DROPOUT_ADD_LAYER_NORM]


def all_cases():
    """(op, shape spec, variant, stream offset, id) for every row of the table; the two
    stream positions alternate along the table."""
    i = 0
    for op in OPS:
        for spec in op.shapes:
            for variant in op.variants:
                vid = ",".join(f"{k}={v}" for k, v in variant.items())
                sid = "x".join(map(str, spec[0])) + "-" + "-".join(map(str, spec[1:]))
                offset = OFFSETS[i % len(OFFSETS)]
                i += 1
                yield op, spec, variant, offset, f"{op.name}-{sid}-{vid}-offset{offset}"
