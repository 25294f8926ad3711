"""Dropout: fused in training (module and functional forms), an identity in eval."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.fuser.common import check_parity
from tritonize import tritonize


class Drops(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        return self.drop(x) + F.dropout(x * 2, 0.5, self.training)


def test_dropout_training_fused_and_consistent():
    m = tritonize(Drops().train())
    x = torch.randn(64, 33, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert tritonize.report(m).count("dropout") == 2
    # each dropout output is 0 or x / (1 - p); the gradient matches the forward mask
    a = m.drop(x.detach())  # eager call of the submodule for the statistics below
    assert a.shape == x.shape
    torch.manual_seed(1)
    single = tritonize(nn.Dropout(0.25).train())
    xs = torch.randn(4096, requires_grad=True)
    ys = single(xs)
    kept = ys != 0
    torch.testing.assert_close(ys[kept], xs[kept] / 0.75)
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    ys.sum().backward()
    torch.testing.assert_close(xs.grad, kept.float() / 0.75)


def test_dropout_eval_is_identity():
    check_parity(Drops().eval(), [torch.randn(8, 8)], {"dropout": 0})
