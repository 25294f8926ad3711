"""Cross-entropy (F.cross_entropy, log_softmax + nll_loss, fp32 upcast, options) and the fused
LM head linear -> cross-entropy, whether the logits are dead or returned (then the plain linear
stays for them and the loss is computed beside it), in every order of cast and flatten."""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.fuser.common import DEVICE, check_parity
from tritonize import tritonize

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
    def __init__(self, return_logits, spelling="hf", prenorm=False):
        super().__init__()
        self.norm = nn.LayerNorm(16) if prenorm else None
        self.lm_head = nn.Linear(16, V, bias=False)
        self.return_logits = return_logits
        self.spelling = spelling

    def forward(self, h, labels):
        if self.norm is not None:  # the head's input is then a rewritten node (our layer_norm)
            h = self.norm(h)
        logits = self.lm_head(h)
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        if self.spelling == "hf":  # transformers' ForCausalLMLoss: upcast, shift the labels, flatten
            flat = logits.float().view(-1, V)
        elif self.spelling == "flatten_then_float":
            flat = logits.flatten(0, 1).float()
        else:  # torch.flatten, no cast
            flat = torch.flatten(logits, end_dim=-2)
        loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100)
        return (loss, logits) if self.return_logits else loss


@pytest.mark.parametrize("spelling", ["hf", "flatten_then_float", "torch.flatten"])
def test_linear_cross_entropy_when_logits_are_dead(spelling):
    h, labels = torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))
    rep = check_parity(LMHead(False, spelling), [h, labels], {"linear_cross_entropy": 1, "cross_entropy": 0})
    assert rep.fused("linear_cross_entropy") == ["lm_head"]


def test_returned_logits_still_fuse_the_loss():
    """HF causal LMs return the logits with the loss: one fused call (linear_cross_entropy_with_logits)
    writes the returned logits and forms the loss, so the LM head's matmul runs once.
    check_parity backprops loss + 2 * logits.sum(), so gradients through both paths are checked;
    then the loss alone."""
    h, labels = torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))
    labels[0, 2] = -100
    rep = check_parity(LMHead(True), [h, labels], {"linear_cross_entropy": 1, "cross_entropy": 0},
                       defer_logits=False)
    assert rep.fused("linear_cross_entropy") == ["lm_head"] and rep.skipped() == []
    site, = [s for s in rep.sites if s.pattern == "linear_cross_entropy"]
    assert "one matmul pass" in site.note and "one matmul pass" in str(rep)
    # the loss alone: grads to hidden and weight from linear_cross_entropy only
    model = LMHead(True).to(DEVICE)
    ref = copy.deepcopy(model)
    tritonize(model, defer_logits=False)
    h, labels = h.to(DEVICE), labels.to(DEVICE)
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    (la, za), (lb, zb) = model(ha, labels), ref(hb, labels)
    torch.testing.assert_close(za, zb)
    if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # kernels run: the one-pass Function
        assert "LinearCrossEntropyLogitsFn" in type(za.grad_fn).__name__, type(za.grad_fn).__name__
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ha.grad, hb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, atol=1e-5, rtol=1e-4)


def test_returned_logits_deferred_by_default():
    """Default (rest="eager", training): the returned logits are a DeferredLogits, computed on first
    read; the loss comes from the lean fused LM head + loss. Checked: values and every gradient
    against eager with loss + 2 * logits.sum() (check_parity), a loss-only step that never computes
    the logits, logits read before optimizer.step() equal to eager's, and a read after it raising."""
    from tritonize.kernels.deferred_logits import DeferredLogits

    h, labels = torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))
    labels[1, 3] = -100
    rep = check_parity(LMHead(True, prenorm=True), [h, labels], {"linear_cross_entropy": 1, "layer_norm": 1})
    site, = [s for s in rep.sites if s.pattern == "linear_cross_entropy"]
    assert "logits deferred" in site.note, site.note
    model = LMHead(True).to(DEVICE)
    ref = copy.deepcopy(model)
    tritonize(model)
    h, labels = h.to(DEVICE), labels.to(DEVICE)
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    (la, za), (lb, zb) = model(ha, labels), ref(hb, labels)
    assert type(za) is DeferredLogits and not za.is_materialized
    la.backward()
    lb.backward()
    assert not za.is_materialized  # the loss-only step never computed the (N, V) logits
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ha.grad, hb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    # read before the optimizer step: eager's values; read after it: a clear error
    za2 = model(ha, labels)[1]
    torch.testing.assert_close(za.argmax(-1), zb.argmax(-1))
    torch.testing.assert_close(za, zb)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    with pytest.raises(RuntimeError, match="deferred"):
        za2.argmax(-1)  # the first read
    # opting out returns plain logits
    plain = LMHead(True).to(DEVICE)
    tritonize(plain, defer_logits=False)
    assert type(plain(ha, labels)[1]) is torch.Tensor
    with pytest.raises(ValueError, match="defer_logits"):
        tritonize(LMHead(True), rest="inductor", defer_logits=True)
    with pytest.raises(TypeError, match="defer_logits"):
        tritonize(LMHead(True), defer_logits="yes")


def test_returned_logits_gradient_outside_the_compiled_graph():
    """rest="inductor" (AOTAutograd): the returned logits leave the compiled graph detached and get
    F.linear's gradient back outside it, so a step that differentiates only the loss runs no
    (N, V)-deep backward matmul on AOTAutograd's materialised zero gradient. Both uses stay exact:
    the loss alone, and loss + 2 * logits.sum() (check_parity)."""
    h, labels = torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))
    labels[1, 1] = -100
    rep = check_parity(LMHead(True, prenorm=True), [h, labels], {"linear_cross_entropy": 1, "layer_norm": 1},
                       rest="inductor", patterns=("norm", "linear_cross_entropy"))  # norms: left to Inductor unless named
    site, = [s for s in rep.sites if s.pattern == "linear_cross_entropy"]
    assert "outside the compiled graph" in site.note, site.note
    model = LMHead(True).to(DEVICE)
    ref = copy.deepcopy(model)
    tritonize(model, rest="inductor")
    h, labels = h.to(DEVICE), labels.to(DEVICE)
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    (la, za), (lb, zb) = model(ha, labels), ref(hb, labels)
    assert type(za.grad_fn).__name__ == "_ReturnedLogitsGradBackward", type(za.grad_fn).__name__
    torch.testing.assert_close(za, zb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ha.grad, hb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    # the logits alone (a distillation-style second loss), with a bias on the head
    model = LMHead(True).to(DEVICE)
    model.lm_head.bias = nn.Parameter(torch.randn(V, device=DEVICE))
    ref = copy.deepcopy(model)
    tritonize(model, rest="inductor")
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    (_, za), (_, zb) = model(ha, labels), ref(hb, labels)
    (za.float() ** 2).sum().backward()
    (zb.float() ** 2).sum().backward()
    torch.testing.assert_close(ha.grad, hb.grad, atol=1e-4, rtol=1e-4)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


def test_drop_logits_in_training_keeps_them_in_eval():
    """tritonize(drop_logits=True): in training mode the returned logits are an empty tensor (the
    loss and every gradient unchanged); in eval mode the same model returns full logits (the entry
    guards on model.training, so the training graph is not reused)."""
    model = LMHead(True).to(DEVICE)
    ref = copy.deepcopy(model)
    tritonize(model, drop_logits=True)
    h, labels = torch.randn(2, 5, 16, device=DEVICE), torch.randint(0, V, (2, 5), device=DEVICE)
    labels[1, 3] = -100
    ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
    (la, za), (lb, zb) = model(ha, labels), ref(hb, labels)
    assert za.numel() == 0 and zb.shape == (2, 5, V)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ha.grad, hb.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    assert "logits dropped" in str(tritonize.report(model))
    model.eval()
    ref.eval()
    with torch.no_grad():
        (le, ze), (lr, zr) = model(h, labels), ref(h, labels)
    torch.testing.assert_close(ze, zr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(le, lr, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="drop_logits"):
        tritonize(LMHead(True), drop_logits="yes")


def test_class_weights_declined():
    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.rand(V))

        def forward(self, x, t):
            return F.cross_entropy(x, t, weight=self.w)

    rep = check_parity(Weighted(), [torch.randn(6, V), torch.randint(0, V, (6,))], {"cross_entropy": 0})
    assert "weight" in rep.skipped("cross_entropy")[0][1]


def test_returned_logits_under_autocast_keep_eager_dtype():
    """Under autocast the LM head's logits come out in the autocast dtype: the one-pass form
    (which returns hidden's dtype) is not used, the plain linear stays for them."""
    if DEVICE != "cpu":
        pytest.skip("CPU autocast case")
    model = LMHead(True)
    ref = copy.deepcopy(model)
    tritonize(model)
    h, labels = torch.randn(2, 5, 16), torch.randint(0, V, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (la, za), (lb, zb) = model(h, labels), ref(h, labels)
    assert za.dtype == zb.dtype == torch.bfloat16
    torch.testing.assert_close(za, zb)
    torch.testing.assert_close(la, lb, atol=2e-2, rtol=2e-2)
