"""dropout: mask statistics, exact scaling, seeding, backward mask == forward mask, edge cases."""

import math

import pytest
import torch

from tests.helpers import dtypes_for, noncontig_rows, stride0_grad, transposed_copy
from tritonize.kernels import dropout
from tritonize.kernels.dropout import dropout_reference

SHAPES = [(1, 1), (7, 3), (3, 7, 1023), (1823, 781), (2, 5, 4096)]


def _dtypes(device):
    out = dtypes_for(device)  # element-wise: bf16 runs in the interpreter too
    return out if torch.bfloat16 in out else out + [torch.bfloat16]


def _check_fwd_bwd(x, p, seed, dy=None):
    """y kept exactly x * 1/(1-p) (fp32 math, one rounding), dropped exactly 0; dx uses y's mask."""
    scale = 1.0 / (1.0 - p)
    xk = x.detach().requires_grad_()
    y = dropout(xk, p, seed=seed)
    assert y.shape == x.shape and y.dtype == x.dtype
    keep = y != 0  # x has no exact zeros
    expect = (x.detach().float() * scale).to(x.dtype)
    _equal(y[keep], expect[keep], "kept values are not x / (1 - p)")
    if dy is None:
        dy = torch.randn(x.shape, dtype=x.dtype, device=x.device)
        # randn returns exact zeros now and then (CUDA's Box-Muller maps a uniform that rounds to
        # 1.0f to 0: ~3e-8 per pair, a few % of 1.4M-element tensors); a kept unit with dy == 0
        # would then read as "dropped in backward". The mask check needs dy != 0, like x != 0.
        dy[dy == 0] = 1.0
    y.backward(dy)
    _same_mask(xk.grad != 0, keep, dy)
    _equal(xk.grad[keep], (dy.float() * scale).to(x.dtype)[keep], "kept gradients are not dy / (1 - p)")
    return keep


def _same_mask(bwd_keep, fwd_keep, dy):
    """Backward mask == forward mask; else say how many elements differ, where, and in which way."""
    if torch.equal(bwd_keep, fwd_keep):
        return
    diff = bwd_keep != fwd_keep
    idx = diff.nonzero()
    n_fwd_only = int((diff & fwd_keep).sum())
    n_dy0 = int((diff & (dy.expand_as(diff) == 0)).sum())
    raise AssertionError(
        f"backward mask differs from the forward mask at {idx.shape[0]} of {diff.numel()} elements "
        f"({n_fwd_only} kept in forward only, {idx.shape[0] - n_fwd_only} in backward only; dy == 0 at "
        f"{n_dy0} of them); shape {tuple(diff.shape)}, first indices {idx[:8].tolist()}"
    )


def _equal(got, want, msg):
    if got.dtype == torch.bfloat16 and got.device.type == "cpu":
        # the interpreter casts fp32 -> bf16 by truncation, not round-to-nearest: allow 1 ulp
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0, msg=msg)
    else:
        assert torch.equal(got, want), msg


def test_dropout_shapes_dtypes(device):
    for dtype in _dtypes(device):
        for i, shape in enumerate(SHAPES):
            if shape == (1823, 781) and dtype != torch.float16 and device == "cpu":
                continue  # 1.4M Philox draws take seconds in the interpreter: one dtype is enough
            x = torch.randn(shape, device=device, dtype=dtype)
            x[x == 0] = 1.0
            _check_fwd_bwd(x, 0.3, seed=100 + i)


def test_dropout_statistics(device):
    """Kept fraction: mean within 4 sigma of 1-p; per-row variance within 4 sigma of binomial."""
    rows, n = 600, 781
    x = torch.ones(rows, n, device=device)
    for p, seed in [(0.1, 1), (0.5, 2), (0.9, 3)]:
        keep = (dropout(x, p, seed=seed) != 0).float()
        q = 1 - p
        frac = keep.mean().item()
        sigma = math.sqrt(p * q / keep.numel())
        assert abs(frac - q) <= 4 * sigma, f"p={p}: kept fraction {frac:.5f}, expected {q} +- {4 * sigma:.5f}"
        # per-row kept fraction: variance pq/n; its sample variance has std ~ var * sqrt(2/(rows-1))
        row_var = keep.mean(1).var().item()
        var = p * q / n
        assert abs(row_var - var) <= 4 * var * math.sqrt(2 / (rows - 1)), f"p={p}: row variance {row_var:.3e} vs {var:.3e}"
        # columns too: a mask that repeats across rows would show up here
        col_var = keep.mean(0).var().item()
        var_c = p * q / rows
        assert abs(col_var - var_c) <= 4 * var_c * math.sqrt(2 / (n - 1)), f"p={p}: column variance {col_var:.3e}"


def test_dropout_seeding(device):
    x = torch.randn(37, 129, device=device)
    a = dropout(x, 0.5, seed=7)
    assert torch.equal(a, dropout(x, 0.5, seed=7)), "same seed, different mask"
    assert not torch.equal(a != 0, dropout(x, 0.5, seed=8) != 0), "different seeds, same mask"
    torch.manual_seed(123)
    b = dropout(x, 0.5)
    c = dropout(x, 0.5)
    torch.manual_seed(123)
    assert torch.equal(b, dropout(x, 0.5)), "torch.manual_seed does not govern the default seed"
    assert not torch.equal(b != 0, c != 0), "consecutive calls reuse a mask"
    # the mask is a function of (seed, logical index), not of the memory layout
    assert torch.equal(dropout(transposed_copy(x), 0.5, seed=7), a)
    assert torch.equal(dropout(noncontig_rows(x), 0.5, seed=7), a)
    # a 0-d int64 CPU seed tensor (what a captured graph passes) is the same seed as the int, on
    # the eager fast path and on the custom-op path alike
    seed_t = torch.tensor(7, dtype=torch.int64)
    assert torch.equal(dropout(x, 0.5, seed=seed_t), a)
    assert torch.equal(torch.ops.tritonize.dropout_fwd(x, 0.5, seed_t), a)
    with pytest.raises(ValueError, match=r"tritonize\.dropout.*'seed'"):
        dropout(x, 0.5, seed=torch.tensor([7]))


def test_dropout_layouts(device):
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(3, 7, 1023, device=device, dtype=dtype)
        x[x == 0] = 1.0
        _check_fwd_bwd(noncontig_rows(x), 0.25, seed=11)
        _check_fwd_bwd(transposed_copy(x), 0.25, seed=12)
        _check_fwd_bwd(x.permute(2, 0, 1)[:, 1:], 0.25, seed=13)  # copied: no (R, N) view exists
        y = torch.empty_like(x)
        _check_fwd_bwd(x, 0.25, seed=14, dy=stride0_grad(y))
        _check_fwd_bwd(x, 0.25, seed=15, dy=noncontig_rows(torch.randn_like(x)))


def test_dropout_identity_and_zeros(device):
    x = torch.randn(7, 3, device=device, requires_grad=True)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.7, training=False) is x
    y = dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(y))
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))
    for shape in [(0,), (0, 5), (4, 0, 2)]:
        e = torch.randn(shape, device=device, requires_grad=True)
        ye = dropout(e, 0.5)
        assert ye.shape == e.shape
        ye.sum().backward()
        assert e.grad.shape == e.shape


def test_dropout_reference_path():
    """The CPU fallback (no Triton) regenerates its mask from the seed as well."""
    x = torch.randn(50, 60)
    dy = torch.randn(50, 60)
    y = dropout_reference(x, 0.4, 5)
    dx = dropout_reference(dy, 0.4, 5)
    assert torch.equal(y != 0, dx != 0)
    assert abs((y != 0).float().mean().item() - 0.6) < 4 * math.sqrt(0.24 / 3000)


def test_dropout_bad_input(device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError, match=r"tritonize\.dropout.*'x'"):
        dropout(torch.ones(3, 4, dtype=torch.int32, device=device), 0.5)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"tritonize\.dropout.*'p'"):
            dropout(x, p)
    with pytest.raises(TypeError, match=r"tritonize\.dropout.*'p'"):
        dropout(x, "0.5")
    with pytest.raises(ValueError, match=r"tritonize\.dropout.*'seed'"):
        dropout(x, 0.5, seed=-1)


def test_dropout_opcheck(device):
    from tritonize.kernels.dropout import _dropout_bwd_op, _dropout_fwd_op

    x = torch.randn(3, 5, device=device, requires_grad=True)
    seed = torch.tensor(3, dtype=torch.int64)
    torch.library.opcheck(_dropout_fwd_op, (x, 0.5, seed))
    torch.library.opcheck(_dropout_bwd_op, (torch.randn(3, 5, device=device), 0.5, seed))
