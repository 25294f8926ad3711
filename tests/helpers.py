"""Comparison helpers for kernel tests (importable: `from tests.helpers import assert_close3`).

The rule (flash-attn's): compute three results — the kernel, torch in the same dtype, and a fp32
(or fp64) reference — and pass if  max|kernel - ref| <= 2 * max|torch - ref| + atol.
The kernel may be as far from the truth as twice what PyTorch itself is, in the same dtype.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])

# Floor of the tolerance, per dtype, before scaling by the reference's magnitude.
ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def dtypes_for(device: str) -> list[torch.dtype]:
    """fp32 and fp16 everywhere; bf16 on the GPU only (bf16 `tl.dot` is broken in the
    interpreter; element-wise kernels may add bf16 on CPU themselves)."""
    out = [torch.float32, torch.float16]
    if device == "cuda":
        out.append(torch.bfloat16)
    return out


def assert_close3(out, out_torch, out_ref, *, atol: float | None = None, name: str = "output"):
    """Three-way check. `out_ref` should be computed in fp32/fp64 from the same inputs upcast.

    atol defaults to ATOL[out.dtype] * max(1, max|ref|), so the floor scales with the values
    compared (gradients of large tensors are large).
    """
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(out_ref.shape)}"
    assert out_torch.shape == out_ref.shape, f"{name}: torch shape {tuple(out_torch.shape)} != {tuple(out_ref.shape)}"
    ref = out_ref.detach().double()
    got = out.detach().double()
    tor = out_torch.detach().double()
    if ref.numel() == 0:
        return
    # NaN/inf must appear exactly where the reference has them.
    ref_bad = ~torch.isfinite(ref)
    assert torch.equal(~torch.isfinite(got), ref_bad), f"{name}: non-finite values differ from the reference"
    ref, got, tor = ref[~ref_bad], got[~ref_bad], tor[~ref_bad]
    if ref.numel() == 0:
        return
    if atol is None:
        atol = ATOL[out.dtype] * max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    torch_err = (tor - ref).abs().max().item()
    assert err <= 2 * torch_err + atol, (
        f"{name}: max error {err:.3e} > 2 * torch's {torch_err:.3e} + atol {atol:.1e} (dtype {out.dtype})"
    )


def noncontig_rows(x: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """Same values as `x`, but each row padded in memory by `pad` elements (row stride > width): a
    strided view. The default 3 leaves the rows misaligned; pad=8 keeps 16-byte aligned fp16 rows."""
    pad = torch.empty(*x.shape[:-1], x.shape[-1] + pad, dtype=x.dtype, device=x.device)
    view = pad[..., : x.shape[-1]]
    view.copy_(x)
    assert not view.is_contiguous() or x.shape[-1] == 0 or x.numel() <= x.shape[-1]
    return view


def transposed_copy(x: torch.Tensor) -> torch.Tensor:
    """Same values as 2-D+ `x`, stored transposed in its last two dims (inner stride != 1)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def stride0_grad(y: torch.Tensor) -> torch.Tensor:
    """An upstream gradient expanded from a scalar, every stride 0 (what `y.sum().backward()` sends)."""
    return torch.full((), 0.5, dtype=y.dtype, device=y.device).expand_as(y)


# --- forward + every gradient, three ways (used by the norm tests) ---------------------------


def _leaf(t, prep=None):
    if t is None:
        return None
    t = t.detach()
    return (prep(t) if prep is not None else t.clone()).requires_grad_(True)


def strided_vec(t):
    """Same values as the 1-D `t`, stored every other element (a strided view)."""
    return torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2].copy_(t)


def check3(kernel_fn, ref_fn, ins: dict, *, prep_x=None, prep_w=None, grad_fn=None, names=("out",)):
    """Run kernel_fn on `ins` (x / weight possibly made non-contiguous by prep_x / prep_w), ref_fn
    on the same inputs in their dtype (torch) and in fp64 (reference); compare outputs and every
    gradient."""
    grad_fn = grad_fn or (lambda o: torch.randn_like(o))

    def run(fn, cast, prep):
        prep = prep or {}
        leaves = {k: _leaf(v.to(cast) if (cast and v is not None) else v, prep.get(k)) for k, v in ins.items()}
        outs = fn(**leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return leaves, outs

    k_in, k_out = run(kernel_fn, None, {"x": prep_x, "weight": prep_w})
    if prep_w is not None:
        assert not k_in["weight"].is_contiguous()
    t_in, t_out = run(ref_fn, None, None)
    r_in, r_out = run(ref_fn, torch.float64, None)
    dys = [grad_fn(o) for o in k_out]
    wrt = [k for k, v in ins.items() if v is not None]
    gk = torch.autograd.grad(k_out, [k_in[k] for k in wrt], dys)
    gt = torch.autograd.grad(t_out, [t_in[k] for k in wrt], [d.to(o.dtype) for d, o in zip(dys, t_out)])
    gr = torch.autograd.grad(r_out, [r_in[k] for k in wrt], [d.double() for d in dys])
    for name, a, b, c in zip(names, k_out, t_out, r_out):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != torch's {b.dtype}"
        assert_close3(a, b, c, name=name)
    for name, a, b, c in zip(wrt, gk, gt, gr):
        assert a.dtype == ins[name].dtype
        assert_close3(a, b, c, name=f"d{name}")
