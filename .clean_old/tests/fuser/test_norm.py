"""LayerNorm / RMSNorm and residual-add + norm: module, functional and hand-written spellings."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.fuser.common import check_parity


class HFRMSNorm(nn.Module):  # transformers' LlamaRMSNorm, verbatim
    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n) + 0.1 * torch.randn(n))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class Norms(nn.Module):
    def __init__(self, n=16):
        super().__init__()
        self.ln = nn.LayerNorm(n)
        self.ln2 = nn.LayerNorm(n)
        self.w = nn.Parameter(torch.randn(n))
        self.b = nn.Parameter(torch.randn(n))
        self.rms = HFRMSNorm(n)
        self.rms2 = HFRMSNorm(n)
        self.trms = nn.RMSNorm(n, eps=1e-5)

    def forward(self, x, r):
        a = self.ln(x)  # module form                                   -> layer_norm
        b = F.layer_norm(x * 2, (x.shape[-1],), self.w, self.b, 1e-5)  # functional -> layer_norm
        h = x + r  # residual add whose sum is used again               -> add_layer_norm
        c = self.ln2(h)
        d = self.rms(a)  # HF RMSNorm by hand                            -> rms_norm
        h2 = h + b  # residual + RMSNorm                                 -> add_rms_norm
        e = self.rms2(h2)
        f = self.trms(x - r)  # nn.RMSNorm (F.rms_norm)                  -> rms_norm
        g = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)  # not rsqrt: left alone
        return a + b + c + d + e + f + g, h, h2


def test_norm_spellings():
    x, r = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    check_parity(Norms(), [x, r], {"layer_norm": 2, "add_layer_norm": 1, "rms_norm": 2, "add_rms_norm": 1})


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)

    def forward(self, x, pos):
        h = x + pos  # (B, T, C) + (1, T, C): the add kernel needs equal shapes
        return self.ln(h), h


def test_broadcast_residual_falls_back_to_plain_norm():
    rep = check_parity(Broadcast(), [torch.randn(2, 3, 16), torch.randn(1, 3, 16)],
                       {"add_layer_norm": 0, "layer_norm": 1})
    (site, reason), = rep.skipped("add_layer_norm")
    assert "broadcast" in reason


def test_unsupported_dtype_norm_skipped():
    rep = check_parity(nn.LayerNorm(8).double(), [torch.randn(2, 8, dtype=torch.float64)], {"layer_norm": 0})
    assert "float64" in rep.skipped("layer_norm")[0][1]
