"""Optimizers for PyTorch on fastreg's fused steps: ``SGD``, ``Adam``, ``AdamW``.

Each is a subclass of PyTorch's optimizer of the same name, so the
constructor arguments, ``param_groups``, hooks, learning-rate schedulers and
``state_dict`` are PyTorch's own: the state keys are PyTorch's
(``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``), created exactly as PyTorch creates them, so a
checkpoint of either loads into the other. Only ``step`` differs: the
parameters of a group that have gradients are updated by one call of
``fastreg.sgd_step`` / ``fastreg.adam_step`` per (device, dtype) (and, for
Adam, step count), the list form: one compiled pass over every tensor, in
place, on zero-copy views (NumPy on the CPU, CuPy through DLPack on
PyTorch's current stream on CUDA). The update rules are PyTorch's
(``fastreg.prox``'s docstring gives them with their rounding); the results
match ``torch.optim``'s to rounding.

Additions, keyword-only (also per parameter group):

- ``l1`` (all three): after the update, ``w <- soft(w, lr * l1)``, the
  proximal step of the penalty ``l1 * |w|_1``: weights end at exactly 0.
- ``decoupled_weight_decay`` (SGD, a float): ``w <- w * (1 - lr * strength)``
  before the gradient step (SGDW). Adam has PyTorch's own boolean flag of
  that name (AdamW's rule); AdamW always decouples.

What fastreg's step does not run goes to PyTorch's algorithm (its functional
``sgd``/``adam``, on the same state), with a one-time
:class:`fastreg.torch.FallbackWarning`: groups asking for PyTorch's
implementations (``foreach=True``, ``fused=True``), ``differentiable=True``,
``capturable=True``, a step under ``torch.compile`` or with AMP's in-step
gradient scaling; and parameters with sparse gradients, complex values, a
dtype or device fastreg does not run (float16/bfloat16 on the CPU; CUDA
without CuPy). ``l1`` is then applied after PyTorch's update by the same
formula (``w - clamp(w, -t, t)``); SGD's ``decoupled_weight_decay`` has no
PyTorch equivalent, and asking for it there raises a ValueError before any
parameter moves. For complex parameters ``l1`` shrinks each element's
modulus (``w * max(0, 1 - t / |w|)``, the prox of the sum of moduli).
``foreach=False`` and ``fused=False`` are no requests and run fastreg's step.
"""

from __future__ import annotations

import numbers

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

import fastreg

from . import _bridge as B

__all__ = ["SGD", "Adam", "AdamW"]

_increment_version = torch._C._increment_version


def _number(value):
    """A hyperparameter as a Python float (PyTorch allows 1-element tensors)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _check_extra(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0.0:
        raise ValueError(f"Invalid {name} value: {value}")
    return float(value)


def _param_reason(p, g):
    """Why fastreg's step cannot update parameter p with gradient g (None: it can)."""
    if g.layout != torch.strided or p.layout != torch.strided:
        return "sparse gradients"
    if p.is_complex():
        return "complex parameters"
    if torch.overrides.has_torch_function((p, g)):
        return "a tensor subclass with __torch_function__"
    if g.dtype != p.dtype or g.device != p.device:
        return "a gradient of another dtype or device than its parameter"
    if p.is_cpu:
        dtypes = B.CPU_DTYPES
    elif p.is_cuda:
        cupy, dtypes = B._cuda_support()
        if cupy is None:
            return dtypes
    else:
        return f"device type {p.device.type!r} (fastreg runs CPU and CUDA tensors)"
    if p.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"dtype {str(p.dtype).replace('torch.', '')} on {p.device.type.upper()} " \
               f"(fastreg runs {names} there)"
    return None


class _FastregStep:
    """``step`` for PyTorch's optimizers: fastreg's fused list step where it runs,
    PyTorch's functional algorithm (on the same state) where it does not."""

    _extras = ("l1",)

    def _init_extras(self, **extras):
        for name, value in extras.items():
            self.defaults[name] = _check_extra(name, value)
        for group in self.param_groups:
            for name in extras:
                group[name] = _check_extra(name, group.get(name, self.defaults[name]))

    def __setstate__(self, state):
        super().__setstate__(state)
        # A PyTorch checkpoint has no fastreg extras: the constructor's values hold.
        defaults = getattr(self, "defaults", {})
        for group in self.param_groups:
            for name in self._extras:
                group.setdefault(name, defaults.get(name, 0.0))

    def add_param_group(self, param_group):
        for name in self._extras:
            if name in param_group:
                _check_extra(name, param_group[name])
        super().add_param_group(param_group)

    def _group_reason(self, group):
        if group.get("foreach"):
            return "foreach=True (PyTorch's multi-tensor implementation was asked for)"
        if group.get("fused"):
            return "fused=True (PyTorch's fused kernels were asked for)"
        if group.get("differentiable"):
            return "differentiable=True (autograd through the step)"
        if group.get("capturable"):
            return "capturable=True (CUDA graph capture)"
        if torch.compiler.is_compiling():
            return "inside torch.compile, where PyTorch's step compiles with the graph"
        if getattr(self, "grad_scale", None) is not None or \
                getattr(self, "found_inf", None) is not None:
            return "AMP gradient scaling inside the step"
        return None

    def step(self, closure=None):
        """One optimization step over every parameter with a gradient; returns the
        closure's loss (None without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        plans = []
        for group in self.param_groups:  # plan every group first: raise before anything moves
            reason = self._group_reason(group)
            if reason:
                plans.append((group, [], [p for p in group["params"] if p.grad is not None],
                              [reason]))
                continue
            fast, slow, reasons = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                r = _param_reason(p, p.grad)
                if r:
                    slow.append(p)
                    if r not in reasons:
                        reasons.append(r)
                else:
                    fast.append(p)
            plans.append((group, fast, slow, reasons))
        for group, _, slow, reasons in plans:
            if slow:
                self._check_torch_runs(group, "; ".join(reasons))
        for group, fast, slow, reasons in plans:
            if fast:
                with torch.no_grad():
                    self._fastreg_group(group, fast)
            if slow:
                for reason in reasons:
                    B.fallback(name, reason)
                with torch.set_grad_enabled(bool(group.get("differentiable"))):
                    self._torch_group(group, slow)
                    self._torch_prox(group, slow)
        return loss

    def _check_torch_runs(self, group, reason):
        """Raise where PyTorch's algorithm cannot do what the group asks."""

    def _torch_prox(self, group, params):
        l1 = group.get("l1", 0.0)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return  # AMP skipped PyTorch's update (inf gradients): the prox skips with it
        if l1:
            t = _number(group["lr"]) * l1
            with torch.no_grad():
                for p in params:
                    if p.is_complex():  # |w|_1 sums moduli: its prox shrinks each modulus
                        p.mul_((1 - t / p.abs()).clamp_(min=0))
                    else:
                        p.sub_(p.clamp(-t, t))  # soft(w, t), the formula of fastreg's kernels


def _buckets(params, *keys):
    """Parameters grouped by (device, dtype, *per-parameter keys), in order."""
    groups = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, *(k[i] for k in keys)), []).append(i)
    return groups.values()


class SGD(_FastregStep, torch.optim.SGD):
    """:class:`torch.optim.SGD` with fastreg's fused step, an L1 prox and decoupled decay.

    ``SGD(params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
    maximize=False, foreach=None, differentiable=False, fused=None, l1=0.0,
    decoupled_weight_decay=0.0)``: PyTorch's arguments, then

    l1 : float >= 0
        ``w <- soft(w, lr * l1)`` after each update (exact zeros).
    decoupled_weight_decay : float >= 0
        ``w <- w * (1 - lr * decoupled_weight_decay)`` before the gradient step
        (``weight_decay`` stays PyTorch's coupled L2 term).

    The update, in place (``fastreg.sgd_step``)::

        d = (-g if maximize else g) + weight_decay * w
        b = d (first step) | momentum * b + (1 - dampening) * d;  d = d + momentum * b | b
        w = soft(w * (1 - lr * decoupled_weight_decay) - lr * d, lr * l1)

    One compiled pass per (device, dtype) of a group reads w, g and the
    momentum buffer and writes w and the buffer.
    """

    _extras = ("l1", "decoupled_weight_decay")

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, l1=0.0, decoupled_weight_decay=0.0):
        _check_extra("l1", l1)
        _check_extra("decoupled_weight_decay", decoupled_weight_decay)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        self._init_extras(l1=l1, decoupled_weight_decay=decoupled_weight_decay)

    def _check_torch_runs(self, group, reason):
        if group.get("decoupled_weight_decay", 0.0):
            raise ValueError(f"{type(self).__name__}: decoupled_weight_decay needs fastreg's "
                             f"step, which does not run this group ({reason}); PyTorch's SGD "
                             "has no decoupled decay. Nothing was updated.")

    def _fastreg_group(self, group, params):
        grads, bufs = [], []
        torch.optim.SGD._init_group(self, dict(group, params=params), [], grads, bufs)
        momentum = _number(group["momentum"])
        fresh = [b is None for b in bufs] if momentum != 0 else [False] * len(params)
        hyper = dict(lr=_number(group["lr"]), momentum=momentum,
                     dampening=_number(group["dampening"]), nesterov=bool(group["nesterov"]),
                     maximize=bool(group["maximize"]),
                     weight_decay=_number(group["weight_decay"]),
                     decoupled_weight_decay=group["decoupled_weight_decay"], l1=group["l1"])
        for index in _buckets(params, fresh):
            ps = [params[i] for i in index]
            bs = None
            if momentum != 0:
                for i in index:
                    if bufs[i] is None:  # PyTorch's buffer: d itself on the first step
                        bufs[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
                        self.state[params[i]]["momentum_buffer"] = bufs[i]
                bs = [bufs[i] for i in index]
            with B.on_stream(ps[0]):
                fastreg.sgd_step([B.array(p) for p in ps], [B.array(grads[i]) for i in index],
                                 momentum_buffer=None if bs is None else [B.array(b) for b in bs],
                                 first_step=fresh[index[0]], **hyper)
            _increment_version(ps + (bs or []))

    def _torch_group(self, group, params):
        grads, bufs = [], []
        sparse = torch.optim.SGD._init_group(self, dict(group, params=params), [], grads, bufs)
        _torch_sgd(params, grads, bufs, has_sparse_grad=sparse, foreach=group["foreach"],
                   fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                   found_inf=getattr(self, "found_inf", None),
                   weight_decay=group["weight_decay"], momentum=group["momentum"],
                   lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                   maximize=group["maximize"])
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf


class _AdamStep(_FastregStep):
    """Adam's and AdamW's step (PyTorch's AdamW is Adam with decoupled decay)."""

    def _lists(self, group, params):
        lists = ([], [], [], [], [], [])  # params, grads, exp_avgs, exp_avg_sqs, maxes, steps
        has_complex = torch.optim.Adam._init_group(self, dict(group, params=params), *lists)
        return lists, has_complex

    def _fastreg_group(self, group, params):
        (_, grads, ms, vs, vmaxs, steps), _ = self._lists(group, params)
        torch._foreach_add_(steps, 1)  # PyTorch's order: the count moves, then is read
        counts = [int(s.item()) for s in steps]
        amsgrad = bool(group["amsgrad"])
        beta1, beta2 = group["betas"]
        hyper = dict(lr=_number(group["lr"]), betas=(_number(beta1), _number(beta2)),
                     eps=_number(group["eps"]), weight_decay=_number(group["weight_decay"]),
                     decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                     amsgrad=amsgrad, l1=group["l1"], maximize=bool(group["maximize"]))
        for index in _buckets(params, counts):
            ps = [params[i] for i in index]
            states = [ms[i] for i in index] + [vs[i] for i in index]
            maxes = [vmaxs[i] for i in index] if amsgrad else None
            with B.on_stream(ps[0]):
                fastreg.adam_step([B.array(p) for p in ps], [B.array(grads[i]) for i in index],
                                  [B.array(ms[i]) for i in index],
                                  [B.array(vs[i]) for i in index], step=counts[index[0]],
                                  max_exp_avg_sq=None if maxes is None else
                                  [B.array(m) for m in maxes], **hyper)
            _increment_version(ps + states + (maxes or []))

    def _torch_group(self, group, params):
        (ps, grads, ms, vs, vmaxs, steps), has_complex = self._lists(group, params)
        beta1, beta2 = group["betas"]
        _torch_adam(ps, grads, ms, vs, vmaxs, steps, foreach=group["foreach"],
                    capturable=group["capturable"], differentiable=group["differentiable"],
                    fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                    found_inf=getattr(self, "found_inf", None), has_complex=has_complex,
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])


class Adam(_AdamStep, torch.optim.Adam):
    """:class:`torch.optim.Adam` with fastreg's fused step and an L1 prox.

    ``Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
    foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
    decoupled_weight_decay=False, l1=0.0)``: PyTorch's arguments (weight_decay
    is the coupled L2 term unless ``decoupled_weight_decay=True``), then
    ``l1 >= 0``: ``w <- soft(w, lr * l1)`` after each update.

    The update, in place (``fastreg.adam_step``, PyTorch's formula)::

        d = (-g if maximize else g) [+ weight_decay * w]     (coupled)
        [w = w * (1 - lr * weight_decay)]                    (decoupled)
        m = lerp(m, d, 1 - beta1);  v = beta2 * v + (1 - beta2) * d * d
        u = max(vmax, v) (amsgrad) | v
        w = soft(w - lr / (1 - beta1**t) * m / (sqrt(u) / sqrt(1 - beta2**t) + eps), lr * l1)

    One compiled pass per (device, dtype, step count) of a group reads w, g,
    m, v (and vmax) and writes w, m, v (and vmax). The step count ``t`` is
    PyTorch's ``state["step"]`` (a CPU float32 tensor), advanced first.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False, l1=0.0):
        _check_extra("l1", l1)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)
        self._init_extras(l1=l1)


class AdamW(_AdamStep, torch.optim.AdamW):
    """:class:`torch.optim.AdamW` with fastreg's fused step and an L1 prox.

    ``AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    amsgrad=False, *, maximize=False, foreach=None, capturable=False,
    differentiable=False, fused=None, l1=0.0)``: PyTorch's arguments, then
    ``l1 >= 0``. The update is :class:`Adam`'s with decoupled decay
    ``w <- w * (1 - lr * weight_decay)`` (Loshchilov & Hutter, 2019), then
    ``w <- soft(w, lr * l1)``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, l1=0.0):
        _check_extra("l1", l1)
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._init_extras(l1=l1)
