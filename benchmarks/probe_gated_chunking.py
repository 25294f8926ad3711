"""Would row-chunking the gated MLP keep G, U (forward) and dG, dU (backward) in L2 between the
GEMM and the element-wise pass, and would that beat the GEMMs' loss of efficiency on fewer rows?

    python -m benchmarks.probe_gated_chunking [--out table.md]

The idea (session 13): at Llama-8B's MLP (8192 x 4096 -> 14336, bf16) 87-90% of gated_linear's
fwd+bwd is cuBLAS GEMMs that eager runs too; what is ours to cut is the 8 memory passes of M x N
(235 MB each) around them. Producing G and U a block of rows at a time and applying the
activation right after (and likewise dG, dU then dX) would read them back from the 50 MB L2, not
HBM: up to 4 passes (~300 us) less. This times, per chunk size C (rows):
  fwd    G = x Wg^T, U = x Wu^T (cuBLAS, into row slices), out = silu(G) * U (our kernel)
  bwd    dG, dU (our element-wise backward, in place), dX = dG Wg + dU Wu (cuBLAS)
  gemm   x Wg^T alone, in chunks of C rows
(triton's do_bench, L2 cleared before each call; bwd less the time of restoring G and U, which
the backward overwrites). Outputs are checked equal across chunk sizes.
Session 13, H100: chunking loses at every size (docs/results/linear_act.md): the GEMMs lose more
on fewer rows (x Wg^T 1390 us whole, 1485 in 1024-row chunks, 1660 in 512) than L2 saves.
"""

from __future__ import annotations

import importlib

import torch

from benchmarks._common import Bench, parser

SHAPES = [("llama8b", 4096, 14336), ("llama1b", 2048, 8192)]
CHUNKS = (8192, 4096, 2048, 1024, 768, 512)


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_gated_chunking: needs a CUDA GPU")
        return 0
    from triton.testing import do_bench

    la = importlib.import_module("tritonize.kernels.linear_act")
    torch.manual_seed(0)
    M = 8192
    bench = Bench("probe_gated_chunking")
    for name, K, N in SHAPES[:1] if args.quick else SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        wg = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        wu = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        g, u, out = (torch.empty(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        dx = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)
        g0, u0 = x @ wg.t(), x @ wu.t()

        def fwd(C):
            for s in range(0, M, C):
                r = slice(s, s + C)
                torch.mm(x[r], wg.t(), out=g[r])
                torch.mm(x[r], wu.t(), out=u[r])
                la._launch_act_fwd(g[r], u[r], out[r], "silu")

        def restore():
            g.copy_(g0)
            u.copy_(u0)

        def bwd(C):
            restore()
            for s in range(0, M, C):
                r = slice(s, s + C)
                la._gated_bwd_elementwise(dy[r], g[r], u[r], "silu", False)
                torch.mm(g[r], wg, out=dx[r])
                dx[r].addmm_(u[r], wu)

        def gemm(C):
            for s in range(0, M, C):
                torch.mm(x[s : s + C], wg.t(), out=g[s : s + C])

        t_restore = do_bench(restore, warmup=50, rep=300)
        ref_out = ref_dx = None
        for C in CHUNKS:
            fwd(C)
            bwd(C)
            if ref_out is None:
                ref_out, ref_dx = out.clone(), dx.clone()
            same = torch.equal(out, ref_out) and torch.equal(dx, ref_dx)
            tf = do_bench(lambda: fwd(C), warmup=50, rep=300) * 1e3
            tb = do_bench(lambda: bwd(C), warmup=50, rep=300) * 1e3 - t_restore * 1e3
            tg = do_bench(lambda: gemm(C), warmup=50, rep=300) * 1e3
            bench.row(shape=f"{name} {M}x{K}->{N}", chunk_rows=C, fwd_us=tf, bwd_ew_dx_us=tb, sum_us=tf + tb,
                      gemm_us=tg, outputs_equal=same)  # fmt: skip
        del x, wg, wu, dy, g, u, out, dx, g0, u0
        torch.cuda.empty_cache()
    bench.table(["shape", "chunk_rows", "fwd_us", "bwd_ew_dx_us", "sum_us", "gemm_us", "outputs_equal"],
                title="gated MLP in row chunks (H100 L2 reuse probe)", out=args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
