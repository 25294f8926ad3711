"""linear -> activation, and the gated MLP act(gate(x)) * up(x) (SwiGLU, GeGLU).

Generated over every activation of the kernels' table (`ACTIVATIONS` names: relu, gelu,
gelu_tanh, silu, sigmoid, tanh, quick_gelu) in the canonical spelling normalize.py gives them
(activation modules such as transformers' NewGELUActivation are folded to these before matching).
A bare linear (activation "none") is left to cuBLAS.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tritonize.fuser.normalize import quick_gelu
from tritonize.patterns import Pattern, first_problem, kernel_fn, register, tensor_problem

ACTS = {
    "relu": lambda z: torch.relu(z),
    "gelu": lambda z: F.gelu(z, approximate="none"),
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": lambda z: F.silu(z),
    "sigmoid": lambda z: torch.sigmoid(z),
    "tanh": lambda z: torch.tanh(z),
    "quick_gelu": lambda z: quick_gelu(z),
    "quick_gelu_inline": lambda z: z * torch.sigmoid(z * 1.702),
}


def _act_name(label):
    return "quick_gelu" if label == "quick_gelu_inline" else label


def _linear_guard(m, x_name, weights, bias_name=None):
    x = m.val(x_name)
    r = tensor_problem("x", x)
    if r:
        return r
    for name in weights + ([bias_name] if bias_name and m.get(bias_name) is not None else []):
        t = m.val(name)
        r = tensor_problem(name, t, dtypes=(x.dtype,))
        if r:
            return r + f" (x is {str(x.dtype).replace('torch.', '')})"
    for name in weights:
        if m.val(name).dim() != 2:
            return f"{name} is not 2-D"
    out = m.out_val(0)
    if out is None or out.dtype != x.dtype:
        return "output dtype differs from the inputs' (autocast?)"
    return None


@register
class LinearAct(Pattern):
    name = "linear_act"
    family = "linear_act"
    priority = 20
    kernel = ("linear_act", "linear_act")

    def searches(self):
        for label, act in ACTS.items():
            def make(act):
                def f(x, w, b):
                    return act(F.linear(x, w, b))
                return f

            f = make(act)
            yield label, {"activation": _act_name(label)}, f

    def guard(self, m):
        return _linear_guard(m, "x", ["w"], "b")

    def replace(self, m, fn):
        return [m.call(fn, m["x"], m["w"], m["b"], activation=m.flags["activation"])]


@register
class GatedLinear(Pattern):
    name = "gated_mlp"
    family = "linear_act"
    priority = 25
    kernel = ("linear_act", "gated_linear")

    # With the down projection (Llama's down_proj(act(gate_proj(x)) * up_proj(x))): one
    # gated_mlp call, which recomputes the product in backward instead of saving it for the down
    # projection's weight gradient (M x N less memory per MLP). Without it (the product used
    # elsewhere, or no linear after it): gated_linear.
    def searches(self):
        downs = (True, False) if fuse_down_projection() else (False,)
        for label, act in ACTS.items():
            for order in ("act*up", "up*act"):
                for down in downs:
                    def make(act, order, down):
                        def f(x, wg, wu, wd):
                            g = act(F.linear(x, wg, None))
                            u = F.linear(x, wu, None)
                            p = g * u if order == "act*up" else u * g
                            return F.linear(p, wd, None) if down else p
                        return f

                    f = make(act, order, down)
                    yield f"{label},{order}{',down' if down else ''}", {"activation": _act_name(label), "down": down}, f

    def guard(self, m):
        r = _linear_guard(m, "x", ["wg", "wu"] + (["wd"] if m.flags["down"] else []))
        if r:
            return r
        if tuple(m.val("wg").shape) != tuple(m.val("wu").shape):
            return first_problem("gate and up weights have different shapes")
        if m.flags["down"] and m.val("wd").shape[1] != m.val("wg").shape[0]:
            return "down projection's input size differs from the gate's output size"
        return None

    def note(self, m):
        return "down projection fused: its input recomputed in backward, not saved" if m.flags["down"] else ""

    def replace(self, m, fn):
        if m.flags["down"]:
            return [m.call(kernel_fn("linear_act", "gated_mlp"), m["x"], m["wg"], m["wu"], m["wd"],
                           activation=m.flags["activation"])]
        return [m.call(fn, m["x"], m["wg"], m["wu"], activation=m.flags["activation"])]


def fuse_down_projection() -> bool:
    """TRITONIZE_GATED_MLP_DOWN=0 leaves the down projection a separate linear (read once, when
    the search graphs are built; for A/B measurements)."""
    v = os.environ.get("TRITONIZE_GATED_MLP_DOWN", "1").strip()
    if v not in ("0", "1"):
        raise ValueError(f"TRITONIZE_GATED_MLP_DOWN must be 0 or 1, got {v!r}")
    return v == "1"
