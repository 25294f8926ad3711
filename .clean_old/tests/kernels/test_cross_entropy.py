"""tritonize.kernels.cross_entropy: loss and gradient vs F.cross_entropy (fp32 reference, torch in
the same dtype as the yardstick), all reductions, label smoothing, ignored rows, soft-capping,
normalizer, in-place mode, layouts, bad arguments."""

import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close3, dtypes_for, noncontig_rows, stride0_grad, transposed_copy
from tritonize.kernels import cross_entropy
from tritonize.kernels.cross_entropy import cross_entropy_reference, cross_entropy_rows_reference


def _targets(n, v, device, ignore=(), ignore_index=-100):
    t = torch.randint(0, v, (n,), device=device)
    for i in ignore:
        t[i] = ignore_index
    return t


def _run(fn, x, go):
    """loss, dlogits of fn(x) with upstream gradient `go` (x is a leaf copy)."""
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(go)
    return y.detach(), x.grad


def _check(device, dtype, x, t, go, name, **kw):
    """Kernel vs fp32 reference vs torch in x's dtype (kw: cross_entropy options)."""
    smoothing = kw.get("label_smoothing", 0.0)
    reduction = kw.get("reduction", "mean")
    ours = _run(lambda a: cross_entropy(a, t, **kw), x, go)
    ref = _run(lambda a: cross_entropy_reference(a, t, upcast=True, **kw), x.float(), go)

    def torch_fn(a):
        cap = kw.get("logit_softcap")
        if cap is not None:
            a = cap * torch.tanh(a / cap)
        y = F.cross_entropy(a, t, reduction="sum" if kw.get("normalizer") is not None else reduction,
                            label_smoothing=smoothing)  # fmt: skip
        return y / kw["normalizer"] if kw.get("normalizer") is not None else y

    tor = _run(torch_fn, x, go.to(dtype))
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    assert_close3(ours[0], tor[0], ref[0], name=f"{name} loss")
    assert_close3(ours[1], tor[1], ref[1], name=f"{name} dlogits")


def test_forward_backward_reductions(device):
    n, v = 13, 1500  # several column blocks in the interpreter
    for dtype in dtypes_for(device):
        x = torch.randn(n, v, device=device, dtype=dtype) * 3
        t = _targets(n, v, device, ignore=(2, 7))
        for reduction in ("mean", "sum", "none"):
            # a non-1 upstream gradient, so the backward scale kernel really multiplies
            go = torch.rand(n, device=device) + 0.5 if reduction == "none" else torch.tensor(0.7, device=device)
            for smoothing in (0.0, 0.1):
                _check(device, dtype, x, t, go, f"{dtype} {reduction} eps={smoothing}",
                       reduction=reduction, label_smoothing=smoothing)  # fmt: skip
        # upstream gradient exactly 1: the backward leaves the forward's gradient untouched
        _check(device, dtype, x, t, torch.tensor(1.0, device=device), f"{dtype} go=1")


def test_softcap_normalizer(device):
    n, v = 9, 700
    for dtype in dtypes_for(device):
        x = torch.randn(n, v, device=device, dtype=dtype) * 20  # large, so the cap matters
        t = _targets(n, v, device, ignore=(4,))
        one = torch.tensor(1.0, device=device)
        _check(device, dtype, x, t, one, f"{dtype} softcap", logit_softcap=15.0, label_smoothing=0.05)
        _check(device, dtype, x, t, one, f"{dtype} normalizer float", normalizer=23.0)
        _check(device, dtype, x, t, torch.tensor(0.3, device=device), f"{dtype} normalizer sum", normalizer=5.0,
               reduction="sum")  # fmt: skip
    # a tensor normalizer (transformers' num_items_in_batch is an int tensor), possibly on the CPU
    x = torch.randn(n, v, device=device)
    t = _targets(n, v, device)
    for norm in (torch.tensor(17, device=device), torch.tensor(17)):
        got = cross_entropy(x, t, normalizer=norm)
        torch.testing.assert_close(got, F.cross_entropy(x, t, reduction="sum") / 17)


def test_ignored_rows_and_layouts(device):
    v = 300
    # all targets ignored: loss 0 (not NaN) and a zero gradient, for mean and sum
    x = torch.randn(5, v, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    for reduction in ("mean", "sum"):
        x.grad = None
        y = cross_entropy(x, t, reduction=reduction)
        y.backward()
        assert y.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    # a custom ignore_index, 3-D logits, int32 targets
    x = torch.randn(2, 3, v, device=device)
    t = torch.randint(0, v, (2, 3), device=device, dtype=torch.int32)
    t[0, 1] = 5
    one = torch.tensor(1.0, device=device)
    ours = _run(lambda a: cross_entropy(a, t, ignore_index=5), x, one)
    ref = _run(lambda a: F.cross_entropy(a.reshape(-1, v), t.reshape(-1).long(), ignore_index=5), x, one)
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])
    # padded rows, a transposed buffer (no unit-stride view: copied), stride-0 upstream gradient
    x = torch.randn(6, v, device=device)
    t = _targets(6, v, device, ignore=(1,))
    ref = _run(lambda a: F.cross_entropy(a, t, reduction="none"), x, stride0_grad(torch.empty(6, device=device)))
    for name, xv in (("noncontig", noncontig_rows(x)), ("transposed", transposed_copy(x))):
        xv = xv.detach().requires_grad_()
        y = cross_entropy(xv, t, reduction="none")
        y.backward(stride0_grad(y))
        torch.testing.assert_close(y, ref[0], msg=name)
        torch.testing.assert_close(xv.grad, ref[1], msg=name)
    # V = 1, N = 1, and no rows at all
    x = torch.randn(1, 1, device=device, requires_grad=True)
    y = cross_entropy(x, torch.zeros(1, dtype=torch.long, device=device))
    y.backward()
    assert y.item() == 0.0 and x.grad.abs().max().item() == 0.0
    x = torch.randn(0, v, device=device, requires_grad=True)
    y = cross_entropy(x, torch.zeros(0, dtype=torch.long, device=device))
    y.backward()
    assert y.item() == 0.0 and x.grad.shape == (0, v)
    assert cross_entropy(x, torch.zeros(0, dtype=torch.long, device=device), reduction="none").shape == (0,)


def test_inplace_and_no_grad(device):
    n, v = 7, 1100
    base = torch.randn(n, v, device=device)
    t = _targets(n, v, device, ignore=(3,))
    ref_loss = F.cross_entropy(base, t)
    ref = _run(lambda a: F.cross_entropy(a, t), base, torch.tensor(0.5, device=device))
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        logits = leaf * 1.0  # an intermediate, as the LM head's output is
        y = cross_entropy(logits, t, inplace=inplace)
        torch.testing.assert_close(y, ref_loss)
        if inplace:
            # the forward wrote the (unscaled) gradient over the logits
            assert not torch.equal(logits.detach(), base)
            torch.testing.assert_close(logits.detach(), ref[1] / 0.5)
        else:
            assert torch.equal(logits.detach(), base), "logits changed without inplace=True"
        y.backward(torch.tensor(0.5, device=device), retain_graph=True)
        torch.testing.assert_close(leaf.grad, ref[1])
        # the gradient is used once: a second backward through the same graph is refused
        with pytest.raises(RuntimeError, match="backward ran twice|modified by an inplace operation"):
            y.backward(torch.tensor(0.5, device=device))
    # no grad needed: no gradient pass, the logits stay untouched even with inplace=True
    x = base.clone()
    with torch.no_grad():
        y = cross_entropy(x.requires_grad_(), t, inplace=True)
    torch.testing.assert_close(y, ref_loss)
    assert torch.equal(x.detach(), base)
    torch.testing.assert_close(cross_entropy(base, t, inplace=True), ref_loss)
    assert torch.equal(x.detach(), base)


def test_custom_op_path_and_no_clone(device, monkeypatch):
    """The registered custom ops (what torch.compile / the fuser's traced graphs see) give the
    eager fast path's results; in place on a leaf, the gradient is the logits' own storage."""
    n, v = 5, 1100
    x = torch.randn(n, v, device=device)
    t = _targets(n, v, device, ignore=(1,))
    go = torch.tensor(0.7, device=device)
    cases = [(ip, red) for ip in (False, True) for red in ("mean", "none")]

    def run_all():
        out = []
        for ip, red in cases:
            g = go if red == "mean" else torch.linspace(0.5, 1.5, n, device=device)
            out.append(_run(lambda a: cross_entropy(a * 1.0, t, reduction=red, inplace=ip), x, g))
            leaf = x.clone().requires_grad_()
            cross_entropy(leaf, t, inplace=ip).backward()
            # AccumulateGrad stole the gradient (no 2nd (N, V) buffer): in place it is x's storage
            assert (leaf.grad.data_ptr() == leaf.data_ptr()) == ip, (ip, red)
        return out

    fast = run_all()
    monkeypatch.setattr(sys.modules["tritonize.kernels.cross_entropy"], "eager_fast_path", lambda _x: False)
    for (ip, red), f, o in zip(cases, fast, run_all()):
        torch.testing.assert_close(o[0], f[0], msg=f"inplace={ip} {red} loss")
        torch.testing.assert_close(o[1], f[1], msg=f"inplace={ip} {red} dlogits")


def test_bad_targets_and_arguments(device):
    v = 50
    x = torch.randn(4, v, device=device)
    t = torch.randint(0, v, (4,), device=device)
    with pytest.raises(TypeError, match=r"cross_entropy.*'target'"):
        cross_entropy(x, t.float())
    with pytest.raises(TypeError, match=r"cross_entropy.*'logits'"):
        cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match=r"cross_entropy.*'target'.*shape"):
        cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match=r"cross_entropy.*'reduction'"):
        cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match=r"cross_entropy.*'label_smoothing'"):
        cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"cross_entropy.*'logit_softcap'"):
        cross_entropy(x, t, logit_softcap=-1.0)
    with pytest.raises(ValueError, match=r"cross_entropy.*'normalizer'"):
        cross_entropy(x, t, normalizer=0)
    with pytest.raises(ValueError, match=r"cross_entropy.*'normalizer'"):
        cross_entropy(x, t, reduction="none", normalizer=3.0)
    for bad in (v, -1):
        tb = t.clone()
        tb[2] = bad
        if device == "cpu":
            with pytest.raises(ValueError, match=rf"cross_entropy.*'target'.*{bad}.*outside \[0, {v}\)"):
                cross_entropy(x, tb)
        else:
            # no sync on CUDA: the bad row is NaN-marked, so the loss is NaN
            rows = cross_entropy(x, tb, reduction="none")
            assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
            assert torch.isnan(cross_entropy(x, tb))
    # ignore_index itself is never out of range
    t[1] = -100
    assert torch.isfinite(cross_entropy(x, t))


def test_reference_fallback_matches_torch():
    # the closed-form CPU fallback of the custom op (plain torch, no Triton)
    x = torch.randn(6, 40, dtype=torch.float64) * 4
    t = torch.randint(0, 40, (6,))
    t[1] = -100
    for smoothing, cap in ((0.0, None), (0.2, 7.0)):
        xr = x.clone().requires_grad_()
        z = xr if cap is None else cap * torch.tanh(xr / cap)
        ref = F.cross_entropy(z, t, label_smoothing=smoothing)
        ref.backward()
        rows, g = cross_entropy_rows_reference(x, t, label_smoothing=smoothing, softcap=cap, upcast=False)
        torch.testing.assert_close(rows.sum().double(), ref.detach())
        torch.testing.assert_close(g, xr.grad)
