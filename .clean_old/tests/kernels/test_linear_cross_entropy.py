"""tritonize.kernels.linear_cross_entropy vs F.linear + F.cross_entropy: loss and the hidden,
weight and bias gradients (fp32 reference, torch in the same dtype as the yardstick); chunks that
do not divide N; soft-capping, label smoothing, normalizer; bad arguments."""

import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close3, dtypes_for, noncontig_rows, stride0_grad
from tritonize.kernels import linear_cross_entropy
from tritonize.kernels.linear_cross_entropy import default_chunk_size, linear_cross_entropy_reference, logits_chunk_size

H, V = 32, 1100


def _inputs(device, dtype, n, bias=True, lead=()):
    h = torch.randn(*lead, n, H, device=device, dtype=dtype)
    w = torch.randn(V, H, device=device, dtype=dtype) * H**-0.5 * 3
    b = torch.randn(V, device=device, dtype=dtype) if bias else None
    t = torch.randint(0, V, (*lead, n), device=device)
    t.view(-1)[[1, 5]] = -100
    return h, w, b, t


def _run(fn, tensors, go):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in tensors]
    y = fn(*leaves)
    y.backward(go)
    return [y.detach()] + [None if x is None else x.grad for x in leaves]


def _check(device, dtype, h, w, b, t, go, name, **kw):
    ours = _run(lambda *a: linear_cross_entropy(a[0], a[1], t, a[2], **kw), (h, w, b), go)
    kw_ref = {k: x for k, x in kw.items() if k != "chunk_size"}
    reduction = kw_ref.pop("reduction", "mean")
    ref = _run(lambda *a: linear_cross_entropy_reference(a[0], a[1], t, a[2], -100, reduction, upcast=True, **kw_ref),
               tuple(None if x is None else x.float() for x in (h, w, b)), go)  # fmt: skip

    def torch_fn(hh, ww, bb):
        z = F.linear(hh, ww, bb)
        cap = kw.get("logit_softcap")
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        norm = kw.get("normalizer")
        y = F.cross_entropy(z.reshape(-1, V), t.reshape(-1), reduction="sum" if norm is not None else reduction,
                            label_smoothing=kw.get("label_smoothing", 0.0))  # fmt: skip
        y = y / norm if norm is not None else y
        return y.view(t.shape) if reduction == "none" else y

    tor = _run(torch_fn, (h, w, b), go.to(dtype))
    for i, what in enumerate(("loss", "dhidden", "dweight", "dbias")):
        if ref[i] is None:
            assert ours[i] is None
            continue
        assert_close3(ours[i], tor[i], ref[i], name=f"{name} {what}")


def test_forward_backward(device):
    n = 37  # chunk_size 16: chunks of 16, 16, 5
    for dtype in dtypes_for(device):
        h, w, b, t = _inputs(device, dtype, n)
        for reduction in ("mean", "sum", "none"):
            go = torch.rand(n, device=device) + 0.5 if reduction == "none" else torch.tensor(0.7, device=device)
            _check(device, dtype, h, w, b, t, go, f"{dtype} {reduction}", reduction=reduction, chunk_size=16)
    # leading dims, no bias, the default chunk size, upstream gradient exactly 1
    h, w, _, t = _inputs(device, torch.float32, 5, bias=False, lead=(2,))
    _check(device, torch.float32, h, w, None, t, torch.tensor(1.0, device=device), "3-d no bias")


def test_options(device):
    n = 21
    dtype = dtypes_for(device)[-1]  # bf16 on the GPU, fp16 in the interpreter
    h, w, b, t = _inputs(device, dtype, n)
    one = torch.tensor(1.0, device=device)
    _check(device, dtype, h * 4, w, b, t, one, "softcap+smoothing", logit_softcap=10.0, label_smoothing=0.1,
           chunk_size=8)  # fmt: skip
    _check(device, dtype, h, w, b, t, torch.tensor(0.3, device=device), "normalizer", normalizer=11.0, chunk_size=8)
    # a tensor normalizer (transformers' num_items_in_batch) gives sum / normalizer
    h32, w32, b32, t32 = _inputs(device, torch.float32, n)
    got = linear_cross_entropy(h32, w32, t32, b32, normalizer=torch.tensor(11, device=device), chunk_size=8)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(h32, w32, b32), t32, reduction="sum") / 11)


def test_special_cases(device):
    h, w, b, t = _inputs(device, torch.float32, 9)
    # all targets ignored: loss 0, zero gradients
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    y = linear_cross_entropy(*leaves[:2], torch.full_like(t, -100), leaves[2], chunk_size=4)
    y.backward()
    assert y.item() == 0.0 and all(torch.count_nonzero(x.grad) == 0 for x in leaves)
    # only the weight needs a gradient; padded hidden rows; stride-0 upstream gradient (none)
    hv = noncontig_rows(h)
    wl = w.clone().requires_grad_()
    y = linear_cross_entropy(hv, wl, t, b, reduction="none", chunk_size=4)
    y.backward(stride0_grad(y))
    wr = w.clone().requires_grad_()
    yr = F.cross_entropy(F.linear(h, wr, b), t, reduction="none")
    yr.backward(stride0_grad(yr))
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(wl.grad, wr.grad)
    # no_grad: the loss only
    with torch.no_grad():
        y = linear_cross_entropy(h.requires_grad_(), w, t, b)
    torch.testing.assert_close(y, F.cross_entropy(F.linear(h, w, b), t))
    # no tokens
    y = linear_cross_entropy(h[:0], w, t[:0], b)
    assert y.item() == 0.0
    # the default chunk size: a power of two in [256, 2048], at least H / 4, or N when N is small
    assert default_chunk_size(8192, 2048, 128256) == 512 and default_chunk_size(8192, 4096, 128256) == 1024
    assert default_chunk_size(65536, 4096, 128256) == 2048 and default_chunk_size(8192, 512, 32000) == 256
    assert default_chunk_size(37, 32, 1100) == 37
    # chunk_size="wide" (tritonize(drop_logits=True)): up to N / 4 rows, same loss and gradients
    # (N = 1100: 275 -> 512 rows here against the default's 256, so the chunking really differs)
    assert logits_chunk_size(1100, H, V) == 512 > default_chunk_size(1100, H, V) == 256
    hw, ww, bw, tw = _inputs(device, torch.float32, 1100)
    got = _run(lambda *a: linear_cross_entropy(a[0], a[1], tw, a[2], chunk_size="wide"), (hw, ww, bw), None)
    want = _run(lambda *a: linear_cross_entropy(a[0], a[1], tw, a[2]), (hw, ww, bw), None)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


def test_custom_op_path(device, monkeypatch):
    """The registered custom ops (what torch.compile sees) give the eager fast path's results."""
    dtype = torch.float32
    h, w, b, t = _inputs(device, dtype, 9)
    cases = [("mean", torch.tensor(0.7, device=device)), ("none", torch.linspace(0.5, 1.5, 9, device=device))]

    def run_all():
        return [_run(lambda *a: linear_cross_entropy(a[0], a[1], t, a[2], reduction=red, chunk_size=4), (h, w, b), go)
                for red, go in cases]  # fmt: skip

    fast = run_all()
    monkeypatch.setattr(sys.modules["tritonize.kernels.linear_cross_entropy"], "eager_fast_path", lambda _x: False)
    for (red, _), f, o in zip(cases, fast, run_all()):
        for i, what in enumerate(("loss", "dhidden", "dweight", "dbias")):
            torch.testing.assert_close(o[i], f[i], msg=f"{red} {what}")


def test_bad_arguments(device):
    h, w, b, t = _inputs(device, torch.float32, 6)
    with pytest.raises(TypeError, match=r"linear_cross_entropy.*'weight'.*dtype"):
        linear_cross_entropy(h, w.double(), t)
    with pytest.raises(TypeError, match=r"linear_cross_entropy.*'target'"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match=r"linear_cross_entropy.*'weight'.*shape"):
        linear_cross_entropy(h, w[:, :-1], t)
    with pytest.raises(ValueError, match=r"linear_cross_entropy.*'bias'"):
        linear_cross_entropy(h, w, t, b[:-1])
    with pytest.raises(ValueError, match=r"linear_cross_entropy.*'target'.*shape"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match=r"linear_cross_entropy.*'chunk_size'"):
        linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match=r"linear_cross_entropy.*'chunk_size' must be a positive int, 'wide', 'lean'"):
        linear_cross_entropy(h, w, t, chunk_size="narrow")
    with pytest.raises(ValueError, match=r"linear_cross_entropy.*'reduction'"):
        linear_cross_entropy(h, w, t, reduction="batchmean")
    tb = t.clone()
    tb[0] = V
    if device == "cpu":
        with pytest.raises(ValueError, match=r"linear_cross_entropy.*'target'.*outside"):
            linear_cross_entropy(h, w, tb)
    else:
        assert torch.isnan(linear_cross_entropy(h, w, tb))


def test_reference_fallback_matches_torch():
    # the closed-form CPU fallback of the custom op (plain torch, no Triton), with a row scale
    from tritonize.kernels.linear_cross_entropy import _forward_reference

    h = torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(30, 8, dtype=torch.float64)
    b = torch.randn(30, dtype=torch.float64)
    t = torch.randint(0, 30, (6,))
    t[2] = -100
    rs = torch.rand(6, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    rows = F.cross_entropy(4 * torch.tanh(F.linear(*leaves) / 4), t, reduction="none", label_smoothing=0.1)
    (rows * rs).sum().backward()
    loss, dh, dw, db = _forward_reference(h, w, t, b, -100, "none", 1.0, None, 0.1, 4.0, True, True, True, rs)
    torch.testing.assert_close(loss.double(), (rows * rs).detach(), rtol=1e-5, atol=1e-6)
    for got, leaf in zip((dh, dw, db), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-6)


def _with_logits_objective(fn, h, w, b, t, r, reduction):
    """A loss on both outputs: 0.7 * CE + sum(logits * r), so both gradient paths are exercised."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (h, w, b)]
    loss, logits = fn(leaves[0], leaves[1], t, leaves[2], reduction=reduction)
    (0.7 * loss + (logits.float() * r).sum()).backward()
    return [loss.detach(), logits.detach()] + [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("v", [1100, 1104])  # odd-aligned rows (copy path) and 16-aligned rows (direct path)
def test_with_logits_forward_backward(device, v):
    from tritonize.kernels import linear_cross_entropy_with_logits

    for dtype in dtypes_for(device):
        for bias, reduction in ((True, "mean"), (False, "sum")):
            h = torch.randn(2, 19, H, device=device, dtype=dtype)
            w = torch.randn(v, H, device=device, dtype=dtype) * H**-0.5 * 3
            b = torch.randn(v, device=device, dtype=dtype) if bias else None
            t = torch.randint(0, v, (38,), device=device)  # flat targets, as transformers passes them
            t[[1, 5]] = -100
            r = torch.randn(2, 19, v, device=device) * 1e-2

            def torch_fn(hh, ww, tt, bb, reduction):
                z = F.linear(hh, ww, bb)
                return F.cross_entropy(z.float().view(-1, v), tt, reduction=reduction), z

            tor = _with_logits_objective(torch_fn, h, w, b, t, r, reduction)
            ref = _with_logits_objective(torch_fn, *(None if x is None else x.float() for x in (h, w, b)), t, r,
                                         reduction)  # fmt: skip
            # the eager one-pass Function, and the custom op that traced graphs (AOTAutograd) call
            for name, fn in (("eager", linear_cross_entropy_with_logits), ("custom op", _custom_op_with_logits)):
                ours = _with_logits_objective(fn, h, w, b, t, r, reduction)
                for i, what in enumerate(("loss", "logits", "dhidden", "dweight", "dbias")):
                    if ref[i] is None:
                        assert ours[i] is None
                        continue
                    assert_close3(ours[i], tor[i], ref[i], name=f"{name} {dtype} v={v} bias={bias} {reduction} {what}")


def _custom_op_with_logits(h, w, t, b, reduction):
    from tritonize.kernels.linear_cross_entropy import _lce_logits_fwd_op

    loss, logits, *_ = _lce_logits_fwd_op(h, w, t, b, -100, reduction, h.requires_grad, w.requires_grad,
                                          b is not None and b.requires_grad)  # fmt: skip
    return loss, logits


def test_with_logits_traced_takes_the_custom_op():
    """Under AOTAutograd (torch.compile's aot_eager) the public function must call the one-pass
    custom op, not the composed F.linear + linear_cross_entropy (two vocabulary matmuls)."""
    from tritonize.kernels import linear_cross_entropy_with_logits

    seen = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        from functorch.compile import make_boxed_func

        def fw(g, _inputs):
            seen.extend(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g)

        return aot_autograd(fw_compiler=fw, bw_compiler=lambda g, _i: make_boxed_func(g))(gm, example_inputs)

    h = torch.randn(6, H, requires_grad=True)
    w = torch.randn(40, H, requires_grad=True)
    t = torch.randint(0, 40, (6,))
    loss, logits = torch.compile(linear_cross_entropy_with_logits, backend=backend, fullgraph=True)(h, w, t)
    (loss + logits.sum()).backward()
    assert any("linear_cross_entropy_logits_fwd" in s for s in seen), seen
    assert not any(s.endswith("linear_cross_entropy_fwd.default") for s in seen), seen
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w), t), rtol=1e-5, atol=1e-5)


def test_with_logits_only_loss_used_and_chunks(device):
    from tritonize.kernels import linear_cross_entropy_with_logits
    from tritonize.kernels.linear_cross_entropy import linear_cross_entropy_forward

    h, w, b, t = _inputs(device, torch.float32, 37)
    # backward through the loss only: the logits' gradient is None inside
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss, logits = linear_cross_entropy_with_logits(leaves[0], leaves[1], t, leaves[2])
    assert "LogitsFn" in type(loss.grad_fn).__name__  # the one-pass path, not the composed form
    loss.backward()
    refs = [x.clone().requires_grad_() for x in (h, w, b)]
    F.cross_entropy(F.linear(refs[0], refs[1], refs[2]), t).backward()
    torch.testing.assert_close(logits, F.linear(h, w, b), rtol=1e-4, atol=1e-4)
    for a, e in zip(leaves, refs):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)
    # several chunks (16, 16, 5) writing the returned logits; V=1100 is not 16-aligned (copy path)
    out = torch.empty(37, V, device=device)
    rows, _, _, _ = linear_cross_entropy_forward(h, w, t, b, reduction="none", need_dh=False, need_dw=False,
                                                 need_db=False, chunk_size=16, logits_out=out)  # fmt: skip
    torch.testing.assert_close(out, F.linear(h, w, b), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows, F.cross_entropy(F.linear(h, w, b), t, reduction="none"), rtol=1e-4, atol=1e-4)
    # no grad mode: the composed form, same values
    with torch.no_grad():
        l2, z2 = linear_cross_entropy_with_logits(h, w, t, b)
    torch.testing.assert_close(l2, F.cross_entropy(F.linear(h, w, b), t), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z2, F.linear(h, w, b), rtol=1e-4, atol=1e-4)


def test_second_backward_raises(device):
    """The gradients are formed in the forward and scaled in place by the backward: a second
    backward through the same graph (retain_graph) must raise, on every path, not double-scale."""
    from tritonize.kernels import linear_cross_entropy_with_logits

    h = torch.randn(6, H, device=device, requires_grad=True)
    w = torch.randn(40, H, device=device, requires_grad=True)
    t = torch.randint(0, 40, (6,), device=device)
    for fn in (lambda: linear_cross_entropy(h, w, t), lambda: linear_cross_entropy_with_logits(h, w, t)[0],
               lambda: _custom_op_with_logits(h, w, t, None, "mean")[0]):
        loss = fn()
        loss.backward(retain_graph=True)
        # (custom op: autograd's own saved-tensor version check fires first, also an error)
        with pytest.raises(RuntimeError, match="backward ran twice|modified by an inplace operation"):
            loss.backward()


def test_lean_vocabulary_slices(device, monkeypatch):
    """chunk_size="lean": the vocabulary in slices (`_ce_slices`), the row normaliser merged across
    them; every option against the fp32 reference, and against the plain chunk loop."""
    from tritonize.kernels.linear_cross_entropy import LEAN, lean_plan, linear_cross_entropy_forward

    mod = sys.modules["tritonize.kernels.linear_cross_entropy"]
    calls = []
    sliced = mod._sliced_chunks
    monkeypatch.setattr(mod, "_sliced_chunks", lambda *a, **k: (calls.append(a[9:11]), sliced(*a, **k))[1])

    # Liger's rows for (N, H, V) doubled, over two slices; one chunk when N is small
    assert lean_plan(8192, 2048, 128256) == (512, 2) and lean_plan(8192, 4096, 128256) == (512, 2)
    assert lean_plan(37, H, V) == (4, 2) and lean_plan(1, H, V) == (1, 1) and lean_plan(300, 512, 1100) == (256, 2)
    n = 37  # lean_plan: 4-row chunks (nine, then 1 row), two slices of V = 1100 (560 + 540 columns)
    for dtype in dtypes_for(device):
        h, w, b, t = _inputs(device, dtype, n)
        for reduction in ("mean", "sum", "none"):
            go = torch.rand(n, device=device) + 0.5 if reduction == "none" else torch.tensor(0.7, device=device)
            _check(device, dtype, h, w, b, t, go, f"lean {dtype} {reduction}", reduction=reduction, chunk_size="lean")
    assert calls and all(c == (4, 2) for c in calls)  # (rows, slices): the sliced loop ran
    dtype = dtypes_for(device)[-1]
    h, w, b, t = _inputs(device, dtype, n)
    one = torch.tensor(1.0, device=device)
    _check(device, dtype, h * 4, w, b, t, one, "lean softcap+smoothing", logit_softcap=10.0, label_smoothing=0.1,
           chunk_size="lean")  # fmt: skip
    _check(device, dtype, h, w, None, t, torch.tensor(0.3, device=device), "lean normalizer, no bias", normalizer=11.0,
           chunk_size="lean")  # fmt: skip
    # a target in the last column of the first slice and in the first of the second; an odd V
    # (padded to 16 columns: the last slice carries the padding)
    h32, w32, b32, t32 = _inputs(device, torch.float32, n)
    t32[0], t32[2] = 559, 560
    ref = linear_cross_entropy_forward(h32, w32, t32, b32, chunk_size=8)
    got = linear_cross_entropy_forward(h32, w32, t32, b32, chunk_size=LEAN)
    for x, y, what in zip(got, ref, ("loss", "dh", "dW", "db")):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=what)
    w_odd, b_odd = w32[:1093], b32[:1093]
    t_odd = t32.clamp(max=1092)
    ref = linear_cross_entropy_forward(h32, w_odd, t_odd, b_odd, chunk_size=8)
    got = linear_cross_entropy_forward(h32, w_odd, t_odd, b_odd, chunk_size=LEAN)
    for x, y, what in zip(got, ref, ("loss", "dh", "dW", "db")):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"odd V {what}")
    # the loss alone (no gradients): one walk over the slices, no recomputation
    with torch.no_grad():
        y = linear_cross_entropy(h32, w32, t32, b32, chunk_size="lean")
    torch.testing.assert_close(y, F.cross_entropy(F.linear(h32, w32, b32), t32))
    # all targets ignored: loss 0 and zero gradients
    leaves = [x.clone().requires_grad_() for x in (h32, w32, b32)]
    y = linear_cross_entropy(leaves[0], leaves[1], torch.full_like(t32, -100), leaves[2], chunk_size="lean")
    y.backward()
    assert y.item() == 0.0 and all(torch.count_nonzero(x.grad) == 0 for x in leaves)
    # the registered custom op (what torch.compile sees) takes the same path
    fast = _run(lambda *a: linear_cross_entropy(a[0], a[1], t32, a[2], chunk_size="lean"), (h32, w32, b32), one)
    monkeypatch.setattr(mod, "eager_fast_path", lambda _x: False)
    n_calls = len(calls)
    slow = _run(lambda *a: linear_cross_entropy(a[0], a[1], t32, a[2], chunk_size="lean"), (h32, w32, b32), one)
    assert len(calls) > n_calls
    for x, y in zip(fast, slow):
        torch.testing.assert_close(x, y)
    if device != "cpu":  # an out-of-range target: NaN loss (CPU targets raise before any launch)
        tb = t32.clone()
        tb[3] = V
        assert torch.isnan(linear_cross_entropy(h32, w32, tb, chunk_size="lean"))
