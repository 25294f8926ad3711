"""linear -> activation and the gated MLP: module, functional and method spellings, HF activation
modules and Conv1D, negatives (escaping pre-activation, unsupported dtype)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.fuser.common import check_parity


class Spellings(nn.Module):
    """Eleven linear->act sites, each a different spelling."""

    def __init__(self):
        super().__init__()
        from transformers.activations import NewGELUActivation, QuickGELUActivation
        from transformers.pytorch_utils import Conv1D

        self.lins = nn.ModuleList([nn.Linear(8, 12) for _ in range(10)])
        self.mods = nn.ModuleList([nn.GELU(), nn.GELU("tanh"), nn.ReLU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh(),
                                   NewGELUActivation(), QuickGELUActivation()])
        self.conv1d = Conv1D(12, 8)  # GPT-2's (in, out) weight, an addmm between two views
        self.act = NewGELUActivation()

    def forward(self, x):
        outs = [mod(lin(x)) for lin, mod in zip(self.lins, self.mods)]  # module form (8 activations)
        outs.append(F.gelu(self.lins[8](x), approximate="tanh"))  # functional form
        outs.append(self.lins[9](x).sigmoid())  # method form
        outs.append(self.act(self.conv1d(x)))  # Conv1D + NewGELU
        return torch.cat(outs, -1)


def test_linear_act_spellings():
    x = torch.randn(2, 5, 8)
    rep = check_parity(Spellings(), [x], {"linear_act": 11})
    assert rep.skipped("linear_act") == []


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 16, bias=False)
        self.up = nn.Linear(8, 16, bias=False)
        self.gate2 = nn.Linear(8, 16, bias=False)
        self.up2 = nn.Linear(8, 16, bias=False)
        self.act = nn.SiLU()

    def forward(self, x):
        a = self.act(self.gate(x)) * self.up(x)  # Llama's SwiGLU
        b = self.up2(x) * F.gelu(self.gate2(x), approximate="tanh")  # GeGLU, operands swapped
        return a + b


def test_gated_mlp():
    rep = check_parity(Gated(), [torch.randn(3, 8)], {"gated_mlp": 2, "linear_act": 0})
    assert rep.skipped("gated_mlp") == []


class Escapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        z = self.lin(x)
        return F.relu(z), z  # the pre-activation escapes: cannot fuse


def test_escaping_preactivation_is_not_fused():
    rep = check_parity(Escapes(), [torch.randn(4, 8)], {"linear_act": 0})
    (site, reason), = rep.skipped("linear_act")
    assert "also used by" in reason and "output" in reason


def test_unsupported_dtype_is_skipped_with_reason():
    m = nn.Sequential(nn.Linear(8, 8), nn.GELU()).double()
    rep = check_parity(m, [torch.randn(4, 8, dtype=torch.float64)], {"linear_act": 0})
    (site, reason), = rep.skipped("linear_act")
    assert "float64" in reason


class GatedWithDown(nn.Module):
    """Llama's MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)); `keep_product` also returns the
    product (the down projection's input), which then cannot be left unsaved."""

    def __init__(self, keep_product=False):
        super().__init__()
        self.gate_proj = nn.Linear(8, 16, bias=False)
        self.up_proj = nn.Linear(8, 16, bias=False)
        self.down_proj = nn.Linear(16, 8, bias=False)
        self.act_fn = nn.SiLU()
        self.keep_product = keep_product

    def forward(self, x):
        p = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        y = self.down_proj(p)
        return (y, p) if self.keep_product else y


def test_gated_mlp_with_down_projection():
    """The whole MLP becomes one gated_mlp call (noted in the report); forward and every
    gradient equal eager. When the product escapes, gated_linear + the plain down linear."""
    rep = check_parity(GatedWithDown(), [torch.randn(2, 3, 8)], {"gated_mlp": 1, "linear_act": 0})
    (site,) = [s for s in rep.sites if s.pattern == "gated_mlp" and s.fused]
    assert "down projection fused" in site.note, str(rep)
    rep = check_parity(GatedWithDown(keep_product=True), [torch.randn(2, 3, 8)], {"gated_mlp": 1})
    assert not any("down projection fused" in (s.note or "") for s in rep.sites if s.fused), str(rep)
