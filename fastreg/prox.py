"""Proximal operators, fused optimizer steps, label-smoothed cross-entropy, data scaling.

Each public function validates its arguments (``fastreg._checks``), picks the
implementation (``fastreg._backend``) and returns.

Update rules
------------
The per-element arithmetic of the fused ops, the contract every backend
implements in exactly this order. The compiled backends compute in the
parameter's dtype (float32 math for float32 tensors, float64 for float64),
as PyTorch's optimizers do, with every operation rounded on its own (no fused
multiply-add), so a result does not depend on how the elements are split
among threads or vector lanes. Scalars (``lr``, ``1 - dampening``,
``lr / (1 - beta1**step)``, ...) are formed in float64 and rounded once to the
parameter's dtype. The NumPy reference computes the same formulas in float64.

``soft(x, t) = x - clamp(x, -t, t)``
    equals ``sign(x) * max(|x| - t, 0)`` exactly: ``x - t`` or ``x + t`` outside
    ``[-t, t]`` and exactly 0 inside, as ``torch.nn.functional.softshrink``.

``sgd_step`` (``torch.optim.SGD``, then decoupled decay and the L1 prox)::

    d = -g if maximize else g
    if weight_decay:                d = d + weight_decay * w        (coupled L2, w before the step)
    if momentum:
        b = d                                   on the first step (torch: buf = clone(d))
        b = b * momentum + (1 - dampening) * d  afterwards
        d = d + momentum * b if nesterov else b
    w = w * (1 - lr * decoupled_weight_decay)
    w = w + (-lr) * d
    w = soft(w, lr * l1)

``adam_step`` / ``adamw_step`` (``torch.optim.Adam`` / ``AdamW``, then the L1 prox)::

    d = -g if maximize else g
    if weight_decay:
        w = w * (1 - lr * weight_decay)         decoupled (AdamW)
        d = d + weight_decay * w                coupled L2 (Adam)
    m = m + (1 - beta1) * (d - m)               (torch's lerp; for 1 - beta1 >= 0.5:
                                                 m = d - (d - m) * beta1)
    v = v * beta2 + ((1 - beta2) * d) * d
    if amsgrad: vmax = max(vmax, v); u = vmax   else u = v
    w = w + ((-lr / (1 - beta1**step)) * m) / (sqrt(u) / sqrt(1 - beta2**step) + eps)
    w = soft(w, lr * l1)

The L1 prox with threshold ``lr * l1`` is the proximal-gradient step for the
penalty ``l1 * |w|_1``: elements end exactly at zero, where a subgradient
``l1 * sign(w)`` added to the gradient would oscillate around it.

Another backend reproduces the CPU results bit for bit when it rounds every
operation as written, with IEEE division and square root. The CUDA kernels do
(``kernels/prox.cu``): ``__fmul_rn``/``__fadd_rn`` & co. keep the compiler
from contracting ``a * b + c`` into one fused multiply-add, so the elementwise
prox, the optimizer steps and the apply pass of the group ops give the CPU's
float32/float64 bits; denormal results differ where the GPU flushes them to
zero (CuPy compiles with ``-ftz=true``). float16/bfloat16 (GPU only) compute
in float32, with the scalars rounded once to float32, and round once when
stored.

Conventions
-----------
- Backends: NumPy arrays run the Numba kernels ("cpu") or the NumPy reference
  ("reference"); CuPy arrays run the CUDA kernels ("cuda"); "cuda_emulator"
  runs those CUDA kernels on NumPy arrays under a host emulation.
- dtypes float32 and float64 on the CPU; float16, bfloat16
  (``ml_dtypes.bfloat16``), float32 and float64 on the CUDA backends.
  Optimizer state (momentum buffer, ``exp_avg``, ...) has the parameter's
  dtype, as PyTorch keeps it; 16-bit state is loaded to float32, updated,
  used for the step and stored rounded, as PyTorch's fused CUDA Adam does.
- The cross-entropy and the group statistics sum in other orders on the GPU
  than on the CPU (and the cross-entropy's exp differs): they agree with the
  reference within rounding, not bit for bit.
- In place: ``*_step`` update ``w`` and its state arrays in place (and return
  ``w``); ``prox_*``/``max_norm`` write ``out`` (``out=w`` for in place).
  Nothing else is modified. Arrays updated in place must be writeable and
  must not share memory with any other argument.
- Lists: ``sgd_step``, ``adam_step`` and ``adamw_step`` accept lists of
  tensors (with lists of gradients and states) and update them all in one
  compiled call, as PyTorch's ``foreach``/``fused`` optimizers do; the result
  is bitwise what a call per tensor gives.
- Groups (``prox_group_l1``, ``max_norm``, ``standardize``, ``min_max_scale``):
  ``axis`` names the axes a group spans, the axes the norm or statistic is
  reduced over, as in ``np.sum(axis=)`` and Keras's ``MaxNorm(axis=)``; the
  remaining axes index the groups. A PyTorch ``Linear`` weight ``(out, in)``
  has one group per output unit with ``axis=1``; a Keras ``Dense`` kernel
  ``(in, out)`` with ``axis=0``; a PyTorch conv weight ``(O, I, kh, kw)`` one
  per output filter with ``axis=(1, 2, 3)``; a Keras conv kernel
  ``(kh, kw, I, O)`` with ``axis=(0, 1, 2)``.
- Results are bitwise identical run to run and at any thread count.
"""

from __future__ import annotations

import math
import numpy as np

from . import _backend, _checks

__all__ = [
    "prox_l1", "prox_elastic_net", "prox_group_l1", "max_norm",
    "sgd_step", "adam_step", "adamw_step",
    "cross_entropy_label_smoothing",
    "standardize", "min_max_scale",
]

_REDUCTIONS = ("mean", "sum", "none")
_STYLES = ("uniform", "others")


def _setup(caller, backend, x, name="x", **others):
    """Check the library and dtype of the main array; returns the implementation."""
    _checks.same_kind(caller, **{name: x}, **others)
    impl, dtypes = _backend.dtypes("prox", x, *others.values(), backend=backend, caller=caller)
    _checks.array(name, x, caller=caller, dtypes=dtypes)
    return impl


# --------------------------------------------------------------------------- elementwise prox

def prox_l1(w, threshold, *, out=None, backend=None):
    """Soft-thresholding, the proximal operator of ``threshold * |w|_1``.

    ``y = sign(w) * max(|w| - threshold, 0)``, computed as
    ``w - clamp(w, -threshold, threshold)``: exactly 0 where ``|w| <= threshold``
    (``torch.nn.functional.softshrink(w, threshold)``).

    Parameters
    ----------
    w : ndarray, float32 or float64 (GPU: also float16, bfloat16), any shape and layout
    threshold : float >= 0, or an array of w's dtype that broadcasts to
        ``w.shape`` (per-element or per-channel thresholds), finite and >= 0
    out : ndarray like w, or None
        Where to write ``y``; ``out=w`` updates w in place. A fresh array
        (same memory layout as w) when None.
    backend : None, "cpu", "reference", "cuda" or "cuda_emulator"

    Returns
    -------
    y : ndarray, ``out`` when given

    Notes
    -----
    ``y = argmin_x 1/2 |x - w|^2 + threshold * |x|_1``; optimality:
    ``0 in y - w + threshold * d|y|``. Bytes moved: read w (and an array
    threshold), write y. w is not modified unless ``out=w``.
    """
    caller = "prox_l1"
    impl = _setup(caller, backend, w, "w", threshold=threshold, out=out)
    threshold = _checks.scalar_or_array("threshold", threshold, caller=caller, dtype=w.dtype,
                                        shape=w.shape, ge=0)
    out = _checks.inplace_out(caller, out, w, name="w", inputs={"threshold": threshold})
    impl.prox_l1(w, threshold, out)
    return out


def prox_elastic_net(w, l1, l2, *, out=None, backend=None):
    """Proximal operator of the elastic-net penalty ``l1 * |x|_1 + l2/2 * |x|^2``.

    ``y = soft(w, l1) / (1 + l2)``, the minimizer of
    ``1/2 |x - w|^2 + l1 * |x|_1 + l2/2 * |x|^2``; optimality:
    ``0 in y - w + l1 * d|y| + l2 * y``.

    Parameters
    ----------
    w : ndarray, float32 or float64
    l1, l2 : float >= 0, or arrays of w's dtype broadcasting to ``w.shape``
    out : ndarray like w or None (``out=w`` for in place)

    Returns
    -------
    y : ndarray, ``out`` when given

    Notes
    -----
    For a proximal-gradient step with learning rate ``lr`` pass ``lr * l1`` and
    ``lr * l2``. Bytes moved: read w (and array parameters), write y.
    """
    caller = "prox_elastic_net"
    impl = _setup(caller, backend, w, "w", l1=l1, l2=l2, out=out)
    l1 = _checks.scalar_or_array("l1", l1, caller=caller, dtype=w.dtype, shape=w.shape, ge=0)
    l2 = _checks.scalar_or_array("l2", l2, caller=caller, dtype=w.dtype, shape=w.shape, ge=0)
    out = _checks.inplace_out(caller, out, w, name="w", inputs={"l1": l1, "l2": l2})
    impl.prox_elastic_net(w, l1, l2, out)
    return out


# --------------------------------------------------------------------------- group prox

def _group_shape(shape, axis):
    """Shape of per-group values with kept dims: 1 along the reduced axes."""
    return tuple(1 if k in axis else n for k, n in enumerate(shape))


def prox_group_l1(w, threshold, *, axis, out=None, backend=None):
    """Block soft-thresholding, the proximal operator of the group lasso penalty.

    For each group ``w_g`` (the elements that share their indices along the
    axes not in ``axis``)::

        y_g = w_g * max(0, 1 - threshold_g / |w_g|_2)

    so a group with ``|w_g|_2 <= threshold_g`` becomes exactly 0 and the others
    shrink toward 0 along their own direction.

    Parameters
    ----------
    w : ndarray, float32 or float64
    threshold : float >= 0, or an array of w's dtype broadcasting to the group
        shape (w's shape with 1 along ``axis``), for per-group thresholds such
        as ``lam * sqrt(group_size)``
    axis : int, tuple of ints or None
        The axes each group spans (the norm is taken over them; None: all
        axes, one group). Rows of a PyTorch ``Linear`` weight: ``axis=1``;
        output filters of a PyTorch conv weight ``(O, I, kh, kw)``:
        ``axis=(1, 2, 3)``; Keras layouts put the output axis last:
        ``axis=0`` for a Dense kernel.
    out : ndarray like w or None (``out=w`` for in place)

    Returns
    -------
    y : ndarray, ``out`` when given

    Notes
    -----
    ``y = argmin_x 1/2 |x - w|^2 + sum_g threshold_g |x_g|_2``; optimality:
    ``y_g - w_g + threshold_g y_g / |y_g| = 0`` where ``y_g != 0`` and
    ``|w_g| <= threshold_g`` where ``y_g = 0``. Norms accumulate in float64.
    Bytes moved: read w, write y (w read twice when groups run across the
    contiguous axis and do not fit in cache). A NaN in a group makes the
    whole group NaN.
    """
    caller = "prox_group_l1"
    impl = _setup(caller, backend, w, "w", threshold=threshold, out=out)
    axis = _checks.axes("axis", axis, caller=caller, ndim=w.ndim)
    threshold = _checks.scalar_or_array("threshold", threshold, caller=caller, dtype=w.dtype,
                                        shape=_group_shape(w.shape, axis), ge=0)
    out = _checks.inplace_out(caller, out, w, name="w", inputs={"threshold": threshold})
    impl.prox_group_l1(w, threshold, axis, out)
    return out


def max_norm(w, max_value, *, axis, eps=1e-7, out=None, backend=None):
    """Max-norm constraint (Keras ``MaxNorm``): rescale groups whose norm exceeds ``max_value``.

    For each group ``w_g`` (see ``axis``), with ``n = |w_g|_2``::

        y_g = w_g * min(n, max_value) / (n + eps)

    Keras's formula, its ``epsilon()`` of 1e-7 included. ``eps=0`` gives the
    exact projection onto the ball, ``w_g * min(1, max_value / n)``, which
    leaves groups inside the ball bitwise unchanged.

    Parameters
    ----------
    w : ndarray, float32 or float64
    max_value : float > 0
    axis : int, tuple of ints or None
        As Keras's ``axis``: the axes along which the norms are computed
        (Keras ``Dense`` kernel ``(in, out)``: ``axis=0``; Keras conv kernel
        ``(kh, kw, in, out)``: ``axis=(0, 1, 2)``; PyTorch ``Linear`` weight
        ``(out, in)``: ``axis=1``). ``torch.renorm(w, 2, dim, max_value)``
        takes the opposite view: ``dim`` is the one axis *not* reduced.
    eps : float >= 0
    out : ndarray like w or None (``out=w`` for in place)

    Returns
    -------
    y : ndarray, ``out`` when given

    Notes
    -----
    Norms accumulate in float64. Bytes moved: read w, write y.
    """
    caller = "max_norm"
    impl = _setup(caller, backend, w, "w", out=out)
    axis = _checks.axes("axis", axis, caller=caller, ndim=w.ndim)
    max_value = _checks.scalar("max_value", max_value, caller=caller, gt=0)
    eps = _checks.scalar("eps", eps, caller=caller, ge=0)
    out = _checks.inplace_out(caller, out, w, name="w", inputs={})
    impl.max_norm(w, max_value, axis, eps, out)
    return out


# --------------------------------------------------------------------------- optimizer steps

def _as_list(caller, name, value, n, listed):
    """The list of per-tensor arrays of ``name`` (None entries allowed by the caller)."""
    if listed:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{caller}: '{name}' must be a list of arrays like 'w', "
                            f"got {type(value).__name__}.")
        if len(value) != n:
            raise ValueError(f"{caller}: '{name}' must have one array per tensor of 'w' "
                             f"({n}), got {len(value)}.")
        return list(value)
    if isinstance(value, (list, tuple)):
        raise TypeError(f"{caller}: '{name}' must be an array when 'w' is an array, got a list.")
    return [value]


def _check_tensors(caller, backend, ws, listed, state, written):
    """Validate parameter tensors, their gradients and state; returns the implementation.

    ``state`` maps names to lists of arrays (None where the state is unused);
    the names in ``written`` are updated in place. Every array must have its
    parameter's shape and dtype; nothing may share memory with anything else.
    The common case (NumPy or CuPy arrays of one type that pass) costs a few
    attribute reads per array; the detailed checks run only to word an error.
    """
    if listed and len(ws) == 0:
        return None
    label = (lambda name, i: f"{name}[{i}]") if listed else (lambda name, i: name)
    columns = [(k, v) for k, v in state.items() if v is not None]
    arrays = [ws] + [v for _, v in columns]
    kind = type(ws[0])                         # NumPy or CuPy arrays, one type: a few
    if _backend.array_kind(ws[0]) is None or \
            not all(type(a) is kind for col in arrays for a in col):   # attribute reads each
        for i, w in enumerate(ws):             # mixed or not arrays: the generic checks
            if _backend.array_kind(w) is None:
                _checks.array(label("w", i), w, caller=caller, dtypes=())
            _checks.same_kind(caller, **{label("w", i): w},
                              **{label(k, i): v[i] for k, v in columns})
            _backend.dtypes("prox", w, *(v[i] for _, v in columns), backend=backend,
                            caller=caller)
    impl, dtypes = _backend.dtypes("prox", ws[0], backend=backend, caller=caller)
    named = []
    for i, w in enumerate(ws):
        if w.dtype not in dtypes:
            _checks.array(label("w", i), w, caller=caller, dtypes=dtypes)
        if not _checks._writeable(w):
            raise ValueError(f"{caller}: '{label('w', i)}' must be writeable (it is updated "
                             "in place), got a read-only array.")
        named.append((label("w", i), w))
        for k, v in columns:
            a = v[i]
            if (type(a) is not kind or a.shape != w.shape or a.dtype != w.dtype
                    or (k in written and not _checks._writeable(a))):
                _checks.like(label(k, i), a, caller=caller, shape=w.shape, dtype=w.dtype,
                             writeable=k in written, none_ok=False)
            named.append((label(k, i), a))
    _checks.disjoint(caller, named)
    return impl


def sgd_step(w, g, *, lr, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
             weight_decay=0.0, decoupled_weight_decay=0.0, l1=0.0, momentum_buffer=None,
             first_step=False, backend=None):
    """One SGD step with PyTorch's semantics, decoupled weight decay and an L1 prox, in place.

    The update (see "Update rules" in this module's docstring)::

        d = (-g if maximize else g) + weight_decay * w
        b = d (first step) | b * momentum + (1 - dampening) * d;  d = d + momentum * b (nesterov) | b
        w = soft(w * (1 - lr * decoupled_weight_decay) - lr * d,  lr * l1)

    ``weight_decay`` is ``torch.optim.SGD``'s coupled L2 term; with
    ``decoupled_weight_decay=0`` and ``l1=0`` the step is exactly
    ``torch.optim.SGD``'s.

    Parameters
    ----------
    w : ndarray (float32 or float64), or a list of them
        Parameters, updated in place.
    g : ndarray like w, or a list matching w
        Gradients (read only).
    lr : float >= 0
    momentum, dampening : float >= 0
    nesterov, maximize : bool
        Nesterov momentum needs ``momentum > 0`` and ``dampening == 0`` (as torch).
    weight_decay : float >= 0, coupled L2 (added to the gradient)
    decoupled_weight_decay : float >= 0, ``w <- w * (1 - lr * decoupled_weight_decay)``
    l1 : float >= 0, L1 strength; the prox threshold is ``lr * l1``
    momentum_buffer : ndarray like w (or a list), required when ``momentum > 0``
        Updated in place; ignored (left untouched) when ``momentum == 0``.
    first_step : bool
        True on the first step of a fresh momentum buffer: the buffer is set
        to ``d`` (PyTorch's ``buf = clone(d)``, no dampening), whatever it held,
        so it may come from ``np.empty_like(w)``. False afterwards.

    Returns
    -------
    w : the updated array (or list), the same objects that were passed

    Notes
    -----
    One pass over memory: read w, g (and the buffer); write w (and the
    buffer). A list is applied by one compiled call over a table of the
    tensors' addresses, bitwise equal to a call per tensor; arrays that are
    not C-contiguous go through contiguous temporaries (extra passes).
    """
    caller = "sgd_step"
    listed = isinstance(w, (list, tuple))
    ws = list(w) if listed else [w]
    gs = _as_list(caller, "g", g, len(ws), listed)
    lr = _checks.scalar("lr", lr, caller=caller, ge=0)
    momentum = _checks.scalar("momentum", momentum, caller=caller, ge=0)
    dampening = _checks.scalar("dampening", dampening, caller=caller)
    nesterov = _checks.flag("nesterov", nesterov, caller=caller)
    maximize = _checks.flag("maximize", maximize, caller=caller)
    weight_decay = _checks.scalar("weight_decay", weight_decay, caller=caller, ge=0)
    decoupled_weight_decay = _checks.scalar("decoupled_weight_decay", decoupled_weight_decay,
                                            caller=caller, ge=0)
    l1 = _checks.scalar("l1", l1, caller=caller, ge=0)
    first_step = _checks.flag("first_step", first_step, caller=caller)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{caller}: 'nesterov' requires momentum > 0 and dampening == 0, "
                         f"got momentum={momentum!r} and dampening={dampening!r}.")
    bufs = None
    if momentum != 0:
        if momentum_buffer is None:
            raise ValueError(f"{caller}: 'momentum_buffer' must be an array like 'w' when "
                             "momentum > 0 (allocate it with np.empty_like(w) and pass "
                             "first_step=True on the first step), got None.")
        bufs = _as_list(caller, "momentum_buffer", momentum_buffer, len(ws), listed)
    impl = _check_tensors(caller, backend, ws, listed, {"g": gs, "momentum_buffer": bufs},
                          written={"momentum_buffer"})
    if impl is not None:
        impl.sgd_step(ws, gs, bufs, lr, momentum, dampening, nesterov, maximize, weight_decay,
                      decoupled_weight_decay, l1, first_step)
    return w


def _check_betas(caller, betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{caller}: 'betas' must be a pair (beta1, beta2), got {betas!r}.")
    return (_checks.scalar("betas[0]", betas[0], caller=caller, ge=0, lt=1),
            _checks.scalar("betas[1]", betas[1], caller=caller, ge=0, lt=1))


def _adam(caller, w, g, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, decoupled,
          amsgrad, max_exp_avg_sq, l1, maximize, backend):
    listed = isinstance(w, (list, tuple))
    ws = list(w) if listed else [w]
    n = len(ws)
    gs = _as_list(caller, "g", g, n, listed)
    ms = _as_list(caller, "exp_avg", exp_avg, n, listed)
    vs = _as_list(caller, "exp_avg_sq", exp_avg_sq, n, listed)
    step = _checks.integer("step", step, caller=caller, ge=1)
    lr = _checks.scalar("lr", lr, caller=caller, ge=0)
    beta1, beta2 = _check_betas(caller, betas)
    eps = _checks.scalar("eps", eps, caller=caller, ge=0)
    weight_decay = _checks.scalar("weight_decay", weight_decay, caller=caller, ge=0)
    amsgrad = _checks.flag("amsgrad", amsgrad, caller=caller)
    l1 = _checks.scalar("l1", l1, caller=caller, ge=0)
    maximize = _checks.flag("maximize", maximize, caller=caller)
    vmaxs = None
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError(f"{caller}: 'max_exp_avg_sq' must be an array like 'w' when "
                             "amsgrad=True (zeros before the first step), got None.")
        vmaxs = _as_list(caller, "max_exp_avg_sq", max_exp_avg_sq, n, listed)
    impl = _check_tensors(caller, backend, ws, listed,
                          {"g": gs, "exp_avg": ms, "exp_avg_sq": vs, "max_exp_avg_sq": vmaxs},
                          written={"exp_avg", "exp_avg_sq", "max_exp_avg_sq"})
    if impl is not None:
        impl.adam_step(ws, gs, ms, vs, vmaxs, step, lr, beta1, beta2, eps, weight_decay,
                       decoupled, amsgrad, l1, maximize)
    return w


_ADAM_DOC_PARAMS = """
    Parameters
    ----------
    w : ndarray (float32 or float64), or a list of them; updated in place
    g : ndarray like w (or a list); read only
    exp_avg, exp_avg_sq : ndarray like w (or lists); the moment estimates,
        updated in place; zeros before the first step (torch's state init)
    step : int >= 1, the index of this update (torch's ``state["step"]`` after
        its increment), for the bias corrections
    lr : float >= 0
    betas : (beta1, beta2), each in [0, 1)
    eps : float >= 0, added to ``sqrt(v) / sqrt(1 - beta2**step)``
    amsgrad : bool
    max_exp_avg_sq : ndarray like w (or a list), required with amsgrad
        (zeros before the first step), updated in place; ignored otherwise
    l1 : float >= 0, L1 strength; the prox threshold is ``lr * l1``
    maximize : bool

    Returns
    -------
    w : the updated array (or list), the same objects that were passed

    Notes
    -----
    One pass over memory: read w, g, exp_avg, exp_avg_sq (and
    max_exp_avg_sq); write w, exp_avg, exp_avg_sq (and max_exp_avg_sq). A
    list is applied by one compiled call, bitwise equal to a call per tensor.
"""


def adam_step(w, g, exp_avg, exp_avg_sq, *, step, lr, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
              max_exp_avg_sq=None, l1=0.0, maximize=False, backend=None):
    """One Adam step with PyTorch's semantics (coupled L2 by default) and an L1 prox, in place.

    ``torch.optim.Adam``: ``weight_decay`` adds ``weight_decay * w`` to the
    gradient (an L2 penalty, which the adaptive scaling then distorts);
    ``decoupled_weight_decay=True`` (torch's flag of the same name) decays the
    weights instead, ``w <- w * (1 - lr * weight_decay)``, which is AdamW
    (Loshchilov & Hutter, 2019). After the Adam update,
    ``w <- soft(w, lr * l1)``. See "Update rules" in this module's docstring.

    decoupled_weight_decay : bool
        False: L2 added to the gradient (Adam); True: decoupled decay (AdamW).
    """
    caller = "adam_step"
    decoupled = _checks.flag("decoupled_weight_decay", decoupled_weight_decay, caller=caller)
    return _adam(caller, w, g, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                 decoupled, amsgrad, max_exp_avg_sq, l1, maximize, backend)


def adamw_step(w, g, exp_avg, exp_avg_sq, *, step, lr, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=0.01, amsgrad=False, max_exp_avg_sq=None, l1=0.0, maximize=False,
               backend=None):
    """One AdamW step with PyTorch's semantics and an L1 prox, in place.

    ``torch.optim.AdamW``: ``w <- w * (1 - lr * weight_decay)``, then the Adam
    update with bias corrections, then ``w <- soft(w, lr * l1)``. Equal to
    ``adam_step(..., decoupled_weight_decay=True)``. See "Update rules" in
    this module's docstring.

    weight_decay : float >= 0, decoupled decay (default 0.01, as torch's AdamW)
    """
    return _adam("adamw_step", w, g, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                 True, amsgrad, max_exp_avg_sq, l1, maximize, backend)


adam_step.__doc__ += _ADAM_DOC_PARAMS
adamw_step.__doc__ += _ADAM_DOC_PARAMS


# --------------------------------------------------------------------------- cross-entropy

def cross_entropy_label_smoothing(logits, target, *, smoothing, reduction="mean",
                                  ignore_index=None, style="uniform", out=None, backend=None):
    """Cross-entropy with label smoothing and its gradient, fused in one pass over the logits.

    Per row ``i`` with logits ``z`` (K classes), target ``t`` and
    ``lse = log(sum_k exp(z_k))``, the loss is ``-sum_k q_k log softmax(z)_k``
    against the smoothed target distribution ``q``:

    - ``style="uniform"`` (PyTorch's ``label_smoothing``): ``q = (1 - s) * onehot(t) + s / K``
    - ``style="others"``: ``q_t = 1 - s`` and ``q_k = s / (K - 1)`` for ``k != t``

    and ``dlogits_i = scale * (softmax(z_i) - q)`` with ``scale = 1 / n_valid``
    for ``"mean"`` and 1 otherwise.

    Parameters
    ----------
    logits : ndarray (N, K), float32 or float64
        One row per sample; reshape ``(B, T, V)`` to ``(B * T, V)`` (the class
        axis is the last one).
    target : integer ndarray (N,), class indices in [0, K) or ``ignore_index``
    smoothing : float in [0, 1]
    reduction : "mean", "sum" or "none"
        "mean" divides by the number of rows not ignored (PyTorch's rule; NaN
        when every row is ignored, as PyTorch).
    ignore_index : int or None
        Rows whose target equals it have loss 0 and gradient 0.
    style : "uniform" or "others" ("others" needs K >= 2 when smoothing > 0)
    out : tuple ``(loss, dlogits)`` of preallocated outputs (entries may be
        None). ``dlogits`` may be ``logits`` itself: the gradient then
        overwrites the logits row by row (each row is read before it is
        written), saving the memory of a second (N, K) array.

    Returns
    -------
    loss : ndarray of logits' dtype, shape () for "mean"/"sum", (N,) for "none"
    dlogits : ndarray (N, K), the gradient of the returned loss (for "none":
        of ``loss.sum()``, i.e. row i holds d loss_i / d z_i)

    Notes
    -----
    Per row: max and sum of the logits, then ``sum exp(z - max)`` (float64
    accumulation) with ``exp(z - max)`` stored into dlogits, then dlogits
    rescaled; the row stays in cache, so memory sees the logits read once and
    dlogits written once. logits is not modified unless passed as ``out[1]``.
    """
    caller = "cross_entropy_label_smoothing"
    impl = _setup(caller, backend, logits, "logits", target=target)
    if logits.ndim != 2:
        raise ValueError(f"{caller}: 'logits' must be a 2-D array (N, K), got shape "
                         f"{logits.shape}.")
    N, K = logits.shape
    if K == 0:
        raise ValueError(f"{caller}: 'logits' must have at least one class (K >= 1), got "
                         f"shape {logits.shape}.")
    if _backend.array_kind(target) is None:
        raise TypeError(f"{caller}: 'target' must be an integer array, got "
                        f"{type(target).__name__}.")
    if target.dtype.kind not in "iu":
        raise TypeError(f"{caller}: 'target' must be an integer array, got dtype {target.dtype}.")
    if tuple(target.shape) != (N,):
        raise ValueError(f"{caller}: 'target' must have shape ({N},) to match logits, got "
                         f"shape {target.shape}.")
    smoothing = _checks.scalar("smoothing", smoothing, caller=caller, ge=0, le=1)
    reduction = _checks.choice("reduction", reduction, caller=caller, choices=_REDUCTIONS)
    style = _checks.choice("style", style, caller=caller, choices=_STYLES)
    if ignore_index is not None:
        ignore_index = _checks.integer("ignore_index", ignore_index, caller=caller)
    if style == "others" and K < 2 and smoothing > 0:
        raise ValueError(f"{caller}: style='others' spreads 'smoothing' over the K - 1 other "
                         f"classes and needs K >= 2, got K = {K}.")
    # one reduction (on CuPy arrays one synchronization) for the common, valid case
    outside = (target < 0) | (target >= K)
    if ignore_index is not None:
        outside &= target != ignore_index
    if bool(outside.any()):
        bad = target[outside][0]
        raise ValueError(f"{caller}: 'target' must hold class indices in [0, {K})"
                         f"{'' if ignore_index is None else ' or ignore_index'}, got {int(bad)}.")
    loss_shape = (N,) if reduction == "none" else ()
    # dlogits may be logits itself (the same view): the gradient overwrites it in place
    inplace = (isinstance(out, (tuple, list)) and len(out) == 2 and out[1] is not None
               and _checks.same_view(out[1], logits))
    if inplace and not _checks._writeable(logits):
        raise ValueError(f"{caller}: 'out[1] (dlogits)' must be writeable, got a read-only "
                         "array.")
    outs = _checks.out(caller, (out[0], None) if inplace else out,
                       [("loss", loss_shape, logits.dtype, None),
                        ("dlogits", logits.shape, None if inplace else logits.dtype, logits)],
                       dict(logits=logits, target=target))
    if inplace:
        outs[1] = logits
    impl.cross_entropy_label_smoothing(logits, target, smoothing, reduction, ignore_index,
                                       style, outs)
    return tuple(outs)


# --------------------------------------------------------------------------- data scaling

def _stats_shape(shape, axis):
    return tuple(n for k, n in enumerate(shape) if k not in axis)


def _check_fit_size(caller, x, axis):
    n = int(math.prod([x.shape[k] for k in axis]))
    if n == 0 and int(math.prod(_stats_shape(x.shape, axis))) > 0:
        raise ValueError(f"{caller}: 'x' must have at least one element along axis {axis} "
                         f"to fit statistics, got shape {x.shape}.")


def standardize(x, *, axis=0, eps=0.0, mean=None, std=None, out=None, backend=None):
    """Standardize features to zero mean and unit variance; fit or apply the statistics.

    Fit (``mean`` and ``std`` None)::

        mean = mean(x, axis),  var = mean((x - mean)**2, axis)     (biased, ddof=0)
        std  = 1 if the feature is constant else sqrt(var + eps)
        y    = (x - mean) / std

    Apply (``mean`` and ``std`` given, e.g. fitted on training data):
    ``y = (x - mean) / std`` with those statistics.

    With ``eps=0`` this is scikit-learn's ``StandardScaler``: ``std`` is its
    ``scale_``, and a feature counts as constant, keeping scale 1 so that it
    maps to 0, when ``var <= n * eps64 * var + (n * mean * eps64)**2``
    (``eps64`` the float64 machine epsilon; scikit-learn's rule, which absorbs
    the rounding of a constant column's variance).

    Parameters
    ----------
    x : ndarray, float32 or float64
    axis : int, tuple of ints or None
        The axes the statistics are taken over (0: per feature over the
        samples of an ``(N, D)`` table; ``(0, 2, 3)``: per channel of NCHW
        images).
    eps : float >= 0, added to the variance of non-constant features
    mean, std : ndarrays of the statistics' shape (x's shape without
        ``axis``) and x's dtype, or None; std > 0
    out : tuple ``(y, mean, std)`` of preallocated outputs (in apply mode
        only ``y`` is computed: the other entries must be None)

    Returns
    -------
    y : ndarray like x
    mean, std : ndarrays of x's dtype, shape x.shape without ``axis`` (the
        given arrays in apply mode)

    Notes
    -----
    Statistics accumulate in float64 (shifted sums, as the norm kernels).
    Fitting reads x twice when the groups do not fit in cache (once for the
    statistics, once to write y); applying reads x once. NaN propagates.
    """
    caller = "standardize"
    impl = _setup(caller, backend, x, "x", mean=mean, std=std)
    axis = _checks.axes("axis", axis, caller=caller, ndim=x.ndim)
    eps = _checks.scalar("eps", eps, caller=caller, ge=0)
    sshape = _stats_shape(x.shape, axis)
    if (mean is None) != (std is None):
        raise ValueError(f"{caller}: 'mean' and 'std' must be given together (apply fitted "
                         "statistics) or both be None (fit), got only one.")
    fit = mean is None
    if fit:
        _check_fit_size(caller, x, axis)
    else:
        _checks.like("mean", mean, caller=caller, shape=sshape, dtype=x.dtype, none_ok=False)
        _checks.like("std", std, caller=caller, shape=sshape, dtype=x.dtype, none_ok=False)
        _checks.scalar_or_array("std", std, caller=caller, dtype=x.dtype, shape=sshape, gt=0)
    sd = x.dtype if fit else None
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, x), ("mean", sshape, sd, None),
                                     ("std", sshape, sd, None)], dict(x=x, mean=mean, std=std))
    impl.standardize(x, axis, eps, mean, std, outs)
    return (outs[0], outs[1], outs[2]) if fit else (outs[0], mean, std)


def _check_range(caller, feature_range):
    if not isinstance(feature_range, (tuple, list)) or len(feature_range) != 2:
        raise TypeError(f"{caller}: 'feature_range' must be a pair (min, max), got "
                        f"{feature_range!r}.")
    lo = _checks.scalar("feature_range[0]", feature_range[0], caller=caller)
    hi = _checks.scalar("feature_range[1]", feature_range[1], caller=caller)
    if not lo < hi:
        raise ValueError(f"{caller}: 'feature_range' must have min < max, got {feature_range!r}.")
    return lo, hi


def min_max_scale(x, *, axis=0, feature_range=(0.0, 1.0), data_min=None, data_max=None,
                  out=None, backend=None):
    """Scale features linearly onto ``feature_range``; fit or apply the statistics.

    Fit (``data_min``, ``data_max`` None): the minimum and maximum over
    ``axis``. Then, with ``(a, b) = feature_range``::

        scale = (b - a) / range,   range = data_max - data_min, taken as 1 when
                                   range < 10 * finfo(x.dtype).eps (a constant feature)
        y     = (x - data_min) * scale + a

    scikit-learn's ``MinMaxScaler`` (a constant feature maps to ``a``); its
    ``X * scale_ + min_`` is rearranged as above, which avoids cancellation
    when ``data_min`` is large. New data may fall outside ``feature_range``
    (no clipping, as scikit-learn's default).

    Parameters
    ----------
    x : ndarray, float32 or float64
    axis : int, tuple of ints or None, the axes reduced (0: per feature)
    feature_range : (min, max) with min < max
    data_min, data_max : ndarrays of x's dtype and shape x.shape without
        ``axis`` (apply mode), or None (fit)
    out : tuple ``(y, data_min, data_max)`` of preallocated outputs (apply
        mode: only ``y``)

    Returns
    -------
    y : ndarray like x
    data_min, data_max : ndarrays of x's dtype (the given arrays in apply mode)

    Notes
    -----
    Fitting reads x twice when the groups do not fit in cache; applying
    reads x once. NaN propagates (scikit-learn ignores NaN instead).
    """
    caller = "min_max_scale"
    impl = _setup(caller, backend, x, "x", data_min=data_min, data_max=data_max)
    axis = _checks.axes("axis", axis, caller=caller, ndim=x.ndim)
    feature_range = _check_range(caller, feature_range)
    sshape = _stats_shape(x.shape, axis)
    if (data_min is None) != (data_max is None):
        raise ValueError(f"{caller}: 'data_min' and 'data_max' must be given together (apply "
                         "fitted statistics) or both be None (fit), got only one.")
    fit = data_min is None
    if fit:
        _check_fit_size(caller, x, axis)
    else:
        _checks.like("data_min", data_min, caller=caller, shape=sshape, dtype=x.dtype,
                     none_ok=False)
        _checks.like("data_max", data_max, caller=caller, shape=sshape, dtype=x.dtype,
                     none_ok=False)
    sd = x.dtype if fit else None
    outs = _checks.out(caller, out, [("y", x.shape, x.dtype, x), ("data_min", sshape, sd, None),
                                     ("data_max", sshape, sd, None)],
                       dict(x=x, data_min=data_min, data_max=data_max))
    impl.min_max_scale(x, axis, feature_range, data_min, data_max, outs)
    return (outs[0], outs[1], outs[2]) if fit else (outs[0], data_min, data_max)
