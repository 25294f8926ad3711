"""FastKernel (tritonize/kernels/_launch.py): direct launches must compute exactly what Triton's
own launch computes, for every specialisation Triton makes (alignment, ints equal to 1 or
multiples of 16, dtypes, constexprs, autotuner and heuristics choices).

On a GPU the second call of each case is a direct launch, and `check` mode additionally asks
Triton, call by call, which compiled kernel and argument list it would have used. Under the
interpreter (CPU CI) launches always take Triton's path; the key's classification is tested there.
"""

import pytest
import torch
import triton
import triton.language as tl

from tritonize.kernels import _launch
from tritonize.kernels._common import INTERPRET


@triton.jit
def _axpy_kernel(X, Y, OUT, n, alpha, stride_x, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs * stride_x, mask=m).to(tl.float32)
    y = tl.load(Y + offs, mask=m).to(tl.float32)
    tl.store(OUT + offs, (alpha * x + y).to(OUT.dtype.element_ty), mask=m)


@triton.autotune([triton.Config({"BLOCK": 64}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=4)],
                 key=["BUCKET"])
@triton.heuristics({"EVEN": lambda a: a["n"] % a["BLOCK"] == 0})
@triton.jit
def _double_kernel(X, OUT, n, BUCKET, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if EVEN:  # unmasked: reusing this kernel for an uneven n would read and write out of bounds
        tl.store(OUT + offs, tl.load(X + offs) * 2)
    else:
        m = offs < n
        tl.store(OUT + offs, tl.load(X + offs, mask=m) * 2, mask=m)


def _devices():
    return ["cuda"] if torch.cuda.is_available() else (["cpu"] if INTERPRET else [])


def test_spec_separates_what_triton_specialises_on():
    spec = _launch.spec_of
    base = torch.empty(64, dtype=torch.bfloat16)
    assert spec(base) != spec(base[1:])  # 16-byte alignment
    assert spec(base) == spec(base[8:])  # 8 bf16 = 16 bytes: still aligned
    assert spec(base) != spec(base.float())  # dtype
    assert spec(1) != spec(3) and spec(16) != spec(3) and spec(3) == spec(5)
    assert spec(2**31) != spec(2**31 - 16) and spec(2**63) != spec(2**62)  # i32 / i64 / u64
    assert spec(True) != spec(1) and spec(True) != spec(False)
    assert spec(None) is None and spec(0.5) == spec(2.0)
    with pytest.raises(_launch._Unsupported):
        spec((1, 2))


@pytest.mark.parametrize("dev", _devices())
@pytest.mark.parametrize("mode", ["1", "check"])
def test_direct_launch_matches_torch_on_every_specialisation(dev, mode, monkeypatch):
    monkeypatch.setattr(_launch, "_MODE", mode)
    axpy = _launch.FastKernel(_axpy_kernel)
    cases = []
    for dtype in (torch.float32, torch.float16):
        for n in (1, 16, 17, 1000):
            for stride in (1, 3):
                for off in (0, 1):  # off=1: a misaligned view of the same buffer
                    cases.append((dtype, n, stride, off))
    for dtype, n, stride, off in cases * 2:  # second round: cached keys, direct launches on a GPU
        xb = torch.randn(off + n * stride, device=dev, dtype=dtype)
        yb = torch.randn(off + n, device=dev, dtype=dtype)
        x, y = xb[off:][::stride], yb[off:]
        out = torch.empty(n, device=dev, dtype=dtype)
        alpha = 0.5 if n % 2 else 2.0
        axpy[(triton.cdiv(n, 64),)](x, y, out, n, alpha, stride, BLOCK=64)
        ref = (alpha * x.float() + y.float()).to(dtype)
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3, msg=f"{dtype} n={n} stride={stride} off={off}")
    if dev == "cuda":
        assert axpy.enabled and axpy.fallbacks == {}
        assert axpy.hits >= len(cases)  # every second-round call (and repeats of a key in the first) launched directly
        assert len(axpy.cache) >= 8  # alignment, stride==1, n==1 / %16, dtype each got their own kernel
    else:
        assert not axpy.enabled and axpy.hits == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner benchmarks on a GPU only")
def test_autotuned_heuristic_kernel_keeps_heuristics_per_call(monkeypatch):
    # n=192 and n=160 share the autotuner's key (BUCKET) and Triton's int specialisation
    # (both multiples of 16), but EVEN (n % BLOCK == 0) differs for BLOCK=64: the cached entry
    # for one must never serve the other.
    monkeypatch.setattr(_launch, "_MODE", "check")
    k = _launch.FastKernel(_double_kernel)
    dev = "cuda"
    for n in (192, 160, 192, 160, 64, 160):
        x = torch.randn(n, device=dev)
        out = torch.full((n + 64,), -1.0, device=dev)  # guard zone after n must stay untouched
        k[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n, 1)
        torch.testing.assert_close(out[:n], 2 * x)
        assert bool((out[n:] == -1).all()), f"n={n}: wrote past the end"
    assert k.fallbacks == {} and k.hits >= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches exist only on a GPU")
def test_package_kernels_launch_directly():
    import importlib

    import tritonize.kernels as K

    ln = importlib.import_module("tritonize.kernels.layer_norm")
    x = torch.randn(37, 300, device="cuda", requires_grad=True)
    w = torch.randn(300, device="cuda", requires_grad=True)
    for _ in range(3):
        y = K.layer_norm(x, w, None, 1e-5)
        y.backward(torch.ones_like(y))
    assert ln._layer_norm_fwd_kernel.hits >= 2 and ln._layer_norm_bwd_kernel.hits >= 2
    assert ln._layer_norm_fwd_kernel.fallbacks == {} and ln._layer_norm_bwd_kernel.fallbacks == {}
