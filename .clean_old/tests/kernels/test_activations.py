"""The activation table: Triton forward/derivative helpers and torch references, against torch."""

import pytest
import torch
import torch.nn as nn
import triton
import triton.language as tl

from tritonize.kernels._activations import (
    ACTIVATIONS,
    GRAD_FROM_OUTPUT,
    TORCH_ACTIVATIONS,
    activation_fwd,
    activation_grad,
    activation_grad_from_output,
    check_activation,
)

# What each name must equal: torch's own modules (quick_gelu as CLIP/transformers define it).
TORCH_MODULES = {
    "none": nn.Identity(),
    "relu": nn.ReLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
    "sigmoid": nn.Sigmoid(),
    "tanh": nn.Tanh(),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@triton.jit
def _probe_kernel(
    x_ptr,  # (n,)
    y_ptr,  # (n,) act(x)
    d_ptr,  # (n,) act'(x)
    do_ptr,  # (n,) act'(x) from the output (FROM_OUT)
    n,
    ACTIVATION: tl.constexpr,
    FROM_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = activation_fwd(x, ACTIVATION)
    tl.store(y_ptr + offs, y, mask=m)
    tl.store(d_ptr + offs, activation_grad(x, ACTIVATION), mask=m)
    if FROM_OUT:
        tl.store(do_ptr + offs, activation_grad_from_output(y, ACTIVATION), mask=m)


def _points(device):
    # the curved middle densely, saturation, exact zero, and extremes where exp() overflows
    x = torch.cat([torch.linspace(-12, 12, 961), torch.tensor([0.0, 1e-4, -1e-4, 40.0, -40.0, 100.0, -100.0])])
    return x.to(device)


def test_table_is_complete_and_matches_torch():
    assert set(ACTIVATIONS) == set(TORCH_MODULES) == set(TORCH_ACTIVATIONS) == set(GRAD_FROM_OUTPUT)
    x = _points("cpu").double().requires_grad_()
    for name, act in ACTIVATIONS.items():
        assert act.name == name
        torch.testing.assert_close(TORCH_ACTIVATIONS[name](x), TORCH_MODULES[name](x), rtol=0, atol=0)
        (d_auto,) = torch.autograd.grad(TORCH_MODULES[name](x).sum(), x)
        torch.testing.assert_close(act.torch_grad(x.detach()), d_auto, rtol=1e-12, atol=1e-12, msg=name)
        if act.grad_from_output:
            y = TORCH_MODULES[name](x.detach())
            torch.testing.assert_close(act.torch_grad_out(y), d_auto, rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert act.torch_grad_out is None


def test_triton_helpers_match_torch(device):
    x = _points(device)
    xd = x.double().requires_grad_()
    for name in ACTIVATIONS:
        y = torch.empty_like(x)
        d = torch.empty_like(x)
        do = torch.empty_like(x)
        from_out = GRAD_FROM_OUTPUT[name]
        _probe_kernel[(triton.cdiv(x.numel(), 512),)](x, y, d, do, x.numel(), ACTIVATION=name, FROM_OUT=from_out, BLOCK=512)
        y_ref = TORCH_MODULES[name](xd)
        (d_ref,) = torch.autograd.grad(y_ref.sum(), xd)
        torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-5, atol=2e-6, msg=f"{name} forward")
        torch.testing.assert_close(d.double(), d_ref, rtol=1e-5, atol=2e-6, msg=f"{name} derivative")
        if from_out:
            torch.testing.assert_close(do.double(), d_ref, rtol=1e-5, atol=2e-6, msg=f"{name} derivative from y")
        assert torch.isfinite(y).all() and torch.isfinite(d).all(), name


def test_check_activation():
    assert check_activation("linear_act", "gelu_tanh") == "gelu_tanh"
    with pytest.raises(ValueError, match=r"tritonize\.linear_act: argument 'activation' must be one of .*'gelu'.*'swish'"):
        check_activation("linear_act", "swish")
