"""gated_mlp: the whole gated MLP, down projection included, with the product recomputed in
backward instead of saved. Forward and the gradients of x, w_gate, w_up, w_down vs an fp64
reference (three-way rule), awkward shapes, strided inputs, stride-0 upstream gradient."""

import importlib

import pytest
import torch

from tests.helpers import dtypes_for, noncontig_rows, stride0_grad
from tests.kernels.test_linear_act import GATED, _check, _make
from tritonize.kernels.linear_act import gated_linear, gated_mlp, gated_mlp_reference

la = importlib.import_module("tritonize.kernels.linear_act")
NAMES = ["x", "w_gate", "w_up", "w_down"]


def _w_down(d, n, dtype, device):
    return (torch.randn(d, n, device=device) / n**0.5).to(dtype)


@pytest.mark.parametrize("shape_x,n,d", [((1, 17), 33, 21), ((2, 19, 17), 33, 21)])
def test_gated_mlp(device, shape_x, n, d):
    """SwiGLU and both GeGLUs, every dtype; M = 1 and a prime M (38 rows); K, N, D odd."""
    for dtype in dtypes_for(device):
        for act in GATED:
            x, (wg, wu), _ = _make(shape_x, n, dtype, device, bias=False, n_w=2)
            wd = _w_down(d, n, dtype, device)
            dy = torch.randn(*shape_x[:-1], d, device=device).to(dtype)
            _check(lambda x, a, b, c: gated_mlp(x, a, b, c, act), lambda x, a, b, c: gated_mlp_reference(x, a, b, c, act),
                   [x, wg, wu, wd], dy, NAMES, f"gated_mlp {act} {dtype} {shape_x}")  # fmt: skip


def test_gated_mlp_strided_and_stride0(device):
    """Row-padded x, a transposed w_down view, and dY expanded from a scalar (every stride 0)."""
    dtype = dtypes_for(device)[-1]
    x, (wg, wu), _ = _make((3, 5, 17), 33, dtype, device, bias=False, n_w=2)
    wd_t = _w_down(21, 33, dtype, device).t().contiguous().t()  # (D, N) view of an (N, D) buffer
    xi = noncontig_rows(x)
    dy = torch.randn(3, 5, 21, device=device).to(dtype)
    _check(lambda x, a, b, c: gated_mlp(x, a, b, c), lambda x, a, b, c: gated_mlp_reference(x, a, b, c),
           [xi, wg, wu, wd_t], dy, NAMES, "gated_mlp strided")  # fmt: skip
    dy0 = stride0_grad(torch.empty(3, 5, 21, device=device, dtype=dtype))
    _check(lambda x, a, b, c: gated_mlp(x, a, b, c, "gelu"), lambda x, a, b, c: gated_mlp_reference(x, a, b, c, "gelu"),
           [x, wg, wu, wd_t], dy0, NAMES, "gated_mlp stride0")  # fmt: skip


def test_gated_mlp_saves_no_product(device):
    """What autograd holds for backward: G and U (M x N each) but not the product, where
    gated_linear + F.linear holds all three. Same output and gradients as that composition."""
    x, (wg, wu), _ = _make((6, 17), 33, torch.float32, device, bias=False, n_w=2)
    wd = _w_down(21, 33, torch.float32, device)

    def saved_mn(fn):
        shapes = []
        leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = fn(*leaves)
        y.square().sum().backward()
        return sum(s == (6, 33) for s in shapes), y.detach(), [t.grad for t in leaves]

    n_ours, y, grads = saved_mn(lambda x, a, b, c: gated_mlp(x, a, b, c))
    n_comp, y_c, grads_c = saved_mn(lambda x, a, b, c: torch.nn.functional.linear(gated_linear(x, a, b), c))
    assert (n_ours, n_comp) == (2, 3)
    torch.testing.assert_close(y, y_c, rtol=1e-5, atol=1e-5)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(g, gc, rtol=1e-4, atol=1e-4)


def test_gated_mlp_partial_grads_inference_and_empty(device):
    """Only w_down trainable; only x; no grad (nothing saved, same output); a second backward
    raises (G, U were overwritten); empty rows."""
    x, (wg, wu), _ = _make((4, 17), 33, torch.float32, device, bias=False, n_w=2)
    wd = _w_down(21, 33, torch.float32, device)
    ref = [t.double() for t in (x, wg, wu, wd)]
    for trainable in (3, 0):
        ours = [t.clone().requires_grad_(i == trainable) for i, t in enumerate((x, wg, wu, wd))]
        theirs = [t.clone().requires_grad_(i == trainable) for i, t in enumerate(ref)]
        gated_mlp(*ours).sum().backward()
        gated_mlp_reference(*theirs).sum().backward()
        torch.testing.assert_close(ours[trainable].grad, theirs[trainable].grad.float(), rtol=1e-4, atol=1e-4)
        assert all(t.grad is None for i, t in enumerate(ours) if i != trainable)
    with torch.no_grad():
        torch.testing.assert_close(gated_mlp(x.requires_grad_(), wg, wu, wd), gated_mlp_reference(x, wg, wu, wd),
                                   rtol=1e-4, atol=1e-4)
    x.requires_grad_(False)
    y = gated_mlp(x.clone().requires_grad_(), wg, wu, wd)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    assert gated_mlp(torch.empty(2, 0, 17, device=device), wg, wu, wd).shape == (2, 0, 21)


def test_gated_mlp_reference_path_and_compile(device, monkeypatch):
    """The custom ops under torch.compile (fake impls, in-place dG/dU), and their plain-torch
    path (devices Triton does not run on), against the fp64 reference."""
    x, (wg, wu), _ = _make((2, 3, 17), 33, torch.float32, device, bias=False, n_w=2)
    wd = _w_down(21, 33, torch.float32, device)
    cf = torch.compile(lambda *a: gated_mlp(*a, "silu"), backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
    out = cf(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref = [t.double().requires_grad_() for t in (x, wg, wu, wd)]
    out_r = gated_mlp_reference(*ref)
    grads_r = torch.autograd.grad(out_r.square().sum(), ref)
    torch.testing.assert_close(out, out_r.float(), rtol=1e-4, atol=1e-4)
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g, gr.float(), rtol=1e-3, atol=1e-3)
    monkeypatch.setattr(la, "use_triton", lambda t: False)
    dy = torch.randn(2, 3, 21, device=device)
    _check(lambda x, a, b, c: gated_mlp(x, a, b, c, "gelu_tanh"),
           lambda x, a, b, c: gated_mlp_reference(x, a, b, c, "gelu_tanh"), [x, wg, wu, wd], dy, NAMES,
           "gated_mlp reference path")  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="awkward larger shape: GPU only (interpreter too slow)")
def test_gated_mlp_larger_awkward_shape_cuda():
    """1823 x 781 -> 1023 -> 517, every dtype."""
    for dtype in dtypes_for("cuda"):
        x, (wg, wu), _ = _make((1823, 781), 1023, dtype, "cuda", bias=False, n_w=2)
        wd = _w_down(517, 1023, dtype, "cuda")
        dy = torch.randn(1823, 517, device="cuda").to(dtype)
        _check(lambda x, a, b, c: gated_mlp(x, a, b, c), lambda x, a, b, c: gated_mlp_reference(x, a, b, c),
               [x, wg, wu, wd], dy, NAMES, f"large gated_mlp {dtype}")  # fmt: skip


def test_gated_mlp_bad_arguments(device):
    x = torch.randn(4, 17, device=device)
    w = torch.randn(33, 17, device=device)
    with pytest.raises(ValueError, match=r"tritonize\.gated_mlp: argument 'w_down' must be 2-D \(D, N\) with N = "):
        gated_mlp(x, w, w, torch.randn(21, 32, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.gated_mlp: argument 'w_down' has dtype torch.float16"):
        gated_mlp(x, w, w, torch.randn(21, 33, device=device).half())
    with pytest.raises(TypeError, match=r"tritonize\.gated_mlp: argument 'w_down'"):
        gated_mlp(x, w, w, [[1.0]])
    with pytest.raises(ValueError, match=r"tritonize\.gated_mlp: argument 'w_up' has shape \(32, 17\)"):
        gated_mlp(x, w, torch.randn(32, 17, device=device), torch.randn(21, 33, device=device))
    with pytest.raises(ValueError, match=r"tritonize\.gated_mlp: argument 'activation'"):
        gated_mlp(x, w, w, torch.randn(21, 33, device=device), activation="swish")


@pytest.mark.parametrize("impl", ["triton", "cublas"])
def test_gated_mlp_both_forward_impls(device, monkeypatch, impl):
    """The fused Triton forward (small calls) and cuBLAS + element-wise (large calls, Llama's)."""
    monkeypatch.setattr(la, "FORWARD_IMPL", impl)
    dtype = torch.float16
    x, (wg, wu), _ = _make((9, 24), 40, dtype, device, bias=False, n_w=2)
    wd = _w_down(19, 40, dtype, device)
    dy = torch.randn(9, 19, device=device).to(dtype)
    _check(lambda x, a, b, c: gated_mlp(x, a, b, c), lambda x, a, b, c: gated_mlp_reference(x, a, b, c),
           [x, wg, wu, wd], dy, NAMES, f"gated_mlp fwd={impl}")  # fmt: skip
