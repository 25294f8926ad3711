"""Rotary embeddings (rotate-half) -> rotary_embedding: HF's spelling as a q/k pair, commuted
spellings, a tensor rotated alone, partial rotary, declines; the DynamicCache cat fold."""

import pytest
import torch
import torch.nn as nn

from tests.fuser.common import check_parity
from tritonize import tritonize


def rotate_half(x):  # transformers' Llama, verbatim
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # transformers' Llama, verbatim
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def cos_sin(T, D, B=2):
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.arange(T).float()[None, :, None].expand(B, T, 1)
    emb = torch.cat((pos * inv, pos * inv), dim=-1)
    return emb.cos(), emb.sin()


class Attn(nn.Module):
    """q, k, v projections, transformers' rotary on q and k (GQA: fewer kv heads), scores."""

    def __init__(self, d=32, h=4, hk=2, hd=8):
        super().__init__()
        self.h, self.hk, self.hd = h, hk, hd
        self.q = nn.Linear(d, h * hd, bias=False)
        self.k = nn.Linear(d, hk * hd, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.hk, self.hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q.sum(1) @ k.sum(1).transpose(-1, -2), k


def test_hf_rotary_pair_fused_one_call():
    cos, sin = cos_sin(5, 8)
    rep = check_parity(Attn(), [torch.randn(2, 5, 32), cos, sin], {"rotary_qk": 1, "rotary": 0},
                       no_grad_inputs=(1, 2))
    assert not rep.skipped("rotary") and not rep.skipped("rotary_qk"), str(rep)


def test_rotary_cos_sin_gradients():
    # cos/sin requiring grad (a learned table): their gradients are compared too
    cos, sin = cos_sin(5, 8)
    check_parity(Attn(), [torch.randn(2, 5, 32), cos, sin], {"rotary_qk": 1})


class Spellings(nn.Module):
    """Commuted spellings, torch.neg / x.neg(), a positive cat dim, torch.concat; each rotates one
    tensor (single form)."""

    def forward(self, x, cos, sin):
        h = x.shape[-1] // 2
        a = cos * x + sin * torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        y = x * 2
        b = torch.cat([torch.neg(y[..., h:]), y[..., :h]], 3) * sin + y * cos
        z = x + 1
        c = sin * torch.concat((z[..., h:].neg(), z[..., :h]), -1) + cos * z
        return a, b, c


def test_rotary_spellings_single():
    x = torch.randn(2, 3, 5, 8)
    cos, sin = cos_sin(5, 8)
    rep = check_parity(Spellings(), [x, cos[:, None], sin[:, None]], {"rotary": 3}, no_grad_inputs=(1, 2))
    assert rep.count("rotary_qk") == 0


class Partial(nn.Module):
    """GPT-NeoX / Phi partial rotary: the first `rot` features rotated, the rest passed through."""

    def forward(self, q, cos, sin):
        rot = cos.shape[-1]
        q_rot, q_pass = q[..., :rot], q[..., rot:]
        q_rot = q_rot * cos + rotate_half(q_rot) * sin
        return torch.cat((q_rot, q_pass), dim=-1)


def test_partial_rotary():
    cos, sin = cos_sin(5, 6)
    check_parity(Partial(), [torch.randn(2, 3, 5, 16), cos[:, None], sin[:, None]], {"rotary": 1},
                 no_grad_inputs=(1, 2))


class NotHalves(nn.Module):
    def forward(self, x, cos, sin):
        # a rotation by thirds is not the rotate-half convention: left alone, and the report says why
        return x * cos + torch.cat((-x[..., 2:], x[..., :2]), dim=-1) * sin


def test_not_halves_declined():
    x = torch.randn(2, 3, 6)
    rep = check_parity(NotHalves(), [x, torch.randn(6), torch.randn(6)], {"rotary": 0}, no_grad_inputs=(1, 2))
    (site, reason), = rep.skipped("rotary")
    assert "half" in reason


def test_unsupported_dtype_declined():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    cos, sin = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    rep = check_parity(Spellings(), [x[:, None], cos, sin], {"rotary": 0}, no_grad_inputs=(1, 2))
    assert all("float64" in reason for _, reason in rep.skipped("rotary")), str(rep)


def test_rotary_left_to_inductor():
    pytest.importorskip("torch._inductor")
    model = Attn()
    cos, sin = cos_sin(5, 8)
    tritonize(model, rest="inductor")
    model(torch.randn(2, 5, 32), cos, sin)
    rep = tritonize.report(model)
    assert rep.count("rotary_qk") == 0 and "Inductor" in rep.skipped("rotary_qk")[0][1], str(rep)


class Cache(nn.Module):
    """transformers' DynamicCache on its first update: cat of a fresh empty tensor and the keys."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(8, 8)

    def forward(self, x):
        k = self.k(x)
        empty = torch.tensor([], dtype=k.dtype, device=k.device)
        keys = torch.cat([empty, k], dim=-2)
        return keys * 2, keys


def test_cache_cat_of_empty_folded(monkeypatch):
    import tritonize.fuser.capture as capture

    graphs = []
    transform = capture.transform
    monkeypatch.setattr(capture, "transform", lambda gm, *a, **k: graphs.append(transform(gm, *a, **k)) or graphs[-1])
    x = torch.randn(2, 3, 8)
    check_parity(Cache(), [x])  # values and gradients as eager
    (gm,) = graphs
    assert not [n for n in gm.graph.nodes if n.target is torch.cat], gm.code
    assert not [n for n in gm.graph.nodes if n.target is torch.tensor], gm.code


class CacheWritten(Cache):
    def forward(self, x):
        k = self.k(x)
        keys = torch.cat([torch.tensor([], dtype=k.dtype, device=k.device), k], dim=-2)
        keys.mul_(2)  # written in place: folding would write k, so the cat stays
        return keys, k


def test_cache_cat_written_in_place_kept(monkeypatch):
    import tritonize.fuser.capture as capture

    graphs = []
    transform = capture.transform
    monkeypatch.setattr(capture, "transform", lambda gm, *a, **k: graphs.append(transform(gm, *a, **k)) or graphs[-1])
    check_parity(CacheWritten(), [torch.randn(2, 3, 8)])
    (gm,) = graphs
    assert [n for n in gm.graph.nodes if n.target is torch.cat], gm.code
