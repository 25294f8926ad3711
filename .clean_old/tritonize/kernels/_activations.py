"""The one table of activations: forward and derivative, in Triton and in torch, keyed by name.

Every kernel that applies an activation (linear_act, gated_linear, and any later epilogue) imports
from here, so a name means exactly one function everywhere:

    name         definition (matches torch exactly)        derivative d act / d z
    none         z                                         1
    relu         max(z, 0)                                 [z > 0]
    gelu         F.gelu(z)          = z * Phi(z)            Phi(z) + z * phi(z)
    gelu_tanh    F.gelu(z, "tanh")  = z/2 (1 + tanh(u))     (1 + t)/2 + z/2 (1 - t^2) u'(z)
                 u = sqrt(2/pi) (z + 0.044715 z^3), t = tanh(u), u' = sqrt(2/pi) (1 + 3*0.044715 z^2)
    silu         z * sigmoid(z)                            s (1 + z (1 - s)),  s = sigmoid(z)
    sigmoid      sigmoid(z)                                s (1 - s)
    tanh         tanh(z)                                   1 - t^2
    quick_gelu   z * sigmoid(1.702 z)                      s + 1.702 z s (1 - s),  s = sigmoid(1.702 z)

In a kernel (the name is a compile-time string, so each activation compiles to its own code):

    from tritonize.kernels._activations import activation_fwd, activation_grad
    y = activation_fwd(z, ACTIVATION)          # z fp32 in registers
    dz = dy * activation_grad(z, ACTIVATION)   # derivative from the pre-activation
    dz = dy * activation_grad_from_output(y, ACTIVATION)   # only where GRAD_FROM_OUTPUT[name]

`GRAD_FROM_OUTPUT[name]` is True for the activations whose derivative is a function of their
output (none, relu, sigmoid, tanh): a backward may then save the output, which the caller holds
anyway, instead of the pre-activation (one tensor less in memory, one store less in forward) —
torch's own autograd does the same for these.

`ACTIVATIONS[name]` is an `Activation` record (Triton forward/derivative, torch forward/derivative);
`TORCH_ACTIVATIONS[name]` is the torch reference function alone (what the fuser maps torch calls to).
No `libdevice`: tanh is written as 2*sigmoid(2x) - 1 so the same code runs on triton 3.6 and 3.9.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# Triton: one forward and one derivative per activation, on fp32 values in registers.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: exact identity, saturates cleanly at +-1 for large |x|
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _relu_fwd(x):
    return tl.where(x > 0.0, x, 0.0)


@triton.jit
def _relu_grad(x):
    return tl.where(x > 0.0, 1.0, 0.0)


@triton.jit
def _gelu_fwd(x):
    # z * Phi(z), Phi(z) = (1 + erf(z / sqrt 2)) / 2  (F.gelu, approximate="none")
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    # Phi(z) + z * phi(z), phi(z) = exp(-z^2/2) / sqrt(2 pi)
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


@triton.jit
def _gelu_tanh_fwd(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + _tanh(inner))


@triton.jit
def _gelu_tanh_grad(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = _tanh(inner)
    d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner


@triton.jit
def _silu_fwd(x):
    return x * tl.sigmoid(x)


@triton.jit
def _silu_grad(x):
    s = tl.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def _sigmoid_grad(x):
    s = tl.sigmoid(x)
    return s * (1.0 - s)


@triton.jit
def _tanh_grad(x):
    t = _tanh(x)
    return 1.0 - t * t


@triton.jit
def _quick_gelu_fwd(x):
    return x * tl.sigmoid(1.702 * x)


@triton.jit
def _quick_gelu_grad(x):
    s = tl.sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1.0 - s)


@triton.jit
def activation_fwd(x, ACTIVATION: tl.constexpr):
    """act(x) for fp32 `x`; ACTIVATION is a constexpr name from ACTIVATIONS."""
    if ACTIVATION == "relu":
        y = _relu_fwd(x)
    elif ACTIVATION == "gelu":
        y = _gelu_fwd(x)
    elif ACTIVATION == "gelu_tanh":
        y = _gelu_tanh_fwd(x)
    elif ACTIVATION == "silu":
        y = _silu_fwd(x)
    elif ACTIVATION == "sigmoid":
        y = tl.sigmoid(x)
    elif ACTIVATION == "tanh":
        y = _tanh(x)
    elif ACTIVATION == "quick_gelu":
        y = _quick_gelu_fwd(x)
    else:  # "none"
        y = x
    return y


@triton.jit
def activation_grad(x, ACTIVATION: tl.constexpr):
    """act'(x) for fp32 pre-activation `x`."""
    if ACTIVATION == "relu":
        g = _relu_grad(x)
    elif ACTIVATION == "gelu":
        g = _gelu_grad(x)
    elif ACTIVATION == "gelu_tanh":
        g = _gelu_tanh_grad(x)
    elif ACTIVATION == "silu":
        g = _silu_grad(x)
    elif ACTIVATION == "sigmoid":
        g = _sigmoid_grad(x)
    elif ACTIVATION == "tanh":
        g = _tanh_grad(x)
    elif ACTIVATION == "quick_gelu":
        g = _quick_gelu_grad(x)
    else:  # "none"
        g = x * 0.0 + 1.0
    return g


@triton.jit
def activation_grad_from_output(y, ACTIVATION: tl.constexpr):
    """act'(z) written in terms of the output y = act(z); only for GRAD_FROM_OUTPUT names."""
    if ACTIVATION == "relu":
        g = tl.where(y > 0.0, 1.0, 0.0)  # torch's threshold_backward also tests the output
    elif ACTIVATION == "sigmoid":
        g = y * (1.0 - y)
    elif ACTIVATION == "tanh":
        g = 1.0 - y * y
    else:  # "none"
        g = y * 0.0 + 1.0
    return g


# ---------------------------------------------------------------------------------------------
# torch: the reference forward (exactly what the fuser maps from) and the derivative.
# ---------------------------------------------------------------------------------------------


def _identity(x):
    return x


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _grad_none(z):
    return torch.ones_like(z)


def _grad_relu(z):
    return (z > 0).to(z.dtype)


def _grad_gelu(z):
    cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
    return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _grad_gelu_tanh(z):
    t = torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)


def _grad_silu(z):
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _grad_sigmoid(z):
    s = torch.sigmoid(z)
    return s * (1.0 - s)


def _grad_tanh(z):
    t = torch.tanh(z)
    return 1.0 - t * t


def _grad_quick_gelu(z):
    s = torch.sigmoid(1.702 * z)
    return s + 1.702 * z * s * (1.0 - s)


# derivative from the output y = act(z), for the GRAD_FROM_OUTPUT activations
def _grad_out_none(y):
    return torch.ones_like(y)


def _grad_out_relu(y):
    return (y > 0).to(y.dtype)


def _grad_out_sigmoid(y):
    return y * (1.0 - y)


def _grad_out_tanh(y):
    return 1.0 - y * y


class Activation(NamedTuple):
    name: str
    torch_fn: Callable[[torch.Tensor], torch.Tensor]  # reference forward (matches torch exactly)
    torch_grad: Callable[[torch.Tensor], torch.Tensor]  # d act / d z from the pre-activation z
    grad_from_output: bool  # derivative is a function of the output (see module docstring)
    torch_grad_out: Callable | None  # d act / d z from the output y (grad_from_output only)
    triton_fwd: object  # @triton.jit helper on fp32 values
    triton_grad: object  # @triton.jit helper: derivative from the pre-activation


ACTIVATIONS: dict[str, Activation] = {
    "none": Activation("none", _identity, _grad_none, True, _grad_out_none, None, None),
    "relu": Activation("relu", torch.relu, _grad_relu, True, _grad_out_relu, _relu_fwd, _relu_grad),
    "gelu": Activation("gelu", F.gelu, _grad_gelu, False, None, _gelu_fwd, _gelu_grad),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, _grad_gelu_tanh, False, None, _gelu_tanh_fwd, _gelu_tanh_grad),
    "silu": Activation("silu", F.silu, _grad_silu, False, None, _silu_fwd, _silu_grad),
    "sigmoid": Activation("sigmoid", torch.sigmoid, _grad_sigmoid, True, _grad_out_sigmoid, None, _sigmoid_grad),
    "tanh": Activation("tanh", torch.tanh, _grad_tanh, True, _grad_out_tanh, _tanh, _tanh_grad),
    "quick_gelu": Activation("quick_gelu", _quick_gelu, _grad_quick_gelu, False, None, _quick_gelu_fwd, _quick_gelu_grad),
}

# name -> torch reference function (what the fuser maps torch calls onto)
TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {k: v.torch_fn for k, v in ACTIVATIONS.items()}

# name -> whether the backward may save the output instead of the pre-activation
GRAD_FROM_OUTPUT: dict[str, bool] = {k: v.grad_from_output for k, v in ACTIVATIONS.items()}


def check_activation(op: str, activation) -> str:
    """Validate an activation name: a clear ValueError naming the op, the argument and the choices."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(
            f"tritonize.{op}: argument 'activation' must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
        )
    return activation


__all__ = [
    "ACTIVATIONS",
    "TORCH_ACTIVATIONS",
    "GRAD_FROM_OUTPUT",
    "Activation",
    "activation_fwd",
    "activation_grad",
    "activation_grad_from_output",
    "check_activation",
]
