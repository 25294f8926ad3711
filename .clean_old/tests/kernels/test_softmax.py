"""softmax: forward and gradient vs an fp64 reference, with same-dtype torch as the yardstick."""

import pytest
import torch

from tests.helpers import assert_close3, dtypes_for, noncontig_rows, stride0_grad, transposed_copy
from tritonize.kernels import softmax
from tritonize.kernels.softmax import softmax_backward, softmax_forward

SHAPES = [(1, 1), (7, 3), (3, 7, 1023), (1823, 781), (2, 5, 4096)]


def _dtypes(device):
    # softmax has no tl.dot, so bf16 also runs in the interpreter
    out = dtypes_for(device)
    return out if torch.bfloat16 in out else out + [torch.bfloat16]


def _check(x, dim=-1, dy=None, name=""):
    """Forward and input gradient of tritonize.softmax vs torch (same dtype) vs fp64."""
    x = x.detach()
    dy = torch.randn(x.shape, dtype=x.dtype, device=x.device) if dy is None else dy
    xk = x.clone().requires_grad_() if x.is_contiguous() else x.requires_grad_()
    y = softmax(xk, dim)
    assert y.dtype == x.dtype and y.shape == x.shape
    y.backward(dy)
    xt = x.detach().clone().requires_grad_()
    yt = torch.softmax(xt, dim)
    yt.backward(dy)
    xr = x.detach().double().requires_grad_()
    yr = torch.softmax(xr, dim)
    yr.backward(dy.double())
    assert_close3(y, yt, yr, name=f"{name} y")
    assert_close3(xk.grad, xt.grad, xr.grad, name=f"{name} dx")
    return y


def test_softmax_shapes_dtypes(device):
    for dtype in _dtypes(device):
        for shape in SHAPES:
            x = 3 * torch.randn(shape, device=device, dtype=dtype)
            y = _check(x, name=f"{shape} {dtype}")
            torch.testing.assert_close(y.float().sum(-1), torch.ones(shape[:-1], device=device), atol=1e-2, rtol=0)


def test_softmax_layouts(device):
    for dtype in (torch.float32, torch.float16):
        x = 3 * torch.randn(3, 7, 1023, device=device, dtype=dtype)
        _check(noncontig_rows(x), name="padded rows")
        _check(transposed_copy(x), name="transposed storage")
        # stride-0 upstream gradient (what y.sum().backward() sends)
        _check(x, dy=stride0_grad(x), name="stride-0 dy")
        # other dims: a strided softmax dim, read in place
        _check(x, dim=0, name="dim=0")
        _check(x, dim=1, name="dim=1")
        _check(x[:, ::2, :100], dim=1, name="dim=1 of a slice")
        _check(x.permute(2, 0, 1)[:, 1:], dim=2, name="permuted slice")
    # dim=0 keeps the strides of a dense input (torch does the same)
    xt = torch.randn(33, 65, device=device)
    assert softmax(xt, 0).stride() == torch.softmax(xt, 0).stride()
    assert softmax(xt.t(), -1).stride() == xt.t().stride()


def test_softmax_looped_path(device):
    """Rows wider than the block: the online max/sum kernel, reached with a small block cap."""
    for dtype in (torch.float32, torch.float16):
        for shape, dim, cap in [((5, 1000), -1, 128), ((3, 7, 1023), -1, 256), ((300, 9), 0, 16), ((4, 77, 3), 1, 8)]:
            x = 4 * torch.randn(shape, device=device, dtype=dtype)
            dy = torch.randn(shape, device=device, dtype=dtype)
            y = softmax_forward(x, dim, max_block=cap)
            dx = softmax_backward(y, dy, dim, max_block=cap)
            xr = x.double().requires_grad_()
            yr = torch.softmax(xr, dim)
            yr.backward(dy.double())
            xt = x.clone().requires_grad_()
            yt = torch.softmax(xt, dim)
            yt.backward(dy)
            assert_close3(y, yt, yr, name=f"looped {shape} y")
            assert_close3(dx, xt.grad, xr.grad, name=f"looped {shape} dx")
    # a first chunk that is entirely -inf (masked prefix) must not poison the running sum
    x = torch.randn(4, 300, device=device)
    x[:, :150] = float("-inf")
    y = softmax_forward(x, -1, max_block=64)
    torch.testing.assert_close(y, torch.softmax(x, -1))
    assert softmax_forward(x, -1, max_block=64)[:, :150].eq(0).all()


def test_softmax_empty_and_scalar(device):
    for shape, dim in [((0, 5), -1), ((5, 0), -1), ((2, 0, 3), 0)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y = softmax(x, dim)
        assert y.shape == x.shape
        y.backward(torch.ones_like(y))
        assert x.grad.shape == x.shape
    s = torch.tensor(2.5, device=device)
    assert softmax(s).shape == () and softmax(s).item() == 1.0


def test_softmax_bad_input(device):
    with pytest.raises(TypeError, match=r"tritonize\.softmax.*'x'"):
        softmax(torch.ones(3, 4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"tritonize\.softmax.*'dim'"):
        softmax(torch.ones(3, 4, device=device), dim=2)
    with pytest.raises(TypeError, match=r"tritonize\.softmax.*'dim'"):
        softmax(torch.ones(3, 4, device=device), dim=1.0)


def test_softmax_opcheck(device):
    """Fake (shape/stride) and autograd registrations agree with the real op."""
    from tritonize.kernels.softmax import _softmax_bwd_op, _softmax_fwd_op

    x = torch.randn(3, 5, device=device, requires_grad=True)
    torch.library.opcheck(_softmax_fwd_op, (x, 1))
    torch.library.opcheck(_softmax_fwd_op, (x.detach().t(), 1))
    y = torch.softmax(x.detach(), 1)
    torch.library.opcheck(_softmax_bwd_op, (y, torch.randn_like(y), 1))
