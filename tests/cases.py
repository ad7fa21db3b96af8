"""The table of op cases that drives the correctness tests.

Each ``Op`` knows how to build inputs for a shape/dtype/variant, and how to
call its public forward and backward. A case is (op, shape, variant); adding
an op or a shape is adding a row here, not a test file.

Layouts: "contig" (C order), "strided" (every other element of the last
axis), "channels_last" (NHWC storage behind an NCHW shape, PyTorch's
channels_last memory format).
"""

from dataclasses import dataclass, field

import numpy as np

import fastreg


def make_array(rng, shape, dtype, layout="contig", scale=1.0, offset=0.0):
    if layout == "contig":
        a = rng.standard_normal(shape)
    elif layout == "strided":
        a = rng.standard_normal((*shape[:-1], 2 * shape[-1]))[..., ::2]
    elif layout == "channels_last":  # (N, C, H, W) view of (N, H, W, C) storage
        a = rng.standard_normal((shape[0], *shape[2:], shape[1])).transpose(0, 3, 1, 2)
        assert a.shape == tuple(shape)
    else:
        raise ValueError(layout)
    out = np.empty_like(a, dtype=dtype, order="K")
    out[...] = a * scale + offset
    return out


@dataclass
class Op:
    name: str
    forward: object        # (inputs, backend, out) -> outputs tuple
    backward: object       # (inputs, saved, dy, backend, out) -> grads tuple
    params: object         # (inputs) -> {name: shape} of weight/bias/running stats
    cases: list = field(default_factory=list)

    def make(self, rng, shape, dtype, variant, scale=1.0, offset=0.0):
        d = dict(variant)
        d["x"] = make_array(rng, shape, dtype, d.pop("layout", "contig"), scale, offset)
        affine = d.pop("affine", True)
        for name, pshape in self.params(d).items():
            if name in ("weight", "bias") and not affine:
                d[name] = None
            elif name == "running_var":
                d[name] = rng.uniform(0.5, 2.0, pshape).astype(np.float32)
            elif name == "running_mean":
                d[name] = rng.standard_normal(pshape).astype(np.float32)
            else:
                d[name] = rng.standard_normal(pshape).astype(dtype)
        return d


def _kw(d, *names):
    return {n: d[n] for n in names if n in d}


# --------------------------------------------------------------------------- layer / RMS

def _row_params(d, bias=True):
    pshape = d["x"].shape[d["x"].ndim - d.get("normalized_ndim", 1):]
    return {"weight": pshape, "bias": pshape} if bias else {"weight": pshape}


LAYER_NORM = Op(
    "layer_norm",
    forward=lambda d, backend, out=None: fastreg.layer_norm(
        d["x"], d["weight"], d["bias"], 1e-5, backend=backend, out=out,
        **_kw(d, "normalized_ndim")),
    backward=lambda d, s, dy, backend, out=None: fastreg.layer_norm_backward(
        dy, d["x"], s[1], s[2], d["weight"], d["bias"], backend=backend, out=out,
        **_kw(d, "normalized_ndim")),
    params=_row_params,
)

RMS_NORM = Op(
    "rms_norm",
    forward=lambda d, backend, out=None: fastreg.rms_norm(
        d["x"], d["weight"], 1e-6, backend=backend, out=out, **_kw(d, "normalized_ndim")),
    backward=lambda d, s, dy, backend, out=None: fastreg.rms_norm_backward(
        dy, d["x"], s[1], d["weight"], backend=backend, out=out, **_kw(d, "normalized_ndim")),
    params=lambda d: _row_params(d, bias=False),
)

ROW_CASES = [
    ((7, 13), {}),
    ((2, 3, 5), {"normalized_ndim": 2}),
    ((1, 1), {}),
    ((3, 8192), {}),
    ((5, 37), {"layout": "strided"}),
    ((6, 11), {"affine": False}),
    ((0, 4), {}),
    # 7 rows per reduction block: groups of 4 rows and a tail of 3 in the backward
    ((203, 19), {}),
    ((130, 2, 33), {"normalized_ndim": 2, "layout": "strided"}),
]
LAYER_NORM.cases = ROW_CASES
RMS_NORM.cases = ROW_CASES


# --------------------------------------------------------------------------- batch norm

def _channel_params(d, running=True):
    C = d["x"].shape[d.get("axis", 1)]
    p = {"weight": (C,), "bias": (C,)}
    if running:
        p.update(running_mean=(C,), running_var=(C,))
    return p


BATCH_NORM = Op(
    "batch_norm",
    forward=lambda d, backend, out=None: fastreg.batch_norm(
        d["x"], d["weight"], d["bias"], d["running_mean"], d["running_var"], backend=backend,
        out=out, momentum=0.3, **_kw(d, "training", "axis", "activation")),
    backward=lambda d, s, dy, backend, out=None: fastreg.batch_norm_backward(
        dy, d["x"], s[1], s[2], d["weight"], d["bias"], backend=backend, out=out,
        y=s[0] if d.get("activation") else None, **_kw(d, "training", "axis", "activation")),
    params=_channel_params,
    cases=[
        ((16, 7), {}),
        ((4, 5, 6, 7), {}),
        ((4, 6, 7, 5), {"axis": -1}),
        ((3, 5, 2, 3, 4), {}),
        ((37, 3), {"axis": -1, "activation": "relu"}),
        ((4, 5, 6, 7), {"layout": "channels_last"}),
        ((8, 3, 9), {"layout": "strided"}),
        ((4, 5, 6, 7), {"training": False}),
        ((4, 6, 7, 5), {"axis": -1, "training": False, "activation": "relu"}),
        ((5, 4, 3, 3), {"activation": "relu", "affine": False}),
        ((2, 1, 1, 1), {}),
        ((64, 300), {}),
        ((0, 5), {}),
    ],
)


# --------------------------------------------------------------------------- group / instance norm

GROUP_NORM = Op(
    "group_norm",
    forward=lambda d, backend, out=None: fastreg.group_norm(
        d["x"], d["G"], d["weight"], d["bias"], 1e-5, backend=backend, out=out,
        **_kw(d, "axis")),
    backward=lambda d, s, dy, backend, out=None: fastreg.group_norm_backward(
        dy, d["x"], s[1], s[2], d["G"], d["weight"], d["bias"], backend=backend, out=out,
        **_kw(d, "axis")),
    params=lambda d: _channel_params(d, running=False),
    cases=[
        ((4, 6, 5, 3), {"G": 3}),
        ((4, 5, 3, 6), {"G": 2, "axis": -1}),
        ((3, 8), {"G": 4}),
        ((2, 6, 7), {"G": 6}),
        ((2, 7, 6), {"G": 1, "axis": -1}),
        ((3, 4, 5, 6), {"G": 2, "layout": "channels_last"}),
        ((3, 4, 5, 12), {"G": 2, "layout": "strided"}),
        ((2, 3, 2, 2, 3), {"G": 3, "axis": -1, "affine": False}),
        ((1, 4, 1, 1), {"G": 2}),
        ((0, 4, 3), {"G": 2}),
    ],
)

INSTANCE_NORM = Op(
    "instance_norm",
    forward=lambda d, backend, out=None: fastreg.instance_norm(
        d["x"], d["weight"], d["bias"], d["running_mean"], d["running_var"], backend=backend,
        out=out, momentum=0.3, **_kw(d, "use_input_stats", "axis")),
    backward=lambda d, s, dy, backend, out=None: fastreg.instance_norm_backward(
        dy, d["x"], s[1], s[2], d["weight"], d["bias"], backend=backend, out=out,
        **_kw(d, "use_input_stats", "axis")),
    params=_channel_params,
    cases=[
        ((3, 4, 5, 6), {}),
        ((3, 5, 6, 4), {"axis": -1}),
        ((2, 3, 7), {"affine": False}),
        ((3, 4, 5, 6), {"layout": "channels_last"}),
        ((3, 4, 5, 6), {"use_input_stats": False}),
        ((3, 5, 6, 4), {"axis": -1, "use_input_stats": False}),
    ],
)

OPS = [LAYER_NORM, RMS_NORM, BATCH_NORM, GROUP_NORM, INSTANCE_NORM]


def all_cases():
    """(op, shape, variant) for every row of the table, with a readable id."""
    for op in OPS:
        for shape, variant in op.cases:
            vid = ",".join(f"{k}={v}" for k, v in variant.items())
            yield op, shape, variant, f"{op.name}-{'x'.join(map(str, shape))}-{vid}"
