"""The bad-input battery: every public function (tests/api_table.py), every way to
get its arguments wrong.

From one valid call per function, each case corrupts one argument: wrong types
(a list, an int, an object array, a torch tensor), wrong dtypes (int, complex,
bool, float16 on the CPU), a mismatched shape, the wrong device (a CuPy array
among NumPy ones, simulated by a stand-in whose type lives in module "cupy",
which is how ``fastreg._backend.array_kind`` tells them apart), NaN/Inf and
out-of-range scalars, and ``out=`` buffers that alias an input or each other.
Every case must raise ValueError or TypeError whose message starts with the
function's name and quotes the argument, and must leave every array it was
given (inputs, state, ``out=`` buffers) and every generator unchanged, checked
by hashing them before and after.
"""

import math

import numpy as np
import pytest

from api_table import ALL, fingerprint, public_functions, runs_on

VE, TE = ValueError, TypeError
NAN, INF = math.nan, math.inf

BAD_SCALARS = {
    "pos": [(0.0, VE), (-1.0, VE), (NAN, VE), (INF, VE), ("1e-5", TE), (None, TE), (True, TE)],
    "nonneg": [(-1e-3, VE), (NAN, VE), (INF, VE), (-INF, VE), ("0.1", TE), (1j, TE)],
    "unit": [(-0.1, VE), (1.5, VE), (NAN, VE), (INF, VE), (None, TE)],
    "unit_open": [(1.0, VE), (-0.1, VE), (NAN, VE), (INF, VE)],
    "real": [(NAN, VE), (INF, VE), ("0", TE)],
    "count": [(-1, VE), (NAN, VE), (INF, VE), ("5", TE), (None, VE)],
    "int_count": [(-1, VE), (2.5, TE), (None, TE)],
    "int_pos": [(0, VE), (-2, VE), (2.0, TE), (True, TE), (None, TE)],
    "ndim": [(0, VE), (99, VE), (1.0, TE)],
    "flag": [(1, TE), ("yes", TE), (None, TE)],
    "activation": [("gelu", VE)],
    "dc_activation": [("gelu", VE)],
    "mode": [("bogus", VE)],
    "mask_kind": [("bytes", VE)],
    "reduction": [("avg", VE)],
    "style": [("smooth", VE)],
    "axis": [(99, VE), (-99, VE), (1.5, TE), (None, TE)],
    "end_axis": [(0, VE), (99, VE), (1.5, TE)],
    "axes": [(99, VE), ((1, 1), VE), (1.5, TE), ("0", TE)],
    "rng": [(-1, VE), (2**64, VE), (1.5, TE), ("seed", TE), (None, TE)],
    "rng_required": [(-1, VE), (2**64, VE), (1.5, TE), (None, TE)],
    "betas": [((0.9,), TE), ((1.0, 0.999), VE), ((0.9, NAN), VE), ((-0.1, 0.9), VE), (0.9, TE)],
    "feature_range": [((1.0, 0.0), VE), ((0.0, NAN), VE), ((0.0, INF), VE), (1.0, TE)],
    "int_or_none": [(1.5, TE), ("x", TE)],
    "mask_obj": [(np.zeros(3, np.uint32), TE), (None, TE), ("bits", TE)],
}


class FakeCupyArray:
    """A stand-in for a cupy.ndarray (CuPy is not installed here): the dispatcher and
    the checks tell libraries apart by the type's module and name."""

    def __init__(self, like):
        self.shape, self.dtype = tuple(like.shape), like.dtype
        self.ndim, self.size = len(self.shape), int(like.size)
        self.strides, self.nbytes, self.itemsize = like.strides, like.nbytes, like.itemsize
        self.flags = like.flags


FakeCupyArray.__module__ = "cupy"
FakeCupyArray.__name__ = "ndarray"
FakeCupyArray.__qualname__ = "ndarray"


def _torch_tensor(a):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(a))


def _grown(a):
    """The array with one more element along its last axis (a mismatched shape)."""
    if a.ndim == 0:
        return np.zeros(2, a.dtype)
    pad = [(0, 0)] * (a.ndim - 1) + [(0, 1)]
    return np.pad(a, pad)


def _array_mutations(api, name, backend):
    """(id, new value or callable(old), exception, also-acceptable names)."""
    muts = [("list", lambda a: a.tolist(), TE), ("int", lambda a: 3, TE),
            ("object-array", lambda a: a.astype(object), TE),
            ("torch-tensor", _torch_tensor, TE),
            ("complex64", lambda a: a.astype(np.complex64), TE),
            ("bool", lambda a: a.astype(bool), TE),
            ("cupy-device", FakeCupyArray, TE)]
    if name in api.int_arrays:
        muts.append(("float32", lambda a: a.astype(np.float32), TE))
    else:
        muts.append(("int64", lambda a: a.astype(np.int64), TE))
    if backend == "cpu" and name not in api.int_arrays:
        muts.append(("float16-on-cpu", lambda a: a.astype(np.float16), TE))
    if backend == "cuda_emulator" and name not in api.int_arrays + api.stat_arrays \
            and name != api.arrays[0]:
        # a 16-bit parameter beside a float32 x: dtypes must match
        muts.append(("float16-beside-float32", lambda a: a.astype(np.float16), TE))
    if name != api.arrays[0]:
        muts.append(("shape", _grown, VE))
    return muts


def _outs(kw):
    out = kw.get("out")
    if out is None:
        return None, False
    if isinstance(out, tuple):
        return list(out), True
    return [out], False


def _set_out(kw, outs, tupled):
    kw["out"] = tuple(outs) if tupled else outs[0]


# (out index, input name) pairs that are documented in-place forms, not aliasing errors
IN_PLACE_OUT = {("prox_l1", 0, "w"), ("prox_elastic_net", 0, "w"), ("prox_group_l1", 0, "w"),
                ("max_norm", 0, "w"), ("cross_entropy_label_smoothing", 1, "logits")}


def _out_mutations(api, kw):
    outs, tupled = _outs(kw)
    if outs is None:
        return []
    muts = []
    first = next(i for i, o in enumerate(outs) if o is not None)
    o = outs[first]
    label = "out"

    def replace(i, value):
        def mutate(k):
            new, t = _outs(k)
            new[i] = value(k) if callable(value) else value
            _set_out(k, new, t)
        return mutate

    def live(i):  # out[i] of the call being corrupted (not of this listing's build)
        return lambda k: _outs(k)[0][i]

    muts.append(("out-wrong-shape", replace(first, _grown(o)), VE, (label,)))
    muts.append(("out-wrong-dtype", replace(first, o.astype(np.complex64)), TE, (label,)))
    ro = o.copy()
    ro.flags.writeable = False
    muts.append(("out-read-only", replace(first, ro), VE, (label,)))
    muts.append(("out-cupy-device", replace(first, FakeCupyArray(o)), TE, (label, "backend")))
    muts.append(("out-list-entry", replace(first, o.tolist()), TE, (label,)))
    if tupled:
        muts.append(("out-not-a-tuple", lambda k: k.update(out=o), TE, (label,)))
        muts.append(("out-too-long", lambda k: k.update(out=tuple(outs) + (None,)), TE,
                     (label,)))
    # an output aliasing an input of its shape and dtype
    for i, oi in enumerate(outs):
        if oi is None:
            continue
        for name, a in kw.items():
            if (name != "out" and isinstance(a, np.ndarray) and a.shape == oi.shape
                    and a.dtype == oi.dtype and (api.name, i, name) not in IN_PLACE_OUT):
                muts.append((f"out{i}-aliases-{name}",
                             replace(i, lambda k, name=name: k[name]), VE, (label,)))
                break
    # two outputs in the same memory
    for i, oi in enumerate(outs):
        for j in range(i + 1, len(outs)):
            oj = outs[j]
            if oi is not None and oj is not None and oi.shape == oj.shape \
                    and oi.dtype == oj.dtype:
                muts.append((f"out{j}-aliases-out{i}", replace(j, live(i)), VE, (label,)))
    return muts


def _cases(backend):
    for api in ALL:
        if not (runs_on(api, backend) and (api.backend_kw or backend == "cpu")):
            continue
        kw = api.build(np.random.default_rng(0), np.dtype(np.float32), False)
        for name in api.arrays:
            for mid, value, exc in _array_mutations(api, name, backend):
                def mutate(k, name=name, value=value):
                    k[name] = value(k[name])
                names = (name,) + api.names.get(name, ()) + (
                    # a lone CuPy array meets the forced CPU backend or NumPy out= buffers
                    ("out", "backend") if mid == "cupy-device" else ())
                yield pytest.param(api, mutate, exc, names, id=f"{api.name}-{name}-{mid}")
        for name, kind in api.scalars.items():
            for i, (value, exc) in enumerate(BAD_SCALARS[kind]):
                def mutate(k, name=name, value=value):
                    k[name] = value
                yield pytest.param(api, mutate, exc, (name,) + api.names.get(name, ()),
                                   id=f"{api.name}-{name}-{i}-{value!r}")
        for mid, mutate, exc, names in _out_mutations(api, kw) + api.special:
            yield pytest.param(api, mutate, exc, names, id=f"{api.name}-{mid}")
        if api.backend_kw:
            yield pytest.param(api, lambda k: None, VE, ("backend",),
                               id=f"{api.name}-backend-unknown", marks=pytest.mark.unknown)
            if backend == "cpu" and api.arrays:
                yield pytest.param(api, lambda k: None, TE, ("backend",),
                                   id=f"{api.name}-backend-cuda-for-numpy",
                                   marks=pytest.mark.cuda_backend)


def _check_raises(api, mutate, exc, names, backend, request):
    rng = np.random.default_rng(0)
    kw = api.build(rng, np.dtype(np.float32), False)
    before = fingerprint(kw)
    bad = dict(kw)
    mutate(bad)
    if request.node.get_closest_marker("unknown"):
        backend = "tpu"
    elif request.node.get_closest_marker("cuda_backend"):
        backend = "cuda"
    with pytest.raises((ValueError, TypeError)) as info:
        api.call(bad, backend)
    msg = str(info.value)
    assert isinstance(info.value, exc), f"{api.name}: expected {exc.__name__}, got " \
                                        f"{type(info.value).__name__}: {msg}"
    assert msg.startswith(f"{api.name}: "), f"message does not name {api.name}: {msg}"
    assert any(f"'{n}" in msg for n in names), f"message does not name {names}: {msg}"
    assert fingerprint(kw) == before, f"{api.name}: a failing call modified its arguments"


@pytest.mark.parametrize("api,mutate,exc,names", list(_cases("cpu")))
def test_bad_input_raises_naming_function_and_argument_on_cpu(api, mutate, exc, names,
                                                              request):
    _check_raises(api, mutate, exc, names, "cpu", request)


@pytest.mark.parametrize("api,mutate,exc,names", list(_cases("cuda_emulator")))
def test_bad_input_raises_naming_function_and_argument_on_cuda_emulator(api, mutate, exc,
                                                                        names, request):
    _check_raises(api, mutate, exc, names, "cuda_emulator", request)


def test_the_table_covers_every_public_function():
    assert {api.name for api in ALL} >= public_functions()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("api", ALL, ids=lambda a: a.name)
def test_the_valid_call_of_each_row_runs_and_modifies_only_what_it_owns(api, backend):
    """The battery's starting point is a valid call (else every case above would pass
    for the wrong reason); a successful call changes only its outputs and the arrays
    documented as updated in place."""
    kw = api.build(np.random.default_rng(0), np.dtype(np.float32), False)
    owned = {"out", *api.inplace}
    before = {k: fingerprint({k: v}) for k, v in kw.items() if k not in owned}
    api.call(kw, backend if api.backend_kw else None)
    for k, h in before.items():
        assert fingerprint({k: kw[k]}) == h, f"{api.name}: '{k}' was modified"


# --------------------------------------------------------------------------- fastreg.nn layers

def _layers():
    import fastreg.nn as nn
    rng = np.random.default_rng(0)
    return [nn.Linear(6, 3, rng=rng), nn.ReLU(), nn.LayerNorm(6), nn.RMSNorm(6),
            nn.BatchNorm1d(6), nn.GroupNorm(2, 6), nn.Dropout(0.3), nn.GaussianNoise(0.1),
            nn.DropConnectLinear(6, 3, p=0.2, rng=rng), nn.Sequential(nn.LayerNorm(6))]


@pytest.mark.parametrize("bad", [[[1.0] * 6] * 4, 3.0, "x", None], ids=["list", "float", "str",
                                                                        "none"])
def test_nn_layers_reject_a_non_array_input_naming_the_layer(bad):
    for layer in _layers():
        name = type(layer.layers[0] if hasattr(layer, "layers") else layer).__name__
        with pytest.raises(TypeError, match=rf"^{name}\.forward: 'x' must be a NumPy or CuPy "
                                            "array"):
            layer.forward(bad, training=True)
