"""tritonize.kernels.attention: forward and all three gradients against an fp32 reference, with
torch in the same dtype as the yardstick (assert_close3), for every mask kind the issue lists."""

import pytest
import torch

from tests.helpers import assert_close3, dtypes_for, noncontig_rows, stride0_grad
from tritonize.kernels import attention
from tritonize.kernels.attention import attention_reference


def _hf_layout(x):
    """Same values, stored (B, T, H, D) and viewed (B, H, T, D): what HF passes after
    `.view(B, T, H, D).transpose(1, 2)` (must be read in place, not copied)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _run(q, k, v, grad="randn", **kw):
    """(out, dq, dk, dv) from ours, torch in the same dtype, and the fp32 reference."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, **kw)
    if grad == "stride0":
        g = stride0_grad(out)
    else:
        g = torch.randn(out.shape, dtype=out.dtype, device=out.device)
        if grad == "noncontig":
            g = noncontig_rows(g)
    res = [out, *torch.autograd.grad(out, leaves, g)]
    kw.pop("deterministic", None)
    return res, _ref_grads(q, k, v, g, False, kw), _ref_grads(q, k, v, g, True, kw)


def _ref_grads(q, k, v, g, upcast, kw):
    """Reference output and grads: in q's dtype (upcast=False, the yardstick) or in fp32."""
    cast = (lambda t: t.float()) if upcast else (lambda t: t)
    leaves = [cast(t).detach().requires_grad_(True) for t in (q, k, v)]
    out = attention_reference(*leaves, upcast=upcast, **kw)
    return [out, *torch.autograd.grad(out, leaves, cast(g))]


def _check(res, tor, ref, what):
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), res, tor, ref):
        assert_close3(a, b, c, name=f"{what}: {name}")


def _inputs(device, dtype, B, H, Hkv, Tq, Tk, D):
    q = torch.randn(B, H, Tq, D, device=device, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype)
    return q, k, v


CASES = {
    # name: (B, H, Hkv, Tq, Tk, D, kwargs builder)
    "no_mask": (2, 2, 2, 37, 37, 16, lambda d, t, B, H, Tq, Tk: {}),
    "causal": (2, 2, 2, 37, 37, 32, lambda d, t, B, H, Tq, Tk: {"causal": True}),
    # decoding-style q shorter than k (bottom-right aligned), and q longer than k: the first
    # Tq - Tk rows see no key at all -> fully masked rows (0 output, 0 grads)
    "causal_tq_lt_tk": (1, 2, 2, 20, 53, 16, lambda d, t, B, H, Tq, Tk: {"causal": True}),
    "causal_tq_gt_tk": (1, 2, 2, 45, 19, 16, lambda d, t, B, H, Tq, Tk: {"causal": True}),
    # HF padding mask: (B, 1, 1, Tk) additive finfo.min, plus causal; batch 1 fully padded
    "padding_mask": (2, 2, 2, 29, 29, 16, lambda d, t, B, H, Tq, Tk: {"causal": True, "mask": _padding(d, t, B, Tk)}),
    # bool (B, 1, Tq, Tk), True = keep, with one row fully masked
    "bool_mask": (2, 2, 2, 23, 41, 16, lambda d, t, B, H, Tq, Tk: {"mask": _bool_mask(d, B, 1, Tq, Tk)}),
    # per-head additive float mask (B, H, Tq, Tk) with -inf entries (and a fully -inf row)
    "float_mask_bhqk": (1, 2, 1, 19, 26, 16, lambda d, t, B, H, Tq, Tk: {"mask": _float_mask(d, t, B, H, Tq, Tk)}),
    # GQA (4 query heads over 2 kv heads) with atomic dq; MQA (1 kv head) deterministic
    "gqa_atomic": (2, 4, 2, 33, 33, 16, lambda d, t, B, H, Tq, Tk: {"causal": True, "deterministic": False}),
    "mqa": (1, 4, 1, 21, 34, 16, lambda d, t, B, H, Tq, Tk: {}),
    "d80": (1, 2, 2, 35, 35, 80, lambda d, t, B, H, Tq, Tk: {"causal": True, "scale": 0.3}),
    "t1_decode": (2, 2, 1, 1, 23, 32, lambda d, t, B, H, Tq, Tk: {"causal": True}),
    "t1_t1": (1, 2, 2, 1, 1, 16, lambda d, t, B, H, Tq, Tk: {}),
}


def _padding(device, dtype, B, Tk):
    m = torch.zeros(B, 1, 1, Tk, device=device, dtype=dtype)
    m[0, ..., Tk - 7:] = torch.finfo(dtype).min  # right padding
    m[1, ..., :] = torch.finfo(dtype).min  # fully padded sequence: uniform softmax, as eager
    return m


def _bool_mask(device, B, H, Tq, Tk):
    m = torch.rand(B, H, Tq, Tk, device=device) > 0.3
    m[0, 0, 5] = False  # fully masked row
    return m


def _float_mask(device, dtype, B, H, Tq, Tk):
    m = torch.randn(B, H, Tq, Tk, device=device, dtype=dtype)
    m[torch.rand(B, H, Tq, Tk, device=device) < 0.3] = float("-inf")
    m[0, 1, 2] = float("-inf")  # fully masked row
    return m


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(device, case):
    B, H, Hkv, Tq, Tk, D, make_kw = CASES[case]
    for i, dtype in enumerate(dtypes_for(device)):
        q, k, v = _inputs(device, dtype, B, H, Hkv, Tq, Tk, D)
        kw = make_kw(device, dtype, B, H, Tq, Tk)
        # vary the layouts across dtypes: HF's transposed view, padded rows, stride-0 grad
        if i == 0:
            q, k, v, grad = _hf_layout(q), _hf_layout(k), _hf_layout(v), "randn"
        elif i == 1:
            q, k, grad = noncontig_rows(q), noncontig_rows(k), "stride0"
        else:
            grad = "noncontig"
        res, tor, ref = _run(q, k, v, grad=grad, **kw)
        _check(res, tor, ref, f"{case} {dtype}")
        if i == 0:
            # HF layout in -> output in the same layout, so HF's transpose(1, 2).reshape is a view
            assert res[0].stride() == q.stride()
        # rows with no visible key: output and dq exactly 0 (not NaN)
        empty = None
        if case == "causal_tq_gt_tk":
            empty = (slice(None), slice(None), slice(0, Tq - Tk))
        elif case == "bool_mask":
            empty = (0, slice(None), 5)
        elif case == "float_mask_bhqk":
            empty = (0, 1, 2)
        if empty is not None:
            assert torch.all(res[0][empty] == 0) and torch.all(res[1][empty] == 0), case
        assert all(torch.isfinite(t).all() for t in res), case


def test_attention_dropout(device):
    """Keep fraction ~ 1 - p; same seed -> same result, other seed -> other mask; forward and
    gradients equal the reference run with the very keep mask the kernel drew (recovered from
    a probe run: q = k = 0 makes P uniform, v = I makes out[i, j] = Z_ij / ((1 - p) Tk))."""
    B, H, T, p = 2, 2, 32, 0.3
    for dtype in dtypes_for(device):
        zeros = torch.zeros(B, H, T, T, device=device, dtype=dtype)
        eye = torch.eye(T, device=device, dtype=dtype).expand(B, H, T, T)
        torch.manual_seed(123)
        probe = attention(zeros, zeros, eye, dropout_p=p).float() * ((1 - p) * T)
        keep = probe > 0.5
        assert torch.all((probe - keep.float()).abs() < 0.05), "probe values must be 0 or 1"
        frac = keep.float().mean().item()
        assert abs(frac - (1 - p)) < 0.03, f"keep fraction {frac:.3f}, expected {1 - p}"
        torch.manual_seed(123)
        again = attention(zeros, zeros, eye, dropout_p=p).float() * ((1 - p) * T)
        assert torch.equal(probe, again), "same seed must give the same result"
        torch.manual_seed(124)
        other = attention(zeros, zeros, eye, dropout_p=p).float() * ((1 - p) * T)
        assert not torch.equal(other > 0.5, keep), "another seed must give another mask"

        q, k, v = _inputs(device, dtype, B, H, H, T, T, T)
        torch.manual_seed(123)  # the kernel draws the same seed, hence the same mask `keep`
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, dropout_p=p, causal=True)
        g = torch.randn_like(out)
        res = [out, *torch.autograd.grad(out, leaves, g)]
        kw = {"dropout_p": p, "causal": True, "dropout_mask": keep}
        _check(res, _ref_grads(q, k, v, g, False, kw), _ref_grads(q, k, v, g, True, kw), f"dropout {dtype}")


def test_attention_empty_and_deterministic(device):
    q = torch.randn(0, 2, 5, 16, device=device)
    assert attention(q, q, q).shape == (0, 2, 5, 16)
    q = torch.randn(1, 2, 0, 16, device=device)
    k = torch.randn(1, 2, 4, 16, device=device)
    assert attention(q, k, k).shape == (1, 2, 0, 16)
    q = torch.randn(1, 2, 3, 16, device=device)
    k = torch.randn(1, 2, 0, 16, device=device)
    out = attention(q, k, k)
    assert out.shape == (1, 2, 3, 16) and torch.all(out == 0)
    # deterministic mode: bit-identical gradients across runs
    q, k, v = _inputs(device, torch.float32, 1, 2, 1, 19, 19, 16)
    grads = []
    for _ in range(2):
        ls = [t.detach().requires_grad_(True) for t in (q, k, v)]
        o = attention(*ls, causal=True)
        grads.append(torch.autograd.grad(o, ls, torch.ones_like(o)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_attention_bad_inputs(device):
    q = torch.randn(2, 4, 8, 16, device=device)
    k = torch.randn(2, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'k'.*batch"):
        attention(q, torch.randn(3, 2, 8, 16, device=device), torch.randn(3, 2, 8, 16, device=device))
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'k'.*head dim"):
        attention(q, torch.randn(2, 2, 8, 32, device=device), torch.randn(2, 2, 8, 32, device=device))
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'k'.*must divide"):
        attention(q, torch.randn(2, 3, 8, 16, device=device), torch.randn(2, 3, 8, 16, device=device))
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'v'"):
        attention(q, k, torch.randn(2, 2, 9, 16, device=device))
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'mask'.*broadcastable"):
        attention(q, k, k, mask=torch.zeros(2, 1, 1, 7, device=device))
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'mask'.*broadcastable"):
        attention(q, k, k, mask=torch.zeros(3, 1, 8, 8, device=device))
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'q'.*4-D"):
        attention(q[0], k[0], k[0])
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'q'.*head dim"):
        big = torch.randn(1, 1, 2, 512, device=device)
        attention(big, big, big)
    with pytest.raises(ValueError, match=r"tritonize.attention: argument 'dropout_p'"):
        attention(q, k, k, dropout_p=1.0)
    with pytest.raises(TypeError, match=r"tritonize.attention: argument 'k'.*dtype"):
        attention(q, k.half(), k)
    with pytest.raises(TypeError, match=r"tritonize.attention: argument 'mask'.*dtype"):
        attention(q, k, k, mask=torch.zeros(2, 1, 1, 8, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match=r"tritonize.attention: argument 'q'.*dtype"):
        qi = torch.zeros(2, 4, 8, 16, dtype=torch.int64, device=device)
        attention(qi, qi, qi)


def test_attention_custom_op_path_matches_fast_path(device, monkeypatch):
    """Eager calls take the autograd.Function fast path; torch.compile/fake tensors take the
    registered custom ops. Both must run the same launchers: bit-identical out and grads."""
    import importlib

    mod = importlib.import_module("tritonize.kernels.attention")
    q, k, v = _inputs(device, torch.float16, 1, 4, 2, 21, 21, 16)
    mask = torch.zeros(1, 1, 1, 21, device=device, dtype=torch.float16)
    mask[..., -3:] = torch.finfo(torch.float16).min
    results = []
    for fast in (True, False):
        monkeypatch.setattr(mod, "EAGER_FAST_PATH", fast)
        ls = [t.detach().requires_grad_(True) for t in (q, k, v)]
        o = attention(*ls, mask=mask, causal=True)
        results.append([o, *torch.autograd.grad(o, ls, torch.ones_like(o))])
        with torch.no_grad():  # inference skips autograd entirely
            results[-1].append(attention(q, k, v, mask=mask, causal=True))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(results[0][0], results[0][4])


def test_attention_reference_path_layout_and_tensor_seed(monkeypatch):
    """The CPU reference path returns out/grads in the layouts the fake implementations declare
    (Inductor asserts them: BERT with a padding mask under rest="inductor"), and a 0-d int64 seed
    tensor gives the same dropout mask as the same int seed."""
    import importlib

    A = importlib.import_module("tritonize.kernels.attention")
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(A, "use_triton", lambda t: False)
    B, T, H, D = 2, 5, 3, 8
    q, k, v = (torch.randn(B, T, H, D).transpose(1, 2) for _ in range(3))  # HF's transposed views
    mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    mask[1, ..., 3:] = False
    seed = torch.tensor(7, dtype=torch.int64)
    out, lse = torch.ops.tritonize.attention_fwd(q, k, v, mask, False, 0.3, 0.2, seed, True)
    do = torch.randn(B, T, H, D).transpose(1, 2)
    grads = torch.ops.tritonize.attention_bwd(do, q, k, v, out, lse, mask, False, 0.3, 0.2, seed, True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fdo = (mode.from_tensor(t) for t in (q, k, v, do))
        fout, flse = torch.ops.tritonize.attention_fwd(fq, fk, fv, mode.from_tensor(mask), False, 0.3, 0.2, seed, True)
        fgrads = torch.ops.tritonize.attention_bwd(fdo, fq, fk, fv, fout, flse, mode.from_tensor(mask), False, 0.3,
                                                   0.2, seed, True)
    assert out.stride() == fout.stride() and lse.stride() == flse.stride()
    assert [g.stride() for g in grads] == [g.stride() for g in fgrads]
    ref = A.attention_reference(q, k, v, mask, False, 0.3, 0.2, seed=7)
    torch.testing.assert_close(out, ref)
    # public function: tensor seed == int seed; bad seed type rejected
    a = A.attention(q, k, v, mask, scale=0.3, dropout_p=0.2, seed=seed)
    b = A.attention(q, k, v, mask, scale=0.3, dropout_p=0.2, seed=7)
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="tritonize.attention: argument 'seed'"):
        A.attention(q, k, v, dropout_p=0.2, seed=1.5)
