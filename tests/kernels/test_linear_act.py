"""linear_act and gated_linear: forward and every gradient vs an fp64 reference (three-way rule).

On CPU the kernels run in Triton's interpreter (fp32, fp16); on a GPU the same tests add bf16.
"""

import importlib
import math

import pytest
import torch

from tests.helpers import assert_close3, dtypes_for, noncontig_rows, stride0_grad
from tritonize.kernels._activations import ACTIVATIONS
from tritonize.kernels.linear_act import gated_linear, gated_linear_reference, linear_act, linear_act_reference

# the module itself (for the ablation switches): `import tritonize.kernels.linear_act as la` would
# give the public function of the same name, which the package's lazy exports put in its place
la = importlib.import_module("tritonize.kernels.linear_act")

GATED = ["silu", "gelu", "gelu_tanh"]  # SwiGLU, GeGLU (erf), GeGLU (tanh)


def _make(shape_x, n, dtype, device, bias=True, n_w=1):
    k = shape_x[-1]
    x = torch.randn(*shape_x, device=device).to(dtype)
    # scale so the pre-activation is ~N(0, 2^2): every activation is exercised in its curved part
    ws = [(torch.randn(n, k, device=device) * (2.0 / math.sqrt(k))).to(dtype) for _ in range(n_w)]
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, ws, b


def _grads(fn, inputs, dy):
    # detach (not clone): a strided input stays strided (clone would make a padded view dense)
    leaves = [t.detach().requires_grad_() for t in inputs if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in inputs]
    y = fn(*args)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def _check(fn, ref_fn, inputs, dy, names, tag):
    """Kernel vs torch (same dtype) vs fp64 reference, for the output and each input's gradient."""
    out, g = _grads(fn, inputs, dy)
    out_t, g_t = _grads(ref_fn, inputs, dy)
    dbl = [t.double() if t is not None else None for t in inputs]
    out_r, g_r = _grads(ref_fn, dbl, dy.double())
    assert out.dtype == inputs[0].dtype
    assert_close3(out, out_t, out_r, name=f"{tag} out")
    for name, a, t, r in zip(names, g, g_t, g_r):
        assert a is not None, f"{tag}: no gradient for {name}"
        assert a.dtype == t.dtype
        assert_close3(a, t, r, name=f"{tag} d{name}")


@pytest.mark.parametrize("shape_x,n", [((1, 17), 33), ((2, 19, 17), 33)])
def test_linear_act_every_activation(device, shape_x, n):
    """Forward, dX, dW, db for every activation and dtype; M=1 and a prime M (38 rows: 2x19)."""
    for dtype in dtypes_for(device):
        for act in ACTIVATIONS:
            x, (w,), b = _make(shape_x, n, dtype, device)
            dy = torch.randn(*shape_x[:-1], n, device=device).to(dtype)
            _check(
                lambda x, w, b: linear_act(x, w, b, act),
                lambda x, w, b: linear_act_reference(x, w, b, act),
                [x, w, b], dy, ["x", "weight", "bias"], f"{act} {dtype} {shape_x}",
            )  # fmt: skip


def test_linear_act_backward_column_strips(device, monkeypatch):
    """The element-wise backward's grid of column strips, each program walking several row blocks
    and keeping db's partial sums in registers: tiles of 4x16 and 1 program per "SM" give 3 column
    blocks (the last partial) x 2 row groups of 10 row blocks, the last partial; a stride-0 upstream
    gradient; activations whose gradient comes from the output (sigmoid, relu)."""
    monkeypatch.setattr(la, "_EW_BWD", {False: (4, 16, 1, 1), True: (4, 16, 1, 1)})
    for dtype in dtypes_for(device):
        for act, (shape_x, n), prep in (("gelu_tanh", ((37, 17), 33), None), ("sigmoid", ((2, 19, 17), 40), None),
                                        ("relu", ((37, 17), 33), "stride0")):
            x, (w,), b = _make(shape_x, n, dtype, device)
            dy = torch.randn(*shape_x[:-1], n, device=device).to(dtype)
            if prep == "stride0":
                dy = dy[..., :1].expand_as(dy)
            _check(
                lambda x, w, b: linear_act(x, w, b, act),
                lambda x, w, b: linear_act_reference(x, w, b, act),
                [x, w, b], dy, ["x", "weight", "bias"], f"strips {act} {dtype} {shape_x} {prep}",
            )  # fmt: skip


def test_linear_act_bias_grad_finished_in_kernel(device, monkeypatch):
    """db is summed by each column strip's last program (a ticket counter per strip): right
    against the fp64 reference and bit-identical on a rerun, with the partial rows added one per
    step and 16 per step (N=33: 3 strips x 2 row groups). The counters are kept across calls on
    the default stream (CPU: always): each launch leaves them at zero for the next, through calls
    of other shapes that reuse the same buffers."""
    monkeypatch.setattr(la, "_EW_BWD", {False: (4, 16, 1, 1), True: (4, 16, 1, 1)})
    monkeypatch.setattr(la, "_DB_SCRATCH", {})
    for red_rows in (1, 16):
        monkeypatch.setattr(la, "_EW_RED_ROWS", red_rows)
        for dtype in dtypes_for(device):
            x, (w,), b = _make((37, 17), 33, dtype, device)
            dy = torch.randn(37, 33, device=device).to(dtype)
            fn = lambda x, w, b: linear_act(x, w, b, "gelu_tanh")  # noqa: E731
            _check(fn, lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"), [x, w, b], dy,
                   ["x", "weight", "bias"], f"db in kernel {dtype} red_rows={red_rows}")  # fmt: skip
            _, (_, _, db1) = _grads(fn, [x, w, b], dy)
            _, (_, _, db2) = _grads(fn, [x, w, b], dy)
            assert torch.equal(db1, db2), "db differs between two identical calls"
    if device == "cpu" or la._raw_stream(torch.device(device).index or 0) == 0:
        (partials, counters), = la._DB_SCRATCH.values()
        assert counters.numel() == 3 and not counters.any(), counters  # kept, and left at zero
        # another shape through the same buffers (more strips: the counters grow, zeroed), then
        # the first shape again: still right
        for xs, n in [((9, 17), 72), ((37, 17), 33)]:
            x, (w,), b = _make(xs, n, torch.float32, device)
            dy = torch.randn(xs[0], n, device=device)
            _check(lambda x, w, b: linear_act(x, w, b, "gelu_tanh"), lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"),
                   [x, w, b], dy, ["x", "weight", "bias"], f"db with kept counters {xs} {n}")  # fmt: skip
        (partials, counters), = la._DB_SCRATCH.values()
        assert counters.numel() == 5 and not counters.any(), counters


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """Same values and strides as contiguous `t`, at an address that is not 16-byte aligned."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16
    return view


def test_backward_fast_path_matches_general(device, monkeypatch):
    """The eager backward's common case (contiguous, 16-byte aligned dY: _linear_act_bwd_fast, one
    bound launch per problem) against the general launcher, which takes a row-padded dY and a dY
    at an unaligned address: bit-identical gradients, for a saved Z (gelu_tanh, bias) and a saved
    Y (relu, no bias, 3-D x; sigmoid with a bias), fast path counted; the fast path's own numerics
    against the fp64 reference."""
    monkeypatch.setattr(la, "_BWD_PLANS", {})
    calls = []
    fast = la._linear_act_bwd_fast
    monkeypatch.setattr(la, "_linear_act_bwd_fast", lambda *a: calls.append(1) or fast(*a))
    for act, shape_x, bias in (("gelu_tanh", (37, 17), True), ("relu", (2, 19, 17), False), ("sigmoid", (37, 17), True)):
        for dtype in dtypes_for(device):
            x, (w,), b = _make(shape_x, 40, dtype, device, bias=bias)
            dy = torch.randn(*shape_x[:-1], 40, device=device).to(dtype)
            fn = lambda x, w, b: linear_act(x, w, b, act)  # noqa: E731
            calls.clear()
            _check(fn, lambda x, w, b: linear_act_reference(x, w, b, act), [x, w, b], dy,
                   ["x", "weight", "bias"][: 3 if bias else 2], f"fast path {act} {dtype}")  # fmt: skip
            assert calls, f"{act} {dtype}: the contiguous dY did not take the fast path"
            _, g_fast = _grads(fn, [x, w, b], dy)
            for tag, other in (("row-padded dY", noncontig_rows(dy)), ("unaligned dY", _misaligned(dy))):
                calls.clear()
                _, g_gen = _grads(fn, [x, w, b], other)
                assert not calls, f"{act} {dtype} {tag}: took the fast path"
                for name, a, c in zip(["x", "weight", "bias"], g_fast, g_gen):
                    assert torch.equal(a, c), f"{act} {dtype} {tag}: d{name} differs from the fast path's"
    assert len(la._BWD_PLANS) == 3 * len(dtypes_for(device))  # one plan per (problem, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams: GPU only")
def test_bias_grad_on_a_side_stream():
    """Off the default stream the db counters are a fresh zeroed buffer per call (not the kept
    ones): right results on a side stream, and the kept buffers are not touched."""
    la._DB_SCRATCH.clear()
    x, (w,), b = _make((37, 24), 40, torch.float16, "cuda")
    dy = torch.randn(37, 40, device="cuda").to(torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _check(lambda x, w, b: linear_act(x, w, b, "gelu_tanh"), lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"),
               [x, w, b], dy, ["x", "weight", "bias"], "db on a side stream")  # fmt: skip
    torch.cuda.current_stream().wait_stream(s)
    assert not la._DB_SCRATCH


@pytest.mark.parametrize("shape_x,n", [((1, 17), 33), ((37, 17), 33)])
def test_gated_linear(device, shape_x, n):
    """SwiGLU and both GeGLUs: forward, dX, dW_gate, dW_up."""
    for dtype in dtypes_for(device):
        for act in GATED:
            x, (wg, wu), _ = _make(shape_x, n, dtype, device, bias=False, n_w=2)
            dy = torch.randn(*shape_x[:-1], n, device=device).to(dtype)
            _check(
                lambda x, wg, wu: gated_linear(x, wg, wu, act),
                lambda x, wg, wu: gated_linear_reference(x, wg, wu, act),
                [x, wg, wu], dy, ["x", "w_gate", "w_up"], f"gated {act} {dtype}",
            )  # fmt: skip


def test_strided_inputs_and_stride0_grad(device):
    """Row-padded x, transposed (column-major) x and weight views, no bias, and a stride-0 dY."""
    dtype = dtypes_for(device)[-1]
    x, (w, wg, wu), _ = _make((3, 5, 17), 33, dtype, device, bias=False, n_w=3)
    xs = [noncontig_rows(x), x.transpose(0, 1).contiguous().transpose(0, 1)]  # leading dims not mergeable
    x_cm = x.reshape(15, 17).t().contiguous().t()  # 2-D, inner stride != 1
    w_t = w.t().contiguous().t()  # (N, K) view of a (K, N) buffer: read through strides
    for xi in [*xs, x_cm]:
        assert not xi.is_contiguous()
        dy = torch.randn(*xi.shape[:-1], 33, device=device).to(dtype)
        _check(lambda x, w: linear_act(x, w, None, "gelu_tanh"), lambda x, w: linear_act_reference(x, w, None, "gelu_tanh"),
               [xi, w_t], dy, ["x", "weight"], f"strided x {tuple(xi.stride())}")  # fmt: skip
        _check(lambda x, a, b: gated_linear(x, a, b), lambda x, a, b: gated_linear_reference(x, a, b),
               [xi, wg.t().contiguous().t(), wu], dy, ["x", "w_gate", "w_up"], "gated strided")  # fmt: skip
    # dY expanded from a scalar (every stride 0), as y.sum().backward() sends it
    for act in ["gelu", "relu", "none"]:
        dy = stride0_grad(torch.empty(3, 5, 33, device=device, dtype=dtype))
        _check(lambda x, w, b: linear_act(x, w, b, act), lambda x, w, b: linear_act_reference(x, w, b, act),
               [x, w, torch.randn(33, device=device).to(dtype)], dy, ["x", "weight", "bias"], f"stride0 {act}")  # fmt: skip
    dy = stride0_grad(torch.empty(3, 5, 33, device=device, dtype=dtype))
    _check(lambda x, a, b: gated_linear(x, a, b, "gelu"), lambda x, a, b: gated_linear_reference(x, a, b, "gelu"),
           [x, wg, wu], dy, ["x", "w_gate", "w_up"], "gated stride0")  # fmt: skip


def test_partial_grads_1d_and_empty(device):
    """Frozen weight / frozen x (only the needed GEMMs run), 1-D x, and empty tensors."""
    dtype = torch.float32
    x, (w, wg, wu), b = _make((4, 17), 33, dtype, device, n_w=3)
    # frozen weight and bias: only dX
    xr = x.clone().requires_grad_()
    linear_act(xr, w, b, "silu").sum().backward()
    xd = x.double().requires_grad_()
    linear_act_reference(xd, w.double(), b.double(), "silu").sum().backward()
    torch.testing.assert_close(xr.grad, xd.grad.float(), rtol=1e-4, atol=1e-4)
    # frozen x: only dW (and db)
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    linear_act(x, wr, br, "gelu").sum().backward()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    linear_act_reference(x.double(), wd, bd, "gelu").sum().backward()
    torch.testing.assert_close(wr.grad, wd.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(br.grad, bd.grad.float(), rtol=1e-4, atol=1e-4)
    wgr = wg.clone().requires_grad_()
    gated_linear(x, wgr, wu).sum().backward()  # only w_gate needs a gradient
    wgd = wg.double().requires_grad_()
    gated_linear_reference(x.double(), wgd, wu.double()).sum().backward()
    torch.testing.assert_close(wgr.grad, wgd.grad.float(), rtol=1e-4, atol=1e-4)
    # inference: nothing saved (the epilogue skips Z / G, U), same output
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        torch.testing.assert_close(linear_act(xg, w, b, "gelu"), linear_act_reference(x, w, b, "gelu"), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gated_linear(xg, wg, wu), gated_linear_reference(x, wg, wu), rtol=1e-4, atol=1e-4)
    # dZ / dG, dU overwrite the saved tensors: a second backward through the graph must raise,
    # not silently reuse them
    for fn in [lambda x: linear_act(x, w, b, "gelu"), lambda x: gated_linear(x, wg, wu)]:
        y = fn(x.clone().requires_grad_())
        y.sum().backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    # 1-D x: (K,) -> (N,)
    y1 = linear_act(x[0], w, b, "tanh")
    assert y1.shape == (33,)
    torch.testing.assert_close(y1, linear_act_reference(x[0], w, b, "tanh"), rtol=1e-4, atol=1e-4)
    # empty: no rows, and no output features; gradients still flow (as zeros)
    xe = torch.empty(0, 17, device=device, requires_grad=True)
    we = w.clone().requires_grad_()
    ye = linear_act(xe, we, None, "gelu")
    assert ye.shape == (0, 33)
    ye.sum().backward()
    assert we.grad.shape == w.shape and not we.grad.any()
    assert gated_linear(torch.empty(2, 0, 17, device=device), wg, wu).shape == (2, 0, 33)
    assert linear_act(x, w[:0], b[:0], "relu").shape == (4, 0)


def test_ablation_paths(device, monkeypatch):
    """The recompute backward (SAVE_PRE=False), the cuBLAS+element-wise forward and the TMA forward
    are correct too."""
    dtype = torch.float16
    x, (w, wg, wu), b = _make((9, 17), 33, dtype, device, n_w=3)
    dy = torch.randn(9, 33, device=device).to(dtype)
    for save_pre, fwd in [(False, "triton"), (True, "cublas")]:
        monkeypatch.setattr(la, "SAVE_PRE", save_pre)
        monkeypatch.setattr(la, "FORWARD_IMPL", fwd)
        _check(lambda x, w, b: linear_act(x, w, b, "gelu_tanh"), lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"),
               [x, w, b], dy, ["x", "weight", "bias"], f"save_pre={save_pre} fwd={fwd}")  # fmt: skip
    _check(lambda x, a, b: gated_linear(x, a, b), lambda x, a, b: gated_linear_reference(x, a, b),
           [x, wg, wu], dy, ["x", "w_gate", "w_up"], "gated cublas fwd")  # fmt: skip
    # "auto" (the default): fused Triton forward for small calls, cuBLAS + element-wise for large
    monkeypatch.setattr(la, "FORWARD_IMPL", "auto")
    assert la._forward_impl(9, 33, 17, 1) == la._forward_impl(64, 768, 3072, 1) == "triton"  # tiny, decode-sized
    assert la._forward_impl(8192, 3072, 768, 1) == "persistent"  # GPT-2 MLP at 8192 tokens
    # ... unless cuBLASLt has the epilogue: GPT-2's gelu_tanh (and relu); not silu / erf gelu / gated
    assert la._forward_impl(8192, 3072, 768, 1, "gelu_tanh") == la._forward_impl(8192, 3072, 768, 1, "relu") == "cublaslt"
    assert la._forward_impl(8192, 3072, 768, 1, "silu") == la._forward_impl(8192, 3072, 768, 1, "gelu") == "persistent"
    assert la._forward_impl(9, 33, 17, 1, "gelu_tanh") == "triton"
    assert la._forward_impl(8192, 8192, 2048, 2, "gelu_tanh") == "cublas"
    assert la._forward_impl(8192, 14336, 4096, 1) == "cublas"  # one product beyond the measured range
    assert la._forward_impl(8192, 8192, 2048, 2) == la._forward_impl(8192, 14336, 4096, 2) == "cublas"  # Llama
    # TMA forward: needs 16-byte aligned rows (K=24 in fp16), tails in M, N and K (K=24 is not a
    # multiple of the interpreter's BLOCK_K=16: the descriptor zero-fills); K=17 falls back
    monkeypatch.setattr(la, "SAVE_PRE", True)
    monkeypatch.setattr(la, "FORWARD_IMPL", "tma")
    assert la.TensorDescriptor is None or la._tma_ok(torch.empty(9, 24, device=device, dtype=dtype))
    assert not la._tma_ok(x.view(9, 17))
    for xs, n in [((9, 24), 40), ((9, 17), 33)]:
        x, (w, wg, wu), b = _make(xs, n, dtype, device, n_w=3)
        dy = torch.randn(xs[0], n, device=device).to(dtype)
        _check(lambda x, w, b: linear_act(x, w, b, "gelu_tanh"), lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"),
               [x, w, b], dy, ["x", "weight", "bias"], f"tma fwd {xs}")  # fmt: skip
        _check(lambda x, a, b: gated_linear(x, a, b), lambda x, a, b: gated_linear_reference(x, a, b),
               [x, wg, wu], dy, ["x", "w_gate", "w_up"], f"gated tma fwd {xs}")  # fmt: skip


def test_persistent_forward(device, monkeypatch):
    """The persistent fused forward (device-built TMA descriptors, two half-width epilogue
    subtiles): tails in M, N and K, M=1, with and without bias, with and without Z stored (no
    grad), every activation; x and W it cannot take (K=17: rows not 16-byte aligned; fp32; a
    transposed W) fall back to the cuBLAS forward, still right."""
    monkeypatch.setattr(la, "FORWARD_IMPL", "persistent")
    dtype = torch.float16
    for xs, n, bias in [((37, 24), 40, True), ((1, 16), 8, False), ((2, 35, 40), 72, True)]:
        x, (w,), b = _make(xs, n, dtype, device, bias=bias)
        assert la._persistent_ok(x.reshape(-1, xs[-1]), w)
        dy = torch.randn(*xs[:-1], n, device=device).to(dtype)
        for act in (["gelu_tanh", "silu", "relu", "none"] if bias else ["gelu"]):
            _check(lambda x, w, b: linear_act(x, w, b, act), lambda x, w, b: linear_act_reference(x, w, b, act),
                   [x, w, b], dy, ["x", "weight", "bias"] if bias else ["x", "weight"], f"persistent {act} {xs}")  # fmt: skip
        with torch.no_grad():  # inference: Z not stored
            torch.testing.assert_close(linear_act(x, w, b, "gelu_tanh").float(),
                                       linear_act_reference(x, w, b, "gelu_tanh", upcast=True), atol=2e-2, rtol=2e-2)
    x, (w,), b = _make((9, 17), 33, dtype, device)
    assert not la._persistent_ok(x, w)
    assert not la._persistent_ok(x.float()[:, :16], w.float()[:, :16])
    assert not la._persistent_ok(x[:, :16], w.t().contiguous().t()[:, :16])
    dy = torch.randn(9, 33, device=device).to(dtype)
    _check(lambda x, w, b: linear_act(x, w, b, "gelu_tanh"), lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"),
           [x, w, b], dy, ["x", "weight", "bias"], "persistent falls back (K=17)")  # fmt: skip


def test_cublaslt_forward_falls_back(device, monkeypatch):
    """FORWARD_IMPL="cublaslt" where cuBLASLt's epilogue cannot take the call (CPU tensors, fp32,
    K=17 rows not 16-byte aligned, silu: no such epilogue) runs the forward "auto" would otherwise
    pick, and is right."""
    monkeypatch.setattr(la, "FORWARD_IMPL", "cublaslt")
    lt = importlib.import_module("tritonize.kernels._cublaslt")
    for dtype in dtypes_for(device):
        for xs, n, act in [((9, 17), 33, "gelu_tanh"), ((9, 24), 40, "silu")]:
            x, (w,), b = _make(xs, n, dtype, device)
            if device == "cpu" or dtype == torch.float32 or xs[-1] == 17 or act == "silu":
                assert lt.linear_act_epilogue(x, w, b, act, True) is None
            dy = torch.randn(xs[0], n, device=device).to(dtype)
            _check(lambda x, w, b: linear_act(x, w, b, act), lambda x, w, b: linear_act_reference(x, w, b, act),
                   [x, w, b], dy, ["x", "weight", "bias"], f"cublaslt fallback {act} {dtype} {xs}")  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt: GPU only")
def test_cublaslt_epilogue_cuda(monkeypatch):
    """cuBLASLt's bias + GELU(tanh) / ReLU epilogue (kernels/_cublaslt.py): it is taken (not a silent
    fallback), Z comes back as the aux output, forward and every gradient pass the three-way rule
    (tails, M=1, no bias, a 3-D x, without grad); and its GELU is the tanh form, not erf."""
    lt = importlib.import_module("tritonize.kernels._cublaslt")
    monkeypatch.setattr(la, "FORWARD_IMPL", "cublaslt")
    for dtype in (torch.float16, torch.bfloat16):
        for xs, n, bias in [((37, 24), 40, True), ((1, 16), 8, False), ((3, 35, 40), 72, True)]:
            x, (w,), b = _make(xs, n, dtype, "cuda", bias=bias)
            x2 = x.reshape(-1, xs[-1])
            for act in ("gelu_tanh", "relu"):
                store = act == "gelu_tanh"
                out = lt.linear_act_epilogue(x2, w, b, act, store)
                assert out is not None, f"cuBLASLt did not take {act} {dtype} {xs}"
                if store:
                    torch.testing.assert_close(out[1], torch.nn.functional.linear(x2, w, b), atol=2e-2, rtol=2e-2)
                dy = torch.randn(*xs[:-1], n, device="cuda").to(dtype)
                names = ["x", "weight", "bias"] if bias else ["x", "weight"]
                _check(lambda x, w, b: linear_act(x, w, b, act), lambda x, w, b: linear_act_reference(x, w, b, act),
                       [x, w, b], dy, names, f"cublaslt {act} {dtype} {xs}")  # fmt: skip
                with torch.no_grad():  # no Z stored: the epilogue without aux
                    assert_close3(linear_act(x, w, b, act), linear_act_reference(x, w, b, act),
                                  linear_act_reference(x.double(), w.double(), b.double() if bias else None, act),
                                  name=f"cublaslt no-grad {act} {dtype} {xs}")
    # tanh, not erf: where GELU's output is small (z in [-3, -0.5]) fp16 resolves 1e-5, and the two
    # forms differ by ~1e-4
    x = torch.randn(4096, 64, device="cuda", dtype=torch.float16)
    w = (torch.randn(256, 64, device="cuda") / 4).to(torch.float16)
    y, _ = lt.linear_act_epilogue(x, w, None, "gelu_tanh", False)
    z = x.float() @ w.float().t()
    sel = (z > -3) & (z < -0.5)
    err_tanh = (y.float() - torch.nn.functional.gelu(z, approximate="tanh"))[sel].abs().mean()
    err_erf = (y.float() - torch.nn.functional.gelu(z))[sel].abs().mean()
    assert err_tanh * 3 < err_erf, (err_tanh, err_erf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt: GPU only")
def test_cublaslt_pointers_follow_each_call():
    """The epilogue's plan (descriptor) is kept per problem, so each call's bias / aux (Z) pointers
    must reach it however the descriptor is updated (every call, or only on a change): calls
    alternating two biases, and Z buffers the allocator reuses or not (the previous Z kept alive or
    freed), each get their own bias and their own Z."""
    lt = importlib.import_module("tritonize.kernels._cublaslt")
    x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(48, 32, device="cuda", dtype=torch.bfloat16) / 4
    biases = [torch.randn(48, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    kept = []
    for i in range(6):
        b = biases[i % 2]
        y, z = lt.linear_act_epilogue(x, w, b, "gelu_tanh", True)
        ref_z = torch.nn.functional.linear(x.float(), w.float(), b.float())
        torch.testing.assert_close(z.float(), ref_z, atol=3e-2, rtol=2e-2, msg=f"call {i}: Z")
        torch.testing.assert_close(y.float(), torch.nn.functional.gelu(ref_z, approximate="tanh"), atol=3e-2, rtol=2e-2,
                                   msg=f"call {i}: Y")  # fmt: skip
        if i < 3:
            kept.append(z)  # the next call's Z cannot take this block
        y2, _ = lt.linear_act_epilogue(x, w, None, "relu", False)  # another plan between them
        torch.testing.assert_close(y2.float(), torch.relu(x.float() @ w.float().t()), atol=3e-2, rtol=2e-2)
    assert len({z.data_ptr() for z in kept}) == 3


def test_strided_and_expanded_bias(device, monkeypatch):
    """A bias that is a strided view (every other element of a longer vector) or expanded from one
    element (stride 0) is read through its stride by every forward (fused Triton, TMA,
    persistent, cuBLAS) and by the recompute backward; db comes back with the bias's shape."""
    dtype = torch.float16
    x, (w,), _ = _make((9, 24), 40, dtype, device)
    dy = torch.randn(9, 40, device=device).to(dtype)
    for bias in (torch.randn(80, device=device).to(dtype)[::2], torch.randn(1, device=device).to(dtype).expand(40)):
        assert bias.stride(0) != 1
        for fwd, save_pre in [("triton", True), ("tma", True), ("persistent", True), ("cublas", True), ("cublaslt", True),
                              ("triton", False)]:
            monkeypatch.setattr(la, "FORWARD_IMPL", fwd)
            monkeypatch.setattr(la, "SAVE_PRE", save_pre)
            _check(lambda x, w, b: linear_act(x, w, b, "gelu_tanh"), lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"),
                   [x, w, bias], dy, ["x", "weight", "bias"], f"bias stride {bias.stride(0)} fwd={fwd} save={save_pre}")  # fmt: skip


def test_reference_path_of_the_ops(device, monkeypatch):
    """The custom ops' plain-torch path (CPU without the interpreter) gives the same gradients."""
    monkeypatch.setattr(la, "use_triton", lambda t: False)
    x, (w, wg, wu), b = _make((2, 5, 17), 33, torch.float32, device, n_w=3)
    dy = torch.randn(2, 5, 33, device=device)
    for act in ["gelu_tanh", "relu", "none", "quick_gelu"]:
        _check(lambda x, w, b: linear_act(x, w, b, act), lambda x, w, b: linear_act_reference(x, w, b, act),
               [x, w, b], dy, ["x", "weight", "bias"], f"reference path {act}")  # fmt: skip
    _check(lambda x, a, b: gated_linear(x, a, b, "gelu"), lambda x, a, b: gated_linear_reference(x, a, b, "gelu"),
           [x, wg, wu], dy, ["x", "w_gate", "w_up"], "reference path gated")  # fmt: skip


def test_torch_compile_opaque(device):
    """The custom ops trace through Dynamo/AOTAutograd (fake impls, in-place dZ in backward)."""
    x, (w,), b = _make((2, 3, 17), 33, torch.float32, device)
    _, (wg, wu), _ = _make((1, 33), 20, torch.float32, device, n_w=2)
    wd = torch.randn(20, 20, device=device) / 5

    def f(x, w, b, wg, wu):
        return gated_linear(linear_act(x, w, b, "gelu_tanh"), wg, wu, "silu") @ wd

    def f_ref(x, w, b, wg, wu):
        return gated_linear_reference(linear_act_reference(x, w, b, "gelu_tanh"), wg, wu, "silu") @ wd

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, wg, wu)]
    out = cf(*leaves)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b, wg, wu)]
    wd = wd.double()
    out_r = f_ref(*ref_leaves)
    grads_r = torch.autograd.grad(out_r.square().sum(), ref_leaves)
    torch.testing.assert_close(out, out_r.float(), rtol=1e-4, atol=1e-4)
    for g, gr in zip(grads, grads_r):
        torch.testing.assert_close(g, gr.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="awkward larger shape: GPU only (interpreter too slow)")
def test_larger_awkward_shape_cuda():
    """1823 x 781 -> 1023 (nothing a multiple of a block), every dtype, linear and gated."""
    for dtype in dtypes_for("cuda"):
        x, (w, wg, wu), b = _make((1823, 781), 1023, dtype, "cuda", n_w=3)
        dy = torch.randn(1823, 1023, device="cuda").to(dtype)
        _check(lambda x, w, b: linear_act(x, w, b, "gelu_tanh"), lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"),
               [x, w, b], dy, ["x", "weight", "bias"], f"large {dtype}")  # fmt: skip
        _check(lambda x, a, b: gated_linear(x, a, b), lambda x, a, b: gated_linear_reference(x, a, b),
               [x, wg, wu], dy, ["x", "w_gate", "w_up"], f"large gated {dtype}")  # fmt: skip
        # K, N multiples of 8: "auto" takes the persistent TMA forward here (fp16/bf16; fp32: cuBLAS)
        x, (w,), b = _make((1823, 784), 1032, dtype, "cuda")
        assert la._forward_impl(1823, 1032, 784, 1) == "persistent"
        assert la._persistent_ok(x, w) == (dtype != torch.float32)
        dy = torch.randn(1823, 1032, device="cuda").to(dtype)
        _check(lambda x, w, b: linear_act(x, w, b, "gelu_tanh"), lambda x, w, b: linear_act_reference(x, w, b, "gelu_tanh"),
               [x, w, b], dy, ["x", "weight", "bias"], f"large persistent {dtype}")  # fmt: skip


def test_bad_arguments(device):
    x = torch.randn(4, 17, device=device)
    w = torch.randn(33, 17, device=device)
    with pytest.raises(ValueError, match=r"tritonize\.linear_act: argument 'weight'.*K=16"):
        linear_act(x, torch.randn(33, 16, device=device))
    with pytest.raises(ValueError, match=r"tritonize\.linear_act: argument 'activation'.*'swish'"):
        linear_act(x, w, activation="swish")
    with pytest.raises(ValueError, match=r"tritonize\.linear_act: argument 'bias'.*\(33,\)"):
        linear_act(x, w, torch.randn(32, device=device))
    with pytest.raises(ValueError, match=r"tritonize\.linear_act: argument 'weight' must be 2-D"):
        linear_act(x, torch.randn(2, 33, 17, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.linear_act: argument 'weight' has dtype torch.float16"):
        linear_act(x, w.half())
    with pytest.raises(TypeError, match=r"tritonize\.linear_act: argument 'x' has dtype torch.int64"):
        linear_act(torch.ones(4, 17, dtype=torch.long, device=device), w)
    with pytest.raises(ValueError, match=r"tritonize\.gated_linear: argument 'w_up' has shape \(32, 17\)"):
        gated_linear(x, w, torch.randn(32, 17, device=device))
    with pytest.raises(ValueError, match=r"tritonize\.gated_linear: argument 'w_gate'.*K=18"):
        gated_linear(x, torch.randn(33, 18, device=device), torch.randn(33, 18, device=device))
    with pytest.raises(ValueError, match=r"tritonize\.gated_linear: argument 'activation'"):
        gated_linear(x, w, w, activation=None)
    # devices that share an index (cpu and meta both report -1): the fast check must not pass them
    other = "meta" if x.device.type == "cpu" else "cpu"
    with pytest.raises((ValueError, TypeError), match=r"tritonize\.linear_act: .*device"):
        linear_act(x, w.to(other))
    with pytest.raises((ValueError, TypeError), match=r"tritonize\.linear_act: .*device"):
        linear_act(x, w, torch.randn(33, device=other))
