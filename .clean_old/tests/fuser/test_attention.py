"""Attention: every generated spelling family (scale mul/div/q, mask add/masked_fill/where, fp32
upcast, dropout, GQA repeat_kv), F.scaled_dot_product_attention, and the negatives."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.fuser.common import DEVICE, check_parity

B, H, HKV, T, D = 2, 4, 2, 8, 16


def repeat_kv(x, n_rep):  # transformers' repeat_kv
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class Spellings(nn.Module):
    def forward(self, q, k, v, kv_small, add_mask, bool_mask):
        outs = []
        s = torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(D))  # mul + additive mask (GPT-2/BERT)
        outs.append(torch.matmul(F.softmax(s + add_mask, dim=-1), v))
        s = q @ k.transpose(2, 3) / math.sqrt(D)  # div, no mask, method softmax
        outs.append(s.softmax(-1) @ v)
        s = torch.matmul(q * 0.25, k.transpose(-2, -1))  # scaled q, masked_fill(-inf)
        outs.append(torch.matmul(torch.softmax(s.masked_fill(~bool_mask, float("-inf")), -1), v))
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25  # where(finfo.min), fp32 upcast (Llama eager)
        s = torch.where(bool_mask, s, torch.finfo(torch.float32).min)
        outs.append(torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v))
        kr, vr = repeat_kv(kv_small, H // HKV), repeat_kv(kv_small * 2, H // HKV)  # GQA
        s = torch.matmul(q, kr.transpose(2, 3)) * 0.25 + add_mask
        outs.append(torch.matmul(F.softmax(s, dim=-1), vr))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True))  # SDPA forms
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, scale=0.3))
        outs.append(F.scaled_dot_product_attention(q, kv_small, kv_small, attn_mask=add_mask, enable_gqa=True))
        return torch.stack(outs)


def _inputs():
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    kv_small = torch.randn(B, HKV, T, D)
    bool_mask = torch.rand(B, 1, T, T) > 0.3
    bool_mask[..., 0] = True  # no fully masked row (eager gives NaN there)
    add_mask = torch.where(bool_mask, 0.0, torch.finfo(torch.float32).min)
    return [q, k, v, kv_small, add_mask, bool_mask]


def test_attention_spellings():
    rep = check_parity(Spellings(), _inputs(), {"attention": 5, "sdpa": 3}, atol=2e-4, rtol=2e-4,
                       no_grad_inputs=(4,))
    assert rep.skipped("attention") == [] and rep.skipped("sdpa") == []


class WithDropout(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
        return F.dropout(w, self.p, self.training) @ v


def test_attention_dropout_goes_into_the_kernel():
    from tritonize import tritonize

    m = tritonize(WithDropout(0.3).train())
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    out = m(q, k, v)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    rep = tritonize.report(m)
    assert rep.count("attention") == 1 and rep.count("dropout") == 0, str(rep)
    # eval: the dropout is an identity, removed before matching; exact parity
    check_parity(WithDropout(0.3).eval(), [q.detach(), k.detach(), v.detach()], {"attention": 1})


class ReturnsWeights(nn.Module):
    def forward(self, q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
        return w @ v, w  # the attention weights escape: not rewritten


def test_returned_attention_weights_are_not_fused():
    rep = check_parity(ReturnsWeights(), [torch.randn(B, H, T, D) for _ in range(3)], {"attention": 0})
    (site, reason), = rep.skipped("attention")
    assert "output" in reason


class FiniteFill(nn.Module):
    def forward(self, q, k, v, keep):
        s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~keep, -1e4)
        return torch.softmax(s, -1) @ v


def test_finite_fill_is_declined_with_reason():
    keep = torch.rand(B, 1, T, T) > 0.5
    rep = check_parity(FiniteFill(), [*(torch.randn(B, H, T, D) for _ in range(3)), keep], {"attention": 0})
    assert "fill" in rep.skipped("attention")[0][1]


@pytest.mark.parametrize("dtype", [torch.float64])
def test_unsupported_dtype_attention(dtype):
    rep = check_parity(ReturnsWeights(), [torch.randn(B, H, T, D, dtype=dtype) for _ in range(3)], {"attention": 0})
    assert rep.skipped("attention")


def test_fused_sdpa_kept_by_default_on_cuda(monkeypatch):
    """TRITONIZE_SDPA=auto (the default outside the tests): a CUDA half-precision SDPA without a
    mask tensor already runs cuDNN/flash and is kept, with the reason in the report; a masked
    SDPA is still replaced. On CPU (no fused SDPA kernel of ours to lose to) it is replaced."""
    from tritonize import tritonize
    from tritonize.patterns.attention import KEPT_FUSED_SDPA

    monkeypatch.setenv("TRITONIZE_SDPA", "auto")

    class Two(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True) + \
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dt) for _ in range(3))
    mask = torch.rand(T, T, device=dev) > 0.3
    mask[:, 0] = True
    m = Two()
    ref = m(q, k, v, mask)
    tritonize(m)
    torch.testing.assert_close(m(q, k, v, mask), ref, atol=2e-2, rtol=2e-2)
    rep = tritonize.report(m)
    if dev == "cuda":
        assert rep.count("sdpa") == 1 and [r for _, r in rep.skipped("sdpa")] == [KEPT_FUSED_SDPA], str(rep)
    else:
        assert rep.count("sdpa") == 2 and rep.skipped("sdpa") == [], str(rep)
    monkeypatch.setenv("TRITONIZE_SDPA", "sometimes")
    with pytest.warns(UserWarning, match="TRITONIZE_SDPA must be"):  # a bad value: graph left as is, said why
        tritonize(Two())(q, k, v, mask)


class SdpaOfRepeatedKV(nn.Module):
    """transformers' GQA spelling whenever it passes a mask: repeat_kv(k), repeat_kv(v) -> SDPA."""

    def forward(self, q, k_small, v_small, mask):
        n = H // HKV
        a = F.scaled_dot_product_attention(q, repeat_kv(k_small, n), repeat_kv(v_small, n), is_causal=True)
        b = F.scaled_dot_product_attention(q, repeat_kv(k_small, n), repeat_kv(v_small, n), attn_mask=mask)
        return a + b


def test_sdpa_of_repeated_kv(monkeypatch):
    """Calls that go to our kernel take the kv heads as they are (the repeat_kv copies go; the
    masked call everywhere, both on CPU). Torch's kept fused SDPA (CUDA half, causal) keeps the
    repeat (sdpa_repeat_kv: the copies are not saved for backward) unless gqa_fold=True, which
    calls it with enable_gqa=True. Forward and the gradients of q and of the small k, v (the
    repeat's backward sums over the copies) match eager each time."""
    from tritonize.patterns.attention import REPEAT_RECOMPUTED

    monkeypatch.setenv("TRITONIZE_SDPA", "auto")
    dt = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(B, H, T, D, dtype=dt)
    k_small, v_small = torch.randn(B, HKV, T, D, dtype=dt), torch.randn(B, HKV, T, D, dtype=dt)
    mask = torch.rand(T, T) > 0.3
    mask[:, 0] = True
    tol = 2e-2 if dt == torch.bfloat16 else 2e-4
    # None: the default, which folds in rest="eager" (measured faster, api.py)
    for gqa_fold in (False, True, None):
        rep = check_parity(SdpaOfRepeatedKV(), [q, k_small, v_small, mask], None, atol=tol, rtol=tol,
                           gqa_fold=gqa_fold)
        notes = [s.note for s in rep.sites if s.pattern == "sdpa" and s.fused]
        gqa_fold = True if gqa_fold is None else gqa_fold
        kept_repeat = DEVICE == "cuda" and not gqa_fold
        assert rep.count("sdpa") == 2 and rep.skipped("sdpa") == [], str(rep)
        assert sum(REPEAT_RECOMPUTED in n for n in notes) == int(kept_repeat), str(rep)
        assert all("repeat_kv folded" in n for n in notes if REPEAT_RECOMPUTED not in n), str(rep)
        assert any("enable_gqa=True" in n for n in notes) == (DEVICE == "cuda" and gqa_fold), str(rep)


class MaskBuiltInGraph(nn.Module):
    """A mask computed from constants in the forward, as transformers does under Dynamo with
    torch <= 2.13 (it materialises the causal mask while tracing instead of passing is_causal)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, pad):
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        keep = i[None, :] <= i[:, None]  # key j visible to query i iff j <= i
        if self.kind == "window":
            keep = keep & (i[None, :] > i[:, None] - 3)  # sliding window: not causal
        if self.kind == "padded":
            keep = keep[None, None] & pad[:, None, None, :]  # depends on an input: not provable
        elif self.kind == "additive":
            keep = torch.zeros(t, t, device=q.device).masked_fill(~keep, torch.finfo(torch.float32).min)
        mask = keep.expand(q.shape[0], 1, t, t) if keep.dim() == 2 else keep
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["causal", "additive", "window", "padded"])
def test_constant_causal_mask_becomes_is_causal(kind):
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :2] = False
    rep = check_parity(MaskBuiltInGraph(kind), [q, k, v, pad], {"sdpa": 1}, atol=2e-4, rtol=2e-4)
    site, = [s for s in rep.sites if s.pattern == "sdpa"]
    proven = "proven causal" in site.note
    assert proven == (kind in ("causal", "additive")), (kind, site.note)


def test_constant_causal_mask_construction_is_dropped():
    from tritonize.fuser.capture import transform
    from tritonize.fuser.report import Report
    from tritonize.patterns import all_patterns

    seen = {}

    def backend(gm, ex):
        transform(gm, Report("t"), all_patterns())
        seen["targets"] = [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        return gm.forward

    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    out = torch.compile(MaskBuiltInGraph("causal"), backend=backend)(q, k, v, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-4, rtol=2e-4)
    assert not any("arange" in t or "expand" in t for t in seen["targets"]), seen["targets"]
