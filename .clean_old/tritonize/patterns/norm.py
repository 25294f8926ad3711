"""Normalization: layer_norm, RMSNorm (F.rms_norm or written by hand), and residual-add + either.

RMSNorm by hand is generated over its spellings:
    h = x[.to(float32)];  var = mean(h ** 2 | h * h, -1, keepdim=True)
    y = h * rsqrt(var + eps) | rsqrt(var + eps) * h;  y = y[.to(x.dtype)];  out = w * y | y * w | y
and matched with a preceding `a + b` whose sum is used again (the residual stream) by the add_*
variants, which return both the norm and the sum. The kernels reproduce HF's numerics (stats in
fp32, normalized value rounded to x's dtype before the weight multiply); a spelling whose output
dtype or rounding differs from that is declined.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from tritonize.patterns import (
    FLOATS, Pattern, dim_eq, first_problem, is_number, register, same_shape, static_int, tensor_problem,
)


def _ln_guard(m, x_name="x"):
    x = m.val(x_name)
    r = tensor_problem("x", x)
    if r:
        return r
    shape = m["shape"]
    if not (isinstance(shape, (tuple, list)) and len(shape) == 1 and dim_eq(shape[0], x.shape[-1])):
        return f"normalized_shape {shape} is not x's last dim only"
    for name in ("w", "b"):
        t = m.get(name)
        if t is not None:
            tv = m.val(name)
            r = tensor_problem(name, tv, dtypes=(x.dtype,))
            if r:
                return r + f" (x is {str(x.dtype).replace('torch.', '')})"
    if not is_number(m["eps"]) or m["eps"] <= 0:
        return f"eps {m['eps']!r} is not a positive number"
    out = m.out_val(0)
    if out is None or out.dtype != x.dtype:
        return "output dtype differs from x's (autocast?)"
    return None


@register
class LayerNorm(Pattern):
    name = "layer_norm"
    family = "norm"
    priority = 30
    kernel = ("layer_norm", "layer_norm")

    def searches(self):
        def ln(x, shape, w, b, eps):
            return F.layer_norm(x, shape, w, b, eps)

        yield "layer_norm", {}, ln

    def guard(self, m):
        return _ln_guard(m)

    def replace(self, m, fn):
        return [m.call(fn, m["x"], m["w"], m["b"], float(m["eps"]))]


@register
class AddLayerNorm(Pattern):
    name = "add_layer_norm"
    family = "norm"
    priority = 40
    kernel = ("layer_norm", "add_layer_norm")

    def searches(self):
        def add_ln(x, r, shape, w, b, eps):
            h = x + r
            return F.layer_norm(h, shape, w, b, eps), h

        yield "add_layer_norm", {}, add_ln

    def guard(self, m):
        return first_problem(_add_guard(m), _ln_guard(m))

    def replace(self, m, fn):
        out = m.call(fn, m["x"], m["r"], m["w"], m["b"], float(m["eps"]))
        return [m.getitem(out, 0), m.getitem(out, 1)]


def _add_guard(m):
    x, r = m.val("x"), m.val("r")
    for name, t in (("x", x), ("r", r)):
        p = tensor_problem(name, t)
        if p:
            return p
    if x.dtype != r.dtype:
        return "residual add mixes dtypes"
    if not same_shape(x.shape, r.shape):
        return "residual add broadcasts (operands of different shapes)"
    return None


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

_RMS_FLAGS = list(itertools.product([True, False], [True, False], [True, False], [True, False], ["w*y", "y*w", "none"]))


def _rms_body(x, eps, w, dt_up, dt_back, upcast, sq_pow, rsqrt_first, castback, wmul):
    h = x.to(dt_up) if upcast else x
    sq = torch.pow(h, 2.0) if sq_pow else h * h
    var = torch.mean(sq, -1, True)
    r = torch.rsqrt(var + eps)
    y = r * h if rsqrt_first else h * r
    if castback:
        y = y.to(dt_back)
    if wmul == "w*y":
        return w * y
    if wmul == "y*w":
        return y * w
    return y


def _rms_searches(add: bool):
    for upcast, sq_pow, rsqrt_first, castback, wmul in _RMS_FLAGS:
        flags = dict(upcast=upcast, sq_pow=sq_pow, rsqrt_first=rsqrt_first, castback=castback, wmul=wmul)
        label = "rms:" + ",".join(f"{k}={v}" for k, v in flags.items())

        def make(flags=flags):
            if add:
                def f(x, r, eps, w, dt_up, dt_back):
                    h = x + r
                    return _rms_body(h, eps, w, dt_up, dt_back, **flags), h
            else:
                def f(x, eps, w, dt_up, dt_back):
                    return _rms_body(x, eps, w, dt_up, dt_back, **flags)
            return f

        yield label, flags, make()
    # torch's own F.rms_norm / nn.RMSNorm
    if add:
        def g(x, r, shape, w, eps):
            h = x + r
            return F.rms_norm(h, shape, w, eps), h
    else:
        def g(x, shape, w, eps):
            return F.rms_norm(x, shape, w, eps)
    yield "F.rms_norm", {"functional": True}, g


def _rms_guard(m, add: bool):
    x = m.val("x")
    r = tensor_problem("x", x)
    if r:
        return r
    w = m.get("w")
    wv = m.val("w") if w is not None else None
    if w is not None:
        if not isinstance(wv, torch.Tensor):
            return "weight is not a tensor"
        r = tensor_problem("weight", wv)
        if r:
            return r
        if wv.dim() != 1 or not dim_eq(wv.shape[0], x.shape[-1]):
            return f"weight of shape {tuple(wv.shape)} is not (x.shape[-1],)"
    f = m.flags
    eps = m["eps"]
    if f.get("functional"):
        shape = m["shape"]
        if not (isinstance(shape, (tuple, list)) and len(shape) == 1 and dim_eq(shape[0], x.shape[-1])):
            return f"normalized_shape {shape} is not x's last dim only"
        if eps is None:
            eps = torch.finfo(x.dtype).eps
    else:
        if f["upcast"] and m["dt_up"] is not torch.float32:
            return f"statistics computed in {m['dt_up']}, not float32"
        if f["castback"] and m["dt_back"] != x.dtype:
            return f"normalized value cast to {m['dt_back']}, not x's dtype {x.dtype}"
        if f["upcast"] and not f["castback"] and x.dtype != torch.float32 and f["wmul"] != "none":
            return "weight multiplies the unrounded fp32 value (no cast back to x's dtype): not HF numerics"
        if not f["upcast"] and x.dtype != torch.float32:
            pass  # eager computes the statistics in x's dtype; the kernel's fp32 is more accurate
    if not is_number(eps) or eps <= 0:
        return f"eps {eps!r} is not a positive number"
    expected = x.dtype if wv is None else torch.promote_types(wv.dtype, x.dtype)
    out = m.out_val(0)
    if out is None or out.dtype != expected:
        return f"output dtype {getattr(out, 'dtype', None)} is not the kernel's {expected}"
    m.eps_value = float(eps)
    return None


@register
class RMSNorm(Pattern):
    name = "rms_norm"
    family = "norm"
    priority = 30
    kernel = ("rms_norm", "rms_norm")

    def searches(self):
        return _rms_searches(add=False)

    def guard(self, m):
        return _rms_guard(m, add=False)

    def replace(self, m, fn):
        return [m.call(fn, m["x"], m.get("w"), m.eps_value)]


@register
class AddRMSNorm(Pattern):
    name = "add_rms_norm"
    family = "norm"
    priority = 40
    kernel = ("rms_norm", "add_rms_norm")

    def searches(self):
        return _rms_searches(add=True)

    def guard(self, m):
        return first_problem(_add_guard(m), _rms_guard(m, add=True))

    def replace(self, m, fn):
        out = m.call(fn, m["x"], m["r"], m.get("w"), m.eps_value)
        return [m.getitem(out, 0), m.getitem(out, 1)]


_ = (FLOATS, static_int)
