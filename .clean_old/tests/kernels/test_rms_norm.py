"""rms_norm / add_rms_norm: forward and every gradient vs an fp64 reference, with HF Llama's
RMSNorm numerics (tritonize.kernels.rms_norm.rms_norm_reference, upcast=False) in the same dtype
as the yardstick (tests/helpers.assert_close3); and equality with transformers' own module."""

import importlib

import pytest
import torch

from tests.helpers import check3, dtypes_for, noncontig_rows, stride0_grad, strided_vec, transposed_copy
from tests.kernels.test_layer_norm import shrink_wide_bwd
from tritonize.kernels import _norm_common as nc

# the module by its import path: `tritonize.kernels.rms_norm` as an attribute may be the function
rms_mod = importlib.import_module("tritonize.kernels.rms_norm")
rms_norm, add_rms_norm, rms_norm_reference = rms_mod.rms_norm, rms_mod.add_rms_norm, rms_mod.rms_norm_reference

SHAPES = [(1, 1), (7, 3), (3, 7, 1023), (1823, 781), (2, 5, 4096)]
BIG = {(1823, 781), (2, 5, 4096)}


def _inputs(shape, dtype, device, weight=True, residual=False, weight_dtype=None):
    n = shape[-1]
    ins = {"x": torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5}
    if residual:
        ins["residual"] = torch.randn(shape, dtype=dtype, device=device)
    ins["weight"] = (1 + 0.5 * torch.randn(n, dtype=weight_dtype or dtype, device=device)) if weight else None
    return ins


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(device, shape):
    # the interpreter is slow: the two big shapes run in one dtype on CPU
    dtypes = dtypes_for(device) if (device == "cuda" or shape not in BIG) else [torch.float16]
    for dtype in dtypes:
        check3(lambda **k: rms_norm(**k, eps=1e-6), lambda **k: rms_norm_reference(**k, eps=1e-6),
               _inputs(shape, dtype, device))


def test_rms_norm_optional_weight_promotion_and_strides(device):
    for dtype in dtypes_for(device):
        check3(rms_norm, rms_norm_reference, _inputs((5, 3, 37), dtype, device, weight=False))
        ins = _inputs((6, 300), dtype, device)
        # padded rows (row stride > width) and a transposed view (inner stride != 1)
        check3(rms_norm, rms_norm_reference, ins, prep_x=noncontig_rows)
        check3(rms_norm, rms_norm_reference, ins, prep_x=transposed_copy)
        # upstream gradient expanded from a scalar (stride 0), as y.sum().backward() sends
        check3(rms_norm, rms_norm_reference, ins, grad_fn=stride0_grad)
        # a strided (every other element) weight view
        check3(rms_norm, rms_norm_reference, ins, prep_w=strided_vec)
    # fp32 weight with half x: HF returns fp32 (weight * h.to(x.dtype) promotes); so must we
    low = dtypes_for(device)[-1]
    check3(rms_norm, rms_norm_reference, _inputs((4, 77), low, device, weight_dtype=torch.float32))
    check3(rms_norm, rms_norm_reference, _inputs((4, 77), torch.float32, device, weight_dtype=low))


def test_rms_norm_matches_hf_llama(device):
    """Same numerics as transformers' LlamaRMSNorm: equal up to one rounding of the output dtype
    (the fp32 sum order differs, nothing else)."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    for dtype, wdtype in [(d, d) for d in dtypes_for(device)] + [(dtypes_for(device)[-1], torch.float32)]:
        x = torch.randn(9, 300, dtype=dtype, device=device) * 3
        mod = modeling.LlamaRMSNorm(300, eps=1e-6).to(device=device, dtype=wdtype)
        with torch.no_grad():
            mod.weight.copy_(1 + 0.5 * torch.randn(300))
            want = mod(x)
        got = rms_norm(x, mod.weight.detach(), 1e-6)
        assert got.dtype == want.dtype
        ulp = torch.finfo(want.dtype).eps * want.abs().clamp_min(1)
        assert ((got - want).abs() <= 2 * ulp).all(), (got - want).abs().max()


def test_add_rms_norm(device):
    for dtype in dtypes_for(device):
        for shape in ((7, 3), (3, 5, 1023)):
            # both outputs carry an upstream gradient: d(x + residual) = norm-backward + d(sum)
            check3(lambda **k: add_rms_norm(**k, eps=1e-6), lambda **k: rms_norm_reference(**k, eps=1e-6),
                   _inputs(shape, dtype, device, residual=True), names=("normed", "sum"))
        check3(add_rms_norm, rms_norm_reference, _inputs((4, 100), dtype, device, weight=False, residual=True),
               names=("normed", "sum"), prep_x=noncontig_rows, grad_fn=stride0_grad)
    x = torch.randn(2, 3, 50, dtype=torch.float16, device=device)
    r = torch.randn(2, 3, 50, dtype=torch.float16, device=device)
    _, s = add_rms_norm(x, r)
    assert torch.equal(s, x + r)  # rounded as torch rounds x + residual
    x.requires_grad_(True)
    r.requires_grad_(True)
    y, _ = add_rms_norm(x, r, torch.randn(50, dtype=torch.float16, device=device))
    (y.float() ** 2).sum().backward()
    assert torch.equal(x.grad, r.grad) and x.grad.abs().sum() > 0


def test_rms_norm_wide_row_paths(device, monkeypatch):
    """Rows wider than the register budget: looped forward, dx-only backward (looped and not),
    dweight from column tiles. Thresholds shrunk so small shapes take those paths."""
    monkeypatch.setattr(nc, "FWD_LOOP", (32, 1))
    monkeypatch.setattr(nc, "BWD_LOOP", (32, 1))
    monkeypatch.setattr(nc, "BWD_FUSED_MAX", 64)
    for fwd_max, dx_max in ((64, 64), (1 << 15, 1 << 15)):
        monkeypatch.setattr(nc, "RMS_FWD_FUSED_MAX", fwd_max)
        monkeypatch.setattr(nc, "DX_FUSED_MAX", dx_max)
        check3(rms_norm, rms_norm_reference, _inputs((37, 100), torch.float32, device), prep_x=noncontig_rows)
        check3(add_rms_norm, rms_norm_reference, _inputs((5, 129), torch.float16, device, residual=True),
               names=("normed", "sum"))
        check3(rms_norm, rms_norm_reference, _inputs((3, 70), torch.float16, device, weight_dtype=torch.float32))


@pytest.mark.parametrize("variant", ["split", "chain", "chain-plain", "chain-row-per-chunk"])
def test_rms_norm_wide_bwd_variants(device, monkeypatch, variant):
    """The "split" and "chain" wide-row backwards (dx with dweight from column tiles), knobs
    shrunk as in test_layer_norm: awkward shapes, padded rows, stride-0 dy, the residual
    variant, an fp32 weight with half x (fp32 output and dy)."""
    shrink_wide_bwd(monkeypatch, variant)
    check3(rms_norm, rms_norm_reference, _inputs((37, 100), torch.float32, device), prep_x=noncontig_rows)
    check3(add_rms_norm, rms_norm_reference, _inputs((5, 129), torch.float16, device, residual=True),
           names=("normed", "sum"))
    check3(rms_norm, rms_norm_reference, _inputs((3, 70), torch.float16, device, weight_dtype=torch.float32))
    check3(rms_norm, rms_norm_reference, _inputs((2, 3, 200), torch.float16, device), grad_fn=stride0_grad)


def test_rms_norm_torch_fallback(device, monkeypatch):
    """Where Triton does not run, the op computes the same thing in plain torch."""
    monkeypatch.setattr(rms_mod, "use_triton", lambda t: False)
    check3(rms_norm, rms_norm_reference, _inputs((4, 3, 33), torch.float16, device))
    check3(add_rms_norm, rms_norm_reference, _inputs((4, 3, 33), torch.float16, device, residual=True),
           names=("normed", "sum"))


def test_rms_norm_empty(device):
    for shape in ((0, 16), (2, 0, 16)):
        x = torch.randn(shape, device=device, requires_grad=True)
        w = torch.randn(16, device=device, requires_grad=True)
        y = rms_norm(x, w)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros_like(w))
    y, s = add_rms_norm(torch.randn(0, 8, device=device), torch.randn(0, 8, device=device))
    assert y.shape == s.shape == (0, 8)


def test_rms_norm_opcheck(device):
    """Fake (meta) kernels, schema and autograd registration agree with the real op."""
    x = torch.randn(3, 40, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)
    r = torch.randn(3, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.tritonize.rms_norm_fwd.default, (x, r, w, 1e-6),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_rms_norm_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"tritonize\.rms_norm.*'weight'"):
        rms_norm(x, torch.ones(7, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.rms_norm.*'x'"):
        rms_norm(torch.ones(4, 8, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.rms_norm.*'weight'"):
        rms_norm(x, torch.ones(8, dtype=torch.int64, device=device))
    for eps in (0.0, -1e-6):
        with pytest.raises(ValueError, match=r"tritonize\.rms_norm.*'eps'"):
            rms_norm(x, None, eps)
    with pytest.raises(ValueError, match=r"tritonize\.add_rms_norm.*'residual'"):
        add_rms_norm(x, torch.randn(4, 9, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.add_rms_norm.*'residual'"):
        add_rms_norm(x, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real wide rows: GPU only (interpreter too slow)")
@pytest.mark.parametrize("shape", [(33, 20000), (9, 65536)], ids=str)
def test_rms_norm_wide_rows_default_knobs_cuda(shape):
    """Rows past BWD_FUSED_MAX with the shipped knobs (the chain backward, its RMSNorm tile and
    prefetch), every dtype, with and without the residual."""
    for dtype in dtypes_for("cuda"):
        check3(lambda **k: rms_norm(**k, eps=1e-6), lambda **k: rms_norm_reference(**k, eps=1e-6),
               _inputs(shape, dtype, "cuda"))
        check3(add_rms_norm, rms_norm_reference, _inputs(shape, dtype, "cuda", residual=True), names=("normed", "sum"))
