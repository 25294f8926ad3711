"""The tuned cuBLASLt GEMM (kernels/_cublaslt.matmul) and the large GEMMs of gated_linear /
gated_mlp / linear_act's dW that go through it: every operand layout it takes against torch.mm and
an fp64 reference (three-way rule), the layouts it must refuse (so the caller keeps torch.mm),
the timing step (runs once, keeps one of the heuristic's candidates; skipped under deterministic
algorithms and inside a CUDA graph capture), and the ops' gradients with the path forced on.
"""

import importlib

import pytest
import torch

from tests.helpers import assert_close3, noncontig_rows
from tests.kernels.test_linear_act import GATED, _check, _make
from tritonize.kernels.linear_act import gated_linear, gated_linear_reference, gated_mlp, gated_mlp_reference, linear_act
from tritonize.kernels.linear_act import linear_act_reference

lt = importlib.import_module("tritonize.kernels._cublaslt")
la = importlib.import_module("tritonize.kernels.linear_act")

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt: GPU only")


def _operand(rows, cols, layout, dtype, device="cuda"):
    """(rows, cols) with unit column stride ("row"), unit row stride ("t": the transpose of a
    (cols, rows) buffer whose rows are padded to 16 bytes, as cuBLASLt needs), or rows padded by 16
    bytes ("pad": a strided view cuBLASLt can still take)."""
    if layout == "row":
        return torch.randn(rows, cols, device=device).to(dtype)
    if layout == "t":
        ld = -(-rows // 8) * 8
        buf = torch.randn(cols, ld, device=device).to(dtype)
        return buf[:, :rows].t()
    return noncontig_rows(torch.randn(rows, cols, device=device).to(dtype), pad=8)


def _key_plan(a, b):
    key = next(k for k in lt._mm_plans if k[2:5] == (a.shape[0], b.shape[1], a.shape[1]) and k[5:9] == (*a.stride(), *b.stride()))
    return lt._mm_plans[key]


def test_mm_falls_back_off_the_gpu():
    """On CPU tensors matmul declines (None) and the ops' _mm is torch.mm, exactly."""
    a, b = torch.randn(5, 8), torch.randn(8, 16)
    assert lt.matmul(a, b) is None
    big = la.TUNED_MM_MIN_WORK
    try:
        la.TUNED_MM_MIN_WORK = 0
        assert torch.equal(la._mm(a, b), torch.mm(a, b))
    finally:
        la.TUNED_MM_MIN_WORK = big


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matmul_every_layout(dtype):
    """a (M, K) @ b (K, N) for row-major, transposed and row-padded operands, M = 1 and odd M / K:
    taken (not None), contiguous (M, N), within the three-way rule of torch.mm; the problem is
    timed on its first call (candidates dropped) and a second call gives the same bits."""
    for M, K, N in [(37, 24, 40), (1, 16, 8), (129, 72, 264)]:
        for la_ in ("row", "t", "pad"):
            for lb in ("row", "t"):
                a, b = _operand(M, K, la_, dtype), _operand(K, N, lb, dtype)
                c = lt.matmul(a, b)
                assert c is not None, f"matmul declined {M}x{K}x{N} {la_}/{lb} {dtype}"
                assert c.shape == (M, N) and c.is_contiguous()
                assert_close3(c, torch.mm(a, b), a.double() @ b.double(), name=f"{M}x{K}x{N} {la_}/{lb} {dtype}")
                plan = _key_plan(a, b)
                assert plan.cands is None  # timed once (or a single candidate): never again
                assert plan.algo in [ctypes_addr for ctypes_addr, _ in _candidates(plan)]
                assert torch.equal(lt.matmul(a, b), c)


@gpu
def test_matmul_into_out():
    """out=: a column slice of a wider buffer (row stride 2N, as G and U side by side) and a
    contiguous one are written in place and returned, within the three-way rule, the rest of the
    buffer untouched; outs it cannot take (wrong shape or dtype, unit row stride, a row stride or
    pointer not 16-byte aligned) give None."""
    h = torch.bfloat16
    M, K, N = 129, 72, 264
    a, b = _operand(M, K, "row", h), _operand(K, N, "t", h)
    ref = a.double() @ b.double()
    buf = torch.full((M, 2 * N), 7.0, device="cuda", dtype=h)
    for half in (buf[:, :N], buf[:, N:], torch.empty(M, N, device="cuda", dtype=h)):
        got = lt.matmul(a, b, out=half)
        assert got is half
        assert_close3(half, torch.mm(a, b), ref, name=f"out stride {half.stride()}")
    assert torch.equal(lt.matmul(a, b, out=buf[:, :N]), buf[:, :N])
    wide = torch.full((M, 2 * N + 8), 7.0, device="cuda", dtype=h)
    lt.matmul(a, b, out=wide[:, 8:N + 8])
    assert (wide[:, :8] == 7).all() and (wide[:, N + 8:] == 7).all()  # only the slice written
    bad = [
        torch.empty(M, N + 8, device="cuda", dtype=h),  # shape
        torch.empty(M, N, device="cuda", dtype=torch.float16),  # dtype
        torch.empty(N, M, device="cuda", dtype=h).t(),  # unit row stride
        torch.empty(M, N + 1, device="cuda", dtype=h)[:, :N],  # row stride 530 B
        torch.empty(M, N + 8, device="cuda", dtype=h)[:, 1:N + 1],  # pointer 2 B past alignment
    ]
    for i, o in enumerate(bad):
        assert lt.matmul(a, b, out=o) is None, f"bad out {i} taken"


def _candidates(plan):
    import ctypes

    results, _, n = plan.keep
    return [(ctypes.addressof(r.algo), int(r.workspaceSize)) for r in results[:n] if r.state == 0]


@gpu
def test_matmul_declines_what_it_cannot_take():
    """fp32, a stride-0 operand, rows (or a transposed operand's columns) not 16-byte aligned,
    N * 2 bytes not a multiple of 16, mixed dtypes: None, so the caller runs torch.mm (and _mm's
    result is torch.mm's)."""
    h = torch.float16
    cases = [
        (torch.randn(8, 16, device="cuda"), torch.randn(16, 8, device="cuda")),  # fp32
        (torch.randn(1, 16, device="cuda", dtype=h).expand(8, 16), torch.randn(16, 8, device="cuda", dtype=h)),
        (torch.randn(8, 17, device="cuda", dtype=h), torch.randn(17, 8, device="cuda", dtype=h)),  # a's rows 34 B
        (torch.randn(24, 37, device="cuda", dtype=h).t(), torch.randn(24, 8, device="cuda", dtype=h)),  # ld 74 B
        (torch.randn(8, 16, device="cuda", dtype=h), torch.randn(16, 9, device="cuda", dtype=h)),  # N * 2 = 18
        (torch.randn(8, 16, device="cuda", dtype=h), torch.randn(16, 8, device="cuda", dtype=torch.bfloat16)),
    ]
    big = la.TUNED_MM_MIN_WORK
    try:
        la.TUNED_MM_MIN_WORK = 0
        for i, (a, b) in enumerate(cases):
            assert lt.matmul(a, b) is None, f"case {i} taken"
            if a.dtype == b.dtype:
                assert torch.equal(la._mm(a, b), torch.mm(a, b)), f"case {i}"
    finally:
        la.TUNED_MM_MIN_WORK = big


@gpu
def test_tuning_picks_a_candidate_and_is_skipped_when_it_must_be():
    """A problem with several candidates is timed on its first call and keeps one of them; under
    torch.use_deterministic_algorithms it is not timed (the heuristic's first pick runs, as torch's
    would); inside a CUDA graph capture it is not timed either, and the graph replays correctly."""
    a = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 768, device="cuda", dtype=torch.bfloat16)
    ref = a.double() @ b.double()
    c = lt.matmul(a, b)
    plan = _key_plan(a, b)
    assert len(_candidates(plan)) > 1, "cuBLASLt offered one algorithm: the timing step is not exercised"
    assert plan.cands is None
    assert_close3(c, torch.mm(a, b), ref, name="tuned")

    a2 = torch.randn(1024, 520, device="cuda", dtype=torch.bfloat16)  # a new problem
    b2 = torch.randn(520, 768, device="cuda", dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        c2 = lt.matmul(a2, b2)
    finally:
        torch.use_deterministic_algorithms(False)
    plan2 = _key_plan(a2, b2)
    assert plan2.cands is not None and plan2.algo == plan2.cands[0][0]  # untimed, first pick
    assert_close3(c2, torch.mm(a2, b2), a2.double() @ b2.double(), name="deterministic")

    a3 = torch.randn(1024, 528, device="cuda", dtype=torch.bfloat16)
    b3 = torch.randn(528, 768, device="cuda", dtype=torch.bfloat16)
    lt.matmul(torch.randn_like(a), b)  # warm the library on this stream before capturing
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            c3 = lt.matmul(a3, b3)
    torch.cuda.current_stream().wait_stream(s)
    assert c3 is not None and _key_plan(a3, b3).cands is not None  # not timed while capturing
    a3.copy_(torch.randn_like(a3))
    g.replay()
    torch.cuda.synchronize()
    assert_close3(c3, torch.mm(a3, b3), a3.double() @ b3.double(), name="graph replay")


@gpu
def test_gated_ops_through_the_tuned_gemms(monkeypatch):
    """gated_linear and gated_mlp (cuBLAS forward) and linear_act's dW with every large-GEMM site on
    the tuned path (TUNED_MM_MIN_WORK = 0): forward and every gradient by the three-way rule, the
    path counted as taken, awkward M (1, 37, a 3-D x) and a row-padded x."""
    monkeypatch.setattr(la, "TUNED_MM_MIN_WORK", 0)
    monkeypatch.setattr(la, "FORWARD_IMPL", "cublas")
    taken = []
    real = lt.matmul

    def counting(a, b):
        c = real(a, b)
        taken.append(c is not None)
        return c

    monkeypatch.setattr(lt, "matmul", counting)
    for dtype in (torch.float16, torch.bfloat16):
        for shape_x in [(1, 24), (37, 24), (3, 5, 24)]:
            for act in GATED:
                x, (wg, wu), _ = _make(shape_x, 40, dtype, "cuda", bias=False, n_w=2)
                dy = torch.randn(*shape_x[:-1], 40, device="cuda").to(dtype)
                _check(lambda x, a, b: gated_linear(x, a, b, act), lambda x, a, b: gated_linear_reference(x, a, b, act),
                       [x, wg, wu], dy, ["x", "w_gate", "w_up"], f"tuned gated {act} {dtype} {shape_x}")  # fmt: skip
                wd = (torch.randn(32, 40, device="cuda") / 40**0.5).to(dtype)
                dy = torch.randn(*shape_x[:-1], 32, device="cuda").to(dtype)
                _check(lambda x, a, b, c: gated_mlp(x, a, b, c, act), lambda x, a, b, c: gated_mlp_reference(x, a, b, c, act),
                       [x, wg, wu, wd], dy, ["x", "w_gate", "w_up", "w_down"], f"tuned gated_mlp {act} {dtype} {shape_x}")  # fmt: skip
        x, (w,), b = _make((37, 24), 40, dtype, "cuda")
        for xi in (x, noncontig_rows(x, pad=8)):
            dy = torch.randn(37, 40, device="cuda").to(dtype)
            _check(lambda x, w, b: linear_act(x, w, b, "silu"), lambda x, w, b: linear_act_reference(x, w, b, "silu"),
                   [xi, w, b], dy, ["x", "weight", "bias"], f"tuned linear_act dW {dtype}")  # fmt: skip
    assert taken and all(taken), f"tuned GEMM declined {taken.count(False)} of {len(taken)} calls"
