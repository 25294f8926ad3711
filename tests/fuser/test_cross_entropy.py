"""Cross-entropy (F.cross_entropy, log_softmax + nll_loss, fp32 upcast, options) and the fused
LM head linear -> cross-entropy when the logits are dead; skipped with a reason when returned."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.fuser.common import check_parity

V = 24


class Losses(nn.Module):
    def forward(self, logits, target, logits16):
        a = F.cross_entropy(logits, target)
        b = F.cross_entropy(logits * 2, target, ignore_index=3, reduction="sum", label_smoothing=0.1)
        c = F.nll_loss(F.log_softmax(logits - 1, dim=-1), target)
        d = F.nll_loss(torch.log_softmax(logits16, -1, dtype=torch.float32), target, reduction="none")
        return a, b, c, d


def test_cross_entropy_spellings():
    n = 10
    target = torch.randint(0, V, (n,))
    target[2] = 3
    rep = check_parity(Losses(), [torch.randn(n, V), target, torch.randn(n, V).half()], {"cross_entropy": 4},
                       atol=2e-3, rtol=2e-3)
    assert rep.skipped("cross_entropy") == []


class LMHead(nn.Module):
    def __init__(self, return_logits):
        super().__init__()
        self.lm_head = nn.Linear(16, V, bias=False)
        self.return_logits = return_logits

    def forward(self, h, labels):
        logits = self.lm_head(h)
        # transformers' ForCausalLMLoss: upcast, shift, flatten
        shift_logits = logits.float()
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = F.cross_entropy(shift_logits.view(-1, V), labels.reshape(-1), ignore_index=-100)
        return (loss, logits) if self.return_logits else loss


def test_linear_cross_entropy_when_logits_are_dead():
    h, labels = torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))
    rep = check_parity(LMHead(False), [h, labels], {"linear_cross_entropy": 1, "cross_entropy": 0})
    assert rep.fused("linear_cross_entropy") == ["lm_head"]


def test_returned_logits_keep_plain_cross_entropy():
    h, labels = torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))
    rep = check_parity(LMHead(True), [h, labels], {"linear_cross_entropy": 0, "cross_entropy": 1})
    (site, reason), = rep.skipped("linear_cross_entropy")
    assert "output" in reason


def test_class_weights_declined():
    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.rand(V))

        def forward(self, x, t):
            return F.cross_entropy(x, t, weight=self.w)

    rep = check_parity(Weighted(), [torch.randn(6, V), torch.randint(0, V, (6,))], {"cross_entropy": 0})
    assert "weight" in rep.skipped("cross_entropy")[0][1]
