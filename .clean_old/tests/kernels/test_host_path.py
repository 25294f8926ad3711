"""The eager fast path's host-side shortcuts (see docs/notes/host_overhead.md): an nn.Parameter
weight takes linear_cross_entropy's eager path; `_common.fast_apply` defers to the full
`autograd.Function.apply` under functorch transforms; attention's fast argument check leaves the
detailed one for anything unusual."""

import pytest
import torch

from tritonize.kernels import attention, linear_cross_entropy
from tritonize.kernels._common import fast_apply


def test_linear_cross_entropy_parameter_weight_takes_eager_path(device):
    h = torch.randn(6, 16, device=device)
    w = torch.randn(40, 16, device=device)
    b = torch.randn(40, device=device)
    t = torch.randint(0, 40, (6,), device=device)
    t[2] = -100
    wp, bp = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    hp = h.clone().requires_grad_()
    loss = linear_cross_entropy(hp, wp, t, bp)
    assert type(loss.grad_fn).__name__ == "_LinearCrossEntropyFnBackward"
    loss.backward()
    # the same call with plain tensors (the path the other tests check against torch)
    wt, bt, ht = w.clone().requires_grad_(), b.clone().requires_grad_(), h.clone().requires_grad_()
    ref = linear_cross_entropy(ht, wt, t, bt)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for a, r in ((hp.grad, ht.grad), (wp.grad, wt.grad), (bp.grad, bt.grad)):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


def test_fast_apply_defers_under_functorch():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, opts):
            return x * opts[0]

        @staticmethod
        def backward(ctx, g):
            return g * 2.0, None

    apply = fast_apply(Double)
    x = torch.randn(3, requires_grad=True)
    apply(x, (2.0,)).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    # no setup_context: the full apply raises its own clear error under a transform, as before
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda y: apply(y, (2.0,)).sum())(torch.randn(3))


def test_attention_detailed_check_cases(device):
    q = torch.randn(1, 2, 8, 16, device=device)
    k = torch.randn(1, 1, 8, 16, device=device)
    v = torch.randn(1, 1, 8, 16, device=device)
    ref = attention(q, k, v, causal=True)
    # an int scale and an int dropout_p leave the fast check and still run
    torch.testing.assert_close(attention(q, k, v, causal=True, scale=16**-0.5, dropout_p=0), ref)
    torch.testing.assert_close(attention(q, k, v, causal=True, scale=1) * 0, ref * 0)
    with pytest.raises(ValueError, match="tritonize.attention: argument 'k'"):
        attention(q, torch.randn(1, 3, 8, 16, device=device), torch.randn(1, 3, 8, 16, device=device))
    with pytest.raises(ValueError, match="argument 'scale'"):
        attention(q, k, v, scale=float("inf"))
    with pytest.raises(ValueError, match="argument 'dropout_p'"):
        attention(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="argument 'v'"):
        attention(q, k, v.double())
