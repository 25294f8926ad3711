"""G and U side by side in one (M, 2N) buffer, now that every large GEMM's algorithm is timed:
does the joint layout beat the split one for gated_linear's fwd+bwd?

    python -m benchmarks.probe_gated_joint [--rounds 9] [--out table.md]

The idea (session 13, re-asked in session 16): with G = GU[:, :N] and U = GU[:, N:] (and dG, dU
written over them in the backward), the two weight gradients dWg = dG^T X and dWu = dU^T X are one
GEMM, GU^T X -> (2N, K), whose row halves are dWg and dWu (contiguous views). Session 13 measured
that merged GEMM 130-180 us faster than two at Llama-8B, but dX = dG Wg + dU Wu from the halves'
strided rows (ld 2N) 172-289 us slower: both on torch's heuristic pick. Since session 15 the large
GEMMs run the candidate timed per problem (`_cublaslt.matmul`), which may not lose on the strided
operand. This times, interleaved by round (median over rounds; per-round ratios for the totals):
  fwd_gemms   x Wg^T and x Wu^T: split (two new tensors) vs joint (into GU's column halves)
  act         silu(G) * U: flat kernel on split tensors vs a 2-D strided one on GU's halves
  dx          dG Wg + dU Wu (torch.mm + addmm_): split vs joint (strided); and joint with the first
              product on the timed cuBLASLt pick
  dw          two timed GEMMs vs one (GU^T X)
  total       the whole fwd+bwd (the element-wise backward included), split vs joint
Outputs and gradients are compared between the two layouts.
"""

from __future__ import annotations

import importlib
import statistics

import torch
import triton
import triton.language as tl

from benchmarks._common import Bench, parser
from benchmarks.probe_cublaslt_algos import _timed_calls, _warm_gpu


@triton.jit
def _act2d_kernel(g_ptr, u_ptr, out_ptr, M, N, stride_s, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # out = silu(G) * U with G, U of row stride stride_s (GU's halves), out contiguous
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)
    offs = rm64[:, None] * stride_s + rn[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(out_ptr + rm64[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _act2d(g, u, out, bm=32, bn=256, warps=8):
    M, N = out.shape
    _act2d_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](g, u, out, M, N, g.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                                                            num_warps=warps)  # fmt: skip


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_gated_joint: needs a CUDA GPU")
        return 0
    la = importlib.import_module("tritonize.kernels.linear_act")
    from tritonize.kernels import _cublaslt as lt

    bench = Bench("probe_gated_joint")
    torch.manual_seed(0)
    _warm_gpu()
    shapes = [("llama8b", 4096, 14336), ("llama1b", 2048, 8192)]
    for name, K, N in shapes[:1] if args.quick else shapes:
        _shape(bench, la, lt, name, K, N, args.rounds)
        torch.cuda.empty_cache()
    bench.table(["model", "case", "us_median", "us_min", "us_max", "split_over_joint"], out=args.out)
    return 0


def _shape(bench, la, lt, name: str, K: int, N: int, rounds: int):
    M = 8192
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, **bf)
    wg, wu = (torch.randn(N, K, **bf) * K**-0.5 for _ in range(2))
    dy = torch.randn(M, N, **bf)
    gu = torch.empty(M, 2 * N, **bf)
    G, U = gu[:, :N], gu[:, N:]
    out = torch.empty(M, N, **bf)

    def split_step():
        g, u = la._mm(x, wg.t()), la._mm(x, wu.t())
        y = torch.empty_like(g)
        la._launch_act_fwd(g, u, y, "silu")
        la._gated_bwd_elementwise(dy, g, u, "silu", False)
        dx = torch.mm(g, wg)
        dx.addmm_(u, wu)
        return y, dx, la._mm(g.t(), x), la._mm(u.t(), x)

    def joint_step():
        for w, o in ((wg, G), (wu, U)):
            if lt.matmul(x, w.t(), out=o) is None:
                raise RuntimeError("cuBLASLt did not take the joint forward GEMM")
        y = torch.empty(M, N, **bf)
        _act2d(G, U, y)
        la._gated_bwd_elementwise(dy, G, U, "silu", False)
        dx = torch.mm(G, wg)
        dx.addmm_(U, wu)
        dw = lt.matmul(gu.t(), x)
        return y, dx, dw[:N], dw[N:]

    ref, got = split_step(), joint_step()
    errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(got, ref)]
    print(f"# {name}: joint vs split, max rel diff out/dx/dwg/dwu: {', '.join(f'{e:.1e}' for e in errs)}", flush=True)
    del ref, got
    gs, us_ = la._mm(x, wg.t()), la._mm(x, wu.t())
    lt.matmul(x, wg.t(), out=G)
    lt.matmul(x, wu.t(), out=U)
    dxo = torch.empty(M, K, **bf)

    def dx_joint_tuned():
        lt.matmul(G, wg, out=dxo)
        dxo.addmm_(U, wu)

    cases = {
        "fwd_gemms split": lambda: (la._mm(x, wg.t()), la._mm(x, wu.t())),
        "fwd_gemms joint": lambda: (lt.matmul(x, wg.t(), out=G), lt.matmul(x, wu.t(), out=U)),
        "act split": lambda: la._launch_act_fwd(gs, us_, out, "silu"),
        "act joint": lambda: _act2d(G, U, out),
        **{f"act joint {bm}x{bn} w{w}": (lambda bm=bm, bn=bn, w=w: _act2d(G, U, out, bm, bn, w))
           for bm, bn, w in [(8, 1024, 8), (4, 2048, 8), (16, 512, 8), (2, 4096, 8), (8, 512, 4), (1, 4096, 4)]},
        "act split as 2-D": lambda: _act2d(gs, us_, out),
        "dx split (torch)": lambda: torch.mm(gs, wg).addmm_(us_, wu),
        "dx joint (torch)": lambda: torch.mm(G, wg).addmm_(U, wu),
        "dx joint (first product timed)": dx_joint_tuned,
        "dw split (two timed)": lambda: (la._mm(gs.t(), x), la._mm(us_.t(), x)),
        "dw joint (one timed)": lambda: lt.matmul(gu.t(), x),
        "total split": split_step,
        "total joint": joint_step,
    }
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(_timed_calls(fn, reps=3 if k.startswith("total") else 5) * 1e3)
    ratio = statistics.median(a / b for a, b in zip(times["total split"], times["total joint"]))
    for k, t in times.items():
        bench.row(model=name, case=k, us_median=statistics.median(t), us_min=min(t), us_max=max(t),
                  **({"split_over_joint": ratio} if k == "total joint" else {}))  # fmt: skip
    picks = [f"{key[2]}x{key[4]}x{key[3]} strides a {key[5]},{key[6]} b {key[7]},{key[8]} ldc {key[11]}: "
             f"candidate {pl.picked}" for key, pl in lt._mm_plans.items() if pl]
    print(f"# {name} picks: " + "; ".join(picks), flush=True)


if __name__ == "__main__":
    import sys

    sys.exit(main())
