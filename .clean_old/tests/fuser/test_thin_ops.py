"""rest="inductor": after AOTAutograd, the compiled graphs call each op's thin twin
(`tritonize_fast::`, no custom-op dispatch layers), also the ops that write into an argument
(inside auto_functionalized); forward and every gradient still equal eager."""

import torch
import torch.nn as nn

import tritonize.fuser.thin_ops as thin_ops
from tests.fuser.common import check_parity


class Block(nn.Module):
    """LayerNorm -> Linear+GELU (linear_act: its backward writes into the saved pre-activation)
    -> Linear -> residual add + LayerNorm."""

    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(16)
        self.up = nn.Linear(16, 40)
        self.act = nn.GELU()
        self.down = nn.Linear(40, 16)
        self.ln2 = nn.LayerNorm(16)

    def forward(self, x):
        h = self.down(self.act(self.up(self.ln1(x))))
        return self.ln2(h + x)


def test_inductor_graphs_call_the_thin_ops(monkeypatch):
    seen = []
    real = thin_ops.retarget

    def spy(gm):
        n = real(gm)
        seen.append((n, {str(node.target) for node in gm.graph.nodes if node.op == "call_function"}))
        return n

    monkeypatch.setattr(thin_ops, "retarget", spy)
    # linear_act named explicitly: rest="inductor" leaves it to Inductor by default (next test)
    rep = check_parity(Block(), [torch.randn(3, 5, 16)], {"linear_act": 1}, atol=1e-4, rtol=1e-4, rest="inductor",
                       patterns=["linear_act", "norm"])
    assert rep.count("layer_norm") + rep.count("add_layer_norm") == 2
    assert len(seen) == 2, "expected a forward and a backward graph"
    for n, targets in seen:
        assert n > 0
        assert not any(t.startswith("tritonize.") for t in targets), targets  # every call retargeted
    fwd, bwd = (t for _, t in seen)
    assert any("tritonize_fast.linear_act_fwd" in t for t in fwd), fwd
    # linear_act's backward mutates its 'pre' argument: retargeted inside auto_functionalized
    assert any("auto_functionalized" in t for t in bwd), bwd


def test_thin_op_twin_has_the_schema_and_runs_the_function():
    import tritonize.kernels  # noqa: F401 - registers the ops

    op = torch.ops.tritonize.layer_norm_fwd.default
    twin = thin_ops.thin_op(op)
    assert twin is not None and str(twin._schema).split("::", 1)[1] == str(op._schema).split("::", 1)[1]
    assert thin_ops.thin_op(torch.ops.aten.add.Tensor) is None
    x, w, b = torch.randn(4, 24), torch.randn(24), torch.randn(24)
    for got, want in zip(twin(x, None, w, b, 1e-5), op(x, None, w, b, 1e-5)):
        torch.testing.assert_close(got, want)


def test_inductor_rest_leaves_plain_linear_act_and_norms_to_inductor_and_says_why():
    rep = check_parity(Block(), [torch.randn(3, 5, 16)], {"linear_act": 0, "layer_norm": 0, "add_layer_norm": 0},
                       atol=1e-4, rtol=1e-4, rest="inductor")
    for name in ("linear_act", "layer_norm"):
        skipped = rep.skipped(name)
        assert skipped and all("left to Inductor" in reason and "patterns=" in reason for _, reason in skipped), \
            (name, skipped)
    # naming a family keeps it: the norms fuse again, linear_act stays with Inductor
    rep = check_parity(Block(), [torch.randn(3, 5, 16)], {"linear_act": 0}, atol=1e-4, rtol=1e-4, rest="inductor",
                       patterns=["norm"])
    assert rep.count("layer_norm") + rep.count("add_layer_norm") == 2
