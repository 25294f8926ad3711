"""sdpa_repeat_kv (tritonize/kernels/sdpa_repeat_kv.py): torch's SDPA on repeat_kv'd k, v whose
autograd node saves the kv heads instead of the repeated copies; and the sdpa pattern's rewrite to
it where torch's fused SDPA is kept (CUDA half precision; the CPU tests pretend, see `kept_sdpa`)."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import tritonize.kernels.sdpa_repeat_kv as srk
from tests.fuser.common import check_parity
from tests.fuser.test_attention import repeat_kv as hf_repeat_kv  # transformers' spelling, for the models
from tritonize.kernels.sdpa_repeat_kv import repeat_kv, sdpa_repeat_kv

B, HKV, T, D = 2, 3, 7, 8


def reference(q, k, v, n_rep, is_causal=False, scale=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, hf_repeat_kv(k, n_rep), hf_repeat_kv(v, n_rep), None, dropout_p,
                                          is_causal, scale=scale)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _qkv(n_rep, dtype=torch.float32, hkv=HKV, t=T):
    return (torch.randn(B, hkv * n_rep, t, D, dtype=dtype), torch.randn(B, hkv, t, D, dtype=dtype),
            torch.randn(B, hkv, t, D, dtype=dtype))


def _run(fn, q, k, v, n_rep, grad_out=None, **kw):
    q, k, v = _leaves(q, k, v)
    out = fn(q, k, v, n_rep, **kw)
    if grad_out is None:
        out.sum().backward()  # a stride-0 (expanded) upstream gradient
    else:
        out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def _assert_same(a, b, **tol):
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}", **tol)


# ---------------------------------------------------------------------------------------------
# the function
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_rep", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("upstream", ["sum", "random"])
def test_matches_repeat_then_sdpa(n_rep, causal, scale, upstream):
    q, k, v = _qkv(n_rep)
    go = None if upstream == "sum" else torch.randn(B, HKV * n_rep, T, D)
    kw = dict(is_causal=causal, scale=scale)
    _assert_same(_run(sdpa_repeat_kv, q, k, v, n_rep, go, **kw), _run(reference, q, k, v, n_rep, go, **kw))


@pytest.mark.parametrize("hkv", [1, 3])
def test_non_contiguous_inputs(hkv):
    """q, k, v as models pass them: (B, T, H, D) projections viewed as (B, H, T, D) by a transpose
    (k, v even as slices of one fused kv projection); Hkv = 1 (MQA: repeat_kv is a view then)."""
    n_rep = 2
    qp = torch.randn(B, T, hkv * n_rep, D)
    kvp = torch.randn(B, T, 2 * hkv, D)

    def run(fn):
        qq, kv = _leaves(qp, kvp)
        q, k, v = qq.transpose(1, 2), kv[:, :, :hkv].transpose(1, 2), kv[:, :, hkv:].transpose(1, 2)
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        out = fn(q, k, v, n_rep, is_causal=True)
        out.sum().backward()
        return out.detach(), qq.grad, kv.grad

    for a, b in zip(run(sdpa_repeat_kv), run(reference)):
        torch.testing.assert_close(a, b)


def _saved_shapes(fn, q, k, v, n_rep, **kw):
    """Shapes of the tensors SDPA's autograd node saves, through an outer saved-tensor hook (which
    sdpa_repeat_kv composes with: it hands the outer hook what it really saves)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t.detach()

    q, k, v = _leaves(q, k, v)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(q, k, v, n_rep, **kw)
    out.sum().backward()  # the outer unpack gives back what was saved: backward still works
    return shapes


def test_repeated_kv_not_saved():
    n_rep = 2
    q, k, v = _qkv(n_rep)
    full, small = (B, HKV * n_rep, T, D), (B, HKV, T, D)
    ref = _saved_shapes(reference, q, k, v, n_rep, is_causal=True)
    ours = _saved_shapes(sdpa_repeat_kv, q, k, v, n_rep, is_causal=True)
    assert ref.count(full) == 4 and ref.count(small) == 0, ref  # q, k_rep, v_rep, out
    assert ours.count(full) == 2 and ours.count(small) == 2, ours  # q, out; k, v


def _repeat_copies_alive(fn, monkeypatch):
    """Whether the repeat copies the forward made are still alive after it (held by autograd), and
    how many repeat_kv calls there were. No outer hooks here: sdpa_repeat_kv's own pack hook at work."""
    made = []

    def recording_repeat(x, n_rep):
        r = repeat_kv(x, n_rep)
        made.append(weakref.ref(r))
        return r

    monkeypatch.setattr(srk, "repeat_kv", recording_repeat)
    q, k, v = _leaves(*_qkv(4))
    out = fn(q, k, v, 4, is_causal=True)
    gc.collect()
    alive = [r() is not None for r in made[:2]]
    out.sum().backward()
    return alive, len(made)


def test_repeat_copies_freed_after_forward(monkeypatch):
    assert _repeat_copies_alive(sdpa_repeat_kv, monkeypatch) == ([False, False], 2)

    def plain(q, k, v, n_rep, **kw):
        return F.scaled_dot_product_attention(q, srk.repeat_kv(k, n_rep), srk.repeat_kv(v, n_rep), **kw)

    # the same check on the plain repeat + SDPA: autograd keeps them (so the check itself works)
    assert _repeat_copies_alive(plain, monkeypatch) == ([True, True], 2)


def test_dropout_draws_as_torch():
    """SDPA draws its own dropout RNG; the hooks do not change the draw or the backward's mask."""
    n_rep, p = 2, 0.3
    q, k, v = _qkv(n_rep)
    go = torch.randn(B, HKV * n_rep, T, D)
    outs = []
    for fn in (sdpa_repeat_kv, reference):
        torch.manual_seed(123)
        outs.append(_run(fn, q, k, v, n_rep, go, is_causal=True, dropout_p=p))
    _assert_same(*outs)
    assert not torch.equal(outs[0][0], reference(q, k, v, n_rep, is_causal=True))  # dropout happened


def test_inplace_change_before_backward_raises():
    """Saved-tensor hooks turn off autograd's version check; sdpa_repeat_kv checks versions itself:
    changing q (saved as is) or k (rebuilt from it) in place before backward raises."""
    n_rep = 2
    for which in ("q", "k"):
        q, k, v = _leaves(*_qkv(n_rep))
        qq, kk = q * 1, k * 1  # non-leaves, modifiable in place
        out = sdpa_repeat_kv(qq, kk, v, n_rep, is_causal=True)
        with torch.no_grad():
            (qq if which == "q" else kk).mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    # unchanged: runs, and retain_graph allows a second backward (the repeat is rebuilt again)
    q, k, v = _leaves(*_qkv(n_rep))
    out = sdpa_repeat_kv(q, k, v, n_rep)
    out.sum().backward(retain_graph=True)
    g = k.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(k.grad, 2 * g)


def test_double_backward():
    """create_graph=True: torch's fused CPU SDPA has no double backward (both raise); the math
    backend (which saves derived copies, not k_rep) matches; and a saved *view* of a repeat
    (matmul saves k_rep^T) is rebuilt and differentiated through the original repeat."""
    n_rep = 2
    q, k, v = _qkv(n_rep, torch.float64)

    def second(fn):
        qq, kk, vv = _leaves(q, k, v)
        out = fn(qq, kk, vv, n_rep, is_causal=True)
        g = torch.autograd.grad(out.pow(2).sum(), (qq, kk, vv), create_graph=True)
        return g + torch.autograd.grad(sum(x.pow(2).sum() for x in g), (qq, kk, vv))

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for fn in (sdpa_repeat_kv, reference):
            with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
                second(fn)
    with sdpa_kernel(SDPBackend.MATH):
        for a, b in zip(second(sdpa_repeat_kv), second(reference)):
            torch.testing.assert_close(a, b)

    packed = []

    def scores(qq, kk, vv, n, hooked):  # (q k_rep^T)^2 v_rep: the matmul saves k_rep^T, a view
        kr, vr = repeat_kv(kk, n), repeat_kv(vv, n)
        if not hooked:
            return torch.matmul(torch.matmul(qq, kr.transpose(-1, -2)).pow(2), vr)
        saved = srk._SavedRepeats()
        saved.add(kr, kk, n)
        saved.add(vr, vv, n)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(saved.pack(t)) or packed[-1],
                                                      saved.unpack):
            return torch.matmul(torch.matmul(qq, kr.transpose(-1, -2)).pow(2), vr)

    a = second(lambda *a, **kw: scores(*a[:4], hooked=True))
    assert any(isinstance(r, srk._Repeated) and r.view is not None for r in packed), packed
    for x, y in zip(a, second(lambda *a, **kw: scores(*a[:4], hooked=False))):
        torch.testing.assert_close(x, y)


def test_under_checkpoint():
    """Inside torch.utils.checkpoint (non-reentrant: itself saved-tensor hooks) the hooks compose
    with checkpoint's instead of replacing them: gradients as without checkpoint."""
    from torch.utils.checkpoint import checkpoint

    n_rep = 2
    q, k, v = _qkv(n_rep)
    go = torch.randn(B, HKV * n_rep, T, D)

    def ck(q, k, v, n_rep, **kw):
        return checkpoint(lambda a, b, c: sdpa_repeat_kv(a * 1, b * 1, c, n_rep, **kw), q, k, v, use_reentrant=False)

    _assert_same(_run(ck, q, k, v, n_rep, go, is_causal=True), _run(reference, q, k, v, n_rep, go, is_causal=True))


def test_no_grad_fake_and_empty():
    n_rep = 2
    q, k, v = _qkv(n_rep)
    with torch.no_grad():
        torch.testing.assert_close(sdpa_repeat_kv(q, k, v, n_rep), reference(q, k, v, n_rep))
    from torch._subclasses.fake_tensor import FakeTensorMode

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Accessing the data pointer of FakeTensor"
        with FakeTensorMode():
            fq, fk, fv = (torch.empty(x.shape, requires_grad=True) for x in (q, k, v))
            assert sdpa_repeat_kv(fq, fk, fv, n_rep, is_causal=True).shape == q.shape
    _assert_same(_run(sdpa_repeat_kv, *_qkv(n_rep, t=0), n_rep), _run(reference, *_qkv(n_rep, t=0), n_rep))


# ---------------------------------------------------------------------------------------------
# the sdpa pattern's rewrite
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def kept_sdpa(monkeypatch):
    """Make the sdpa pattern treat CPU fp32 as a place where torch's fused SDPA is kept (as CUDA
    half precision), so that the kept-SDPA rewrites run on CPU."""
    import tritonize.patterns.attention as att

    monkeypatch.setenv("TRITONIZE_SDPA", "auto")
    monkeypatch.setattr(att, "torch_runs_fused_sdpa", lambda q: True)
    return att


class LlamaAttention(nn.Module):
    """transformers' LlamaAttention shape of it: projections, head split, repeat_kv, SDPA (causal, or
    a constant causal mask built in the graph as transformers does under Dynamo), merge, o_proj."""

    def __init__(self, h=4, hkv=2, d=8, dropout=0.0, mask=False):
        super().__init__()
        self.h, self.hkv, self.d, self.p, self.mask = h, hkv, d, dropout, mask
        self.q_proj = nn.Linear(h * d, h * d, bias=False)
        self.k_proj = nn.Linear(h * d, hkv * d, bias=False)
        self.v_proj = nn.Linear(h * d, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, h * d, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)
        n = self.h // self.hkv
        k, v = hf_repeat_kv(k, n), hf_repeat_kv(v, n)
        p = self.p if self.training else 0.0
        if self.mask:
            i = torch.arange(t, device=x.device)
            keep = (i[None, :] <= i[:, None]).expand(b, 1, t, t)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p, scale=1 / math.sqrt(self.d))
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


def _targets(model, x, options):
    """The rewritten graph's call targets and the report, through the fuser's transform."""
    from tritonize.fuser.capture import transform
    from tritonize.fuser.report import Report
    from tritonize.patterns import all_patterns

    seen = {}
    rep = Report("t")

    def backend(gm, ex):
        transform(gm, rep, all_patterns(), options=options)
        seen["targets"] = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(x)
    return seen["targets"], rep, out


@pytest.mark.parametrize("mask", [False, True])
def test_pattern_rewrites_kept_repeated_sdpa(kept_sdpa, mask):
    x = torch.randn(2, 7, 32)
    # gqa_fold=False: the default folds the repeat into enable_gqa in rest="eager" (test_pattern_options)
    rep = check_parity(LlamaAttention(mask=mask), [x], {"sdpa": 1}, atol=1e-5, rtol=1e-5, gqa_fold=False)
    site, = [s for s in rep.sites if s.pattern == "sdpa"]
    assert site.fused and kept_sdpa.REPEAT_RECOMPUTED in site.note, site.note
    assert ("proven causal" in site.note) == mask, site.note

    targets, rep, _ = _targets(LlamaAttention(mask=mask), x, {})
    assert sdpa_repeat_kv in targets and F.scaled_dot_product_attention not in targets, targets
    names = [getattr(t, "__name__", str(t)) for t in targets]
    # the repeats (and a proven-causal mask's construction) are gone; the reshape is o's head merge
    assert "expand" not in names and "arange" not in names and names.count("reshape") == 1, names


def test_default_folds_gqa_in_eager_rest(kept_sdpa):
    x = torch.randn(2, 7, 32)
    rep = check_parity(LlamaAttention(), [x], {"sdpa": 1}, atol=1e-5, rtol=1e-5)
    site, = [s for s in rep.sites if s.pattern == "sdpa"]
    assert "enable_gqa=True" in site.note and kept_sdpa.REPEAT_RECOMPUTED not in site.note, site.note


def test_pattern_options(kept_sdpa):
    """gqa_fold: SDPA on the kv heads (enable_gqa=True); aot (rest="inductor", cudagraphs): no
    saved-tensor hooks there, so the repeat stays and the plain SDPA is kept as before."""
    x = torch.randn(2, 7, 32)
    targets, rep, _ = _targets(LlamaAttention(), x, {"gqa_fold": True})
    assert sdpa_repeat_kv not in targets and F.scaled_dot_product_attention in targets, targets
    site, = [s for s in rep.sites if s.pattern == "sdpa"]
    assert "enable_gqa=True" in site.note, site.note

    targets, rep, _ = _targets(LlamaAttention(), x, {"aot": True})
    assert sdpa_repeat_kv not in targets and F.scaled_dot_product_attention in targets, targets
    assert [r for _, r in rep.skipped("sdpa")] == [kept_sdpa.KEPT_FUSED_SDPA], str(rep)
    assert not any(s.fused for s in rep.sites if s.pattern == "sdpa"), str(rep)


def test_pattern_rest_inductor(kept_sdpa):
    """End to end: tritonize(rest="inductor") passes the aot option, so the repeat stays."""
    rep = check_parity(LlamaAttention(), [torch.randn(2, 7, 32)], {"sdpa": 0}, atol=1e-5, rtol=1e-5,
                       rest="inductor")
    assert [r for _, r in rep.skipped("sdpa")] == [kept_sdpa.KEPT_FUSED_SDPA], str(rep)


def test_pattern_on_cpu_without_the_switch(monkeypatch):
    """Not kept (CPU fp32): our attention kernel, repeat folded, as before."""
    monkeypatch.setenv("TRITONIZE_SDPA", "auto")
    targets, rep, _ = _targets(LlamaAttention(), torch.randn(2, 7, 32), {})
    assert sdpa_repeat_kv not in targets and F.scaled_dot_product_attention not in targets, targets
    site, = [s for s in rep.sites if s.pattern == "sdpa"]
    assert "repeat_kv folded" in site.note, site.note


@pytest.mark.parametrize("gqa_fold", [False, None])
def test_pattern_dropout(kept_sdpa, gqa_fold):
    """Training with attention dropout: torch's SDPA draws the mask as in eager (same seed, same
    output and gradients), on the repeated heads (gqa_fold=False) and folded (the default)."""
    from tritonize import tritonize

    model = LlamaAttention(dropout=0.25).train()
    ref = copy.deepcopy(model)
    tritonize(model, gqa_fold=gqa_fold)
    x = torch.randn(2, 7, 32)
    outs = []
    for m in (model, ref):
        torch.manual_seed(7)
        xx = x.clone().requires_grad_()
        out = m(xx)
        out.pow(2).sum().backward()
        outs.append((out.detach(), xx.grad, m.k_proj.weight.grad, m.v_proj.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    site, = [s for s in tritonize.report(model).sites if s.pattern == "sdpa"]
    want = kept_sdpa.REPEAT_RECOMPUTED if gqa_fold is False else "enable_gqa=True"
    assert site.fused and want in site.note, site.note


def test_no_reference_cycle():
    """The saved output is packed detached: holding it with its grad_fn would be a cycle (output ->
    grad_fn -> packed output) that keeps the whole graph alive until a gc pass, if ever."""
    q, k, v = _leaves(*_qkv(2))
    out = sdpa_repeat_kv(q, k, v, 2, is_causal=True)
    ref = weakref.ref(out)
    gc.disable()
    try:
        del out
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("hkv,n_rep", [(3, 2), (1, 4), (2, 1)])
def test_repeat_kv_is_transformers(hkv, n_rep):
    x = torch.randn(B, T, hkv, D).transpose(1, 2)
    a, b = repeat_kv(x, n_rep), hf_repeat_kv(x, n_rep)
    assert torch.equal(a, b) and a.stride() == b.stride()
