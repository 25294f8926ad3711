"""layer_norm / add_layer_norm: forward and every gradient vs an fp64 reference, torch in the same
dtype as the yardstick (tests/helpers.assert_close3)."""

import importlib

import pytest
import torch

from tests.helpers import check3, dtypes_for, noncontig_rows, stride0_grad, strided_vec, transposed_copy
from tritonize.kernels import _norm_common as nc

# the module by its import path: `tritonize.kernels.layer_norm` as an attribute may be the function
ln_mod = importlib.import_module("tritonize.kernels.layer_norm")
layer_norm, add_layer_norm, layer_norm_reference = ln_mod.layer_norm, ln_mod.add_layer_norm, ln_mod.layer_norm_reference

SHAPES = [(1, 1), (7, 3), (3, 7, 1023), (1823, 781), (2, 5, 4096)]
BIG = {(1823, 781), (2, 5, 4096)}


def _inputs(shape, dtype, device, weight=True, bias=True, residual=False):
    n = shape[-1]
    ins = {"x": torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5}
    if residual:
        ins["residual"] = torch.randn(shape, dtype=dtype, device=device)
    ins["weight"] = (1 + 0.5 * torch.randn(n, dtype=dtype, device=device)) if weight else None
    ins["bias"] = torch.randn(n, dtype=dtype, device=device) if bias else None
    return ins


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm(device, shape):
    # the interpreter is slow: the two big shapes run in one dtype on CPU
    dtypes = dtypes_for(device) if (device == "cuda" or shape not in BIG) else [torch.float16]
    for dtype in dtypes:
        check3(lambda **k: layer_norm(**k, eps=1e-5), lambda **k: layer_norm_reference(**k, eps=1e-5),
               _inputs(shape, dtype, device))


def test_layer_norm_optional_params_and_strides(device):
    for dtype in dtypes_for(device):
        # weight / bias absent, each alone
        for w, b in ((False, False), (True, False), (False, True)):
            check3(layer_norm, layer_norm_reference, _inputs((5, 3, 37), dtype, device, weight=w, bias=b))
        ins = _inputs((6, 300), dtype, device)
        # padded rows (row stride > width) and a transposed view (inner stride != 1)
        check3(layer_norm, layer_norm_reference, ins, prep_x=noncontig_rows)
        check3(layer_norm, layer_norm_reference, ins, prep_x=transposed_copy)
        # upstream gradient expanded from a scalar (stride 0), as y.sum().backward() sends
        check3(layer_norm, layer_norm_reference, ins, grad_fn=stride0_grad)
        # a strided (every other element) weight view
        check3(layer_norm, layer_norm_reference, ins, prep_w=strided_vec)
    # mixed precision: fp32 parameters with half activations -> output in x's dtype, grads per param
    x = torch.randn(4, 64, dtype=torch.float16, device=device)
    w = torch.randn(64, device=device, requires_grad=True)
    y = layer_norm(x, w, None)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32


def test_add_layer_norm(device):
    for dtype in dtypes_for(device):
        for shape in ((7, 3), (3, 5, 1023)):
            # both outputs carry an upstream gradient: d(x + residual) = norm-backward + d(sum)
            check3(lambda **k: add_layer_norm(**k, eps=1e-5),
                   lambda **k: layer_norm_reference(**k, eps=1e-5),
                   _inputs(shape, dtype, device, residual=True), names=("normed", "sum"))
        check3(add_layer_norm, layer_norm_reference, _inputs((4, 100), dtype, device, weight=False, bias=False,
                                                           residual=True), names=("normed", "sum"),
               prep_x=noncontig_rows, grad_fn=stride0_grad)
    # the sum is rounded to x's dtype exactly as torch rounds x + residual
    x, r = torch.randn(2, 3, 50, dtype=torch.float16, device=device), torch.randn(2, 3, 50, dtype=torch.float16,
                                                                                  device=device)
    _, s = add_layer_norm(x, r)
    assert torch.equal(s, x + r)
    # only the normed output used: the residual still gets its gradient (same as x's)
    x.requires_grad_(True)
    r.requires_grad_(True)
    y, _ = add_layer_norm(x, r, torch.randn(50, dtype=torch.float16, device=device))
    (y.float() ** 2).sum().backward()
    assert torch.equal(x.grad, r.grad) and x.grad.abs().sum() > 0


def test_layer_norm_wide_row_paths(device, monkeypatch):
    """Rows wider than the register budget: looped forward, dx-only backward (looped and not),
    dweight/dbias from column tiles. Thresholds shrunk so small shapes take those paths."""
    monkeypatch.setattr(nc, "FWD_LOOP", (32, 1))
    monkeypatch.setattr(nc, "BWD_LOOP", (32, 1))
    monkeypatch.setattr(nc, "BWD_FUSED_MAX", 64)
    for fwd_max, dx_max in ((64, 64), (1 << 15, 1 << 15)):
        monkeypatch.setattr(nc, "LN_FWD_FUSED_MAX", fwd_max)
        monkeypatch.setattr(nc, "DX_FUSED_MAX", dx_max)
        check3(layer_norm, layer_norm_reference, _inputs((37, 100), torch.float32, device), prep_x=noncontig_rows)
        check3(add_layer_norm, layer_norm_reference, _inputs((5, 129), torch.float16, device, residual=True),
               names=("normed", "sum"))
        check3(layer_norm, layer_norm_reference, _inputs((3, 70), torch.float32, device, weight=False))


def shrink_wide_bwd(monkeypatch, variant):
    """Knobs of _norm_common shrunk so small shapes take the wide-row backward `variant` with
    several column blocks, row groups / chunks (and a partial last one)."""
    monkeypatch.setattr(nc, "BWD_FUSED_MAX", 64)
    monkeypatch.setattr(nc, "WIDE_BWD", variant.split("-")[0])
    if variant == "chain-plain":  # no software prefetch, no eviction hints
        monkeypatch.setattr(nc, "CHAIN_PREFETCH", False)
        monkeypatch.setattr(nc, "CHAIN_EVICT_HINTS", False)
    monkeypatch.setattr(nc, "STATS_CFG", (32, 1))
    monkeypatch.setattr(nc, "SPLIT_TILE", (4, 32, 1))
    monkeypatch.setattr(nc, "SPLIT_PROGRAMS_PER_SM", 4)
    monkeypatch.setattr(nc, "CHAIN_ROWS", 8)
    monkeypatch.setattr(nc, "CHAIN_LAG", 2)
    monkeypatch.setattr(nc, "CHAIN_TILE", (4, 32))
    monkeypatch.setattr(nc, "CHAIN_WARPS", 1)
    # dweight/dbias partial rows shared by 3 chunks (the last row by fewer), added in chunk order;
    # or one row per chunk
    monkeypatch.setattr(nc, "CHAIN_SUPER", 1 if variant == "chain-row-per-chunk" else 3)


@pytest.mark.parametrize("variant", ["split", "chain", "chain-plain", "chain-row-per-chunk"])
def test_layer_norm_wide_bwd_variants(device, monkeypatch, variant):
    """The "split" and "chain" wide-row backwards (dx with dweight / dbias from column tiles):
    row counts not divisible by the tile / chunk, N not by the column block, padded rows,
    stride-0 dy, the residual variant, dweight or dbias alone."""
    shrink_wide_bwd(monkeypatch, variant)
    check3(layer_norm, layer_norm_reference, _inputs((37, 100), torch.float32, device), prep_x=noncontig_rows)
    check3(add_layer_norm, layer_norm_reference, _inputs((5, 129), torch.float16, device, residual=True),
           names=("normed", "sum"))
    check3(layer_norm, layer_norm_reference, _inputs((3, 70), torch.float32, device, weight=False))
    check3(layer_norm, layer_norm_reference, _inputs((2, 3, 200), torch.float16, device, bias=False),
           grad_fn=stride0_grad)


def test_layer_norm_wide_bwd_deterministic(device, monkeypatch):
    """The chain backward's partial rows are added in chunk order by programs that wait on each
    other: the same inputs give bit-identical gradients on every run (and the fp32 reference's
    values), whatever order the GPU ran the programs in. 21 chunks of 8 rows, 4 column blocks."""
    shrink_wide_bwd(monkeypatch, "chain")
    ins = _inputs((168, 100), torch.float32, device)
    x, w, b = (t.requires_grad_() for t in (ins["x"], ins["weight"], ins["bias"]))
    dy = torch.randn_like(x)
    runs = [torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy) for _ in range(3 if x.is_cuda else 2)]
    for later in runs[1:]:
        for a, c in zip(runs[0], later):
            assert torch.equal(a, c)
    want = torch.autograd.grad(layer_norm_reference(x.double(), w.double(), b.double()), (x, w, b), dy.double())
    for got, ref in zip(runs[0], want):
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-4, atol=1e-4)


def test_layer_norm_torch_fallback(device, monkeypatch):
    """Where Triton does not run, the op computes the same thing in plain torch."""
    monkeypatch.setattr(ln_mod, "use_triton", lambda t: False)
    for residual in (False, True):
        check3(add_layer_norm if residual else layer_norm, layer_norm_reference,
               _inputs((4, 3, 33), torch.float16, device, residual=residual),
               names=("normed", "sum"))


def test_layer_norm_empty(device):
    for shape in ((0, 16), (2, 0, 16)):
        x = torch.randn(shape, device=device, requires_grad=True)
        w = torch.randn(16, device=device, requires_grad=True)
        b = torch.randn(16, device=device, requires_grad=True)
        y = layer_norm(x, w, b)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    y, s = add_layer_norm(torch.randn(0, 8, device=device), torch.randn(0, 8, device=device))
    assert y.shape == s.shape == (0, 8)


def test_layer_norm_opcheck(device):
    """Fake (meta) kernels, schema and autograd registration agree with the real op."""
    x = torch.randn(3, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    r = torch.randn(3, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.tritonize.layer_norm_fwd.default, (x, r, w, None, 1e-5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # the backward op with both parameter gradients of one dtype: its outputs must not alias each
    # other (an earlier version returned dweight and dbias as two views of one buffer, which
    # torch refuses when the op is traced, e.g. under rest="inductor")
    b = torch.randn(40, device=device)
    with torch.no_grad():
        _, _, mean, rstd = torch.ops.tritonize.layer_norm_fwd(x, None, w, b, 1e-5)
    dy = torch.randn(3, 40, device=device)
    torch.library.opcheck(torch.ops.tritonize.layer_norm_bwd.default,
                          (dy, None, x.detach(), w.detach(), b, mean, rstd, True, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_layer_norm_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"tritonize\.layer_norm.*'weight'"):
        layer_norm(x, torch.ones(7, device=device))
    with pytest.raises(ValueError, match=r"tritonize\.layer_norm.*'bias'"):
        layer_norm(x, None, torch.ones(4, 2, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.layer_norm.*'x'"):
        layer_norm(torch.ones(4, 8, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.layer_norm.*'weight'"):
        layer_norm(x, torch.ones(8, dtype=torch.int64, device=device))
    for eps in (0.0, -1e-5):
        with pytest.raises(ValueError, match=r"tritonize\.layer_norm.*'eps'"):
            layer_norm(x, None, None, eps)
    with pytest.raises(ValueError, match=r"tritonize\.add_layer_norm.*'residual'"):
        add_layer_norm(x, torch.randn(4, 9, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.add_layer_norm.*'residual'"):
        add_layer_norm(x, torch.randn(4, 8, dtype=torch.float16, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.add_layer_norm.*'residual'"):
        add_layer_norm(x, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real wide rows: GPU only (interpreter too slow)")
@pytest.mark.parametrize("shape", [(33, 20000), (9, 65536)], ids=str)
def test_layer_norm_wide_rows_default_knobs_cuda(shape):
    """Rows past BWD_FUSED_MAX with the shipped knobs (the chain backward, its LayerNorm tile and
    prefetch), every dtype, with and without the residual."""
    for dtype in dtypes_for("cuda"):
        check3(layer_norm, layer_norm_reference, _inputs(shape, dtype, "cuda"))
        check3(add_layer_norm, layer_norm_reference, _inputs(shape, dtype, "cuda", residual=True),
               names=("normed", "sum"))
