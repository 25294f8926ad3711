"""Shared helpers for the fuser tests: tritonize a copy, compare forward and backward with eager."""

from __future__ import annotations

import copy

import torch

from tritonize import tritonize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flat(o)]
    if hasattr(out, "to_tuple"):
        return _flat(out.to_tuple())
    return []


def check_parity(model, inputs, expect=None, *, atol=1e-4, rtol=1e-4, backward=True, no_grad_inputs=(), **options):
    """Tritonize `model`, run it and a deep copy (eager) on the same inputs, compare outputs and
    the gradients of the parameters and of float inputs; check report counts `expect`
    ({pattern: fused count}). Returns the report."""
    model = model.to(DEVICE)
    ref = copy.deepcopy(model)
    tritonize(model, **options)
    ins = [x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in inputs]
    def prep(i, x):
        if not isinstance(x, torch.Tensor):
            return x
        return x.detach().clone().requires_grad_(x.is_floating_point() and backward and i not in no_grad_inputs)

    ins_a = [prep(i, x) for i, x in enumerate(ins)]
    ins_b = [prep(i, x) for i, x in enumerate(ins)]
    out = _flat(model(*ins_a))
    out_ref = _flat(ref(*ins_b))
    assert len(out) == len(out_ref)
    for a, b in zip(out, out_ref):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    if backward:
        la = sum((o.float() * (i + 1)).sum() for i, o in enumerate(out) if o.requires_grad)
        lb = sum((o.float() * (i + 1)).sum() for i, o in enumerate(out_ref) if o.requires_grad)
        la.backward()
        lb.backward()
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, atol=atol, rtol=rtol, msg=lambda m: f"grad of {n}: {m}")
        for a, b in zip(ins_a, ins_b):
            if isinstance(a, torch.Tensor) and a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=rtol)
    rep = tritonize.report(model)
    for name, n in (expect or {}).items():
        assert rep.count(name) == n, f"{name}: expected {n} fused, report:\n{rep}"
    return rep
