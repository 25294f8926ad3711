"""gated_linear's element-wise backward pass (dG, dU from dY, G, U, written over G, U): tile
shapes timed at the Llama bench shapes, against the device's copy bandwidth.

    python -m benchmarks.sweep_gated_ew [--out table.md]

The pass moves 5 M x N bf16 matrices (reads dY, G, U; writes dG, dU): 1175 MB at Llama-8B's MLP
(8192 x 14336), 671 MB at Llama-1B's (8192 x 8192). Its tiles (linear_act._EW_BLOCK_M / _N /
_WARPS) were set without a sweep at these shapes; this times each candidate (CUDA events, median
of interleaved rounds; G and U restored before every call, that copy not counted) and checks each
one's dG, dU equal the shipped tile's.
"""

from __future__ import annotations

import importlib
import statistics

import torch
import triton

from benchmarks._common import Bench, copy_bandwidth_gbps, parser

TILES = [(32, 256, 8), (16, 256, 4), (16, 512, 8), (8, 1024, 8), (64, 128, 8), (32, 128, 4), (64, 256, 8),
         (8, 512, 4), (4, 1024, 4), (32, 512, 8)]  # fmt: skip


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_gated_ew: needs a CUDA GPU")
        return 0
    la = importlib.import_module("tritonize.kernels.linear_act")
    bench = Bench("sweep_gated_ew")
    copy = copy_bandwidth_gbps()
    bench.row(case="copy bandwidth", gbps=copy)
    torch.manual_seed(0)
    shapes = [("llama8b", 14336), ("llama1b", 8192)]
    for name, N in shapes[:1] if args.quick else shapes:
        _shape(bench, la, name, N, args.rounds, copy)
        torch.cuda.empty_cache()
    bench.table(["model", "tile", "us_median", "us_min", "gbps", "pct_of_copy"], out=args.out)
    return 0


def _shape(bench, la, name: str, N: int, rounds: int, copy: float):
    M = 8192
    bf = dict(device="cuda", dtype=torch.bfloat16)
    dy, g0, u0 = (torch.randn(M, N, **bf) for _ in range(3))
    g, u = g0.clone(), u0.clone()

    def launch(bm, bn, w):
        la._gated_linear_bwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            dy, g, u, M, N, dy.stride(0), dy.stride(1), g.stride(0),
            ACTIVATION="silu", P_INTO_DY=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
        )  # fmt: skip

    ref = None
    for t in TILES:
        g.copy_(g0)
        u.copy_(u0)
        launch(*t)
        if ref is None:
            ref = (g.clone(), u.clone())
        elif not (torch.equal(g, ref[0]) and torch.equal(u, ref[1])):
            raise AssertionError(f"{name} tile {t}: dG / dU differ from the first tile's")
    times = {t: [] for t in TILES}
    for _ in range(rounds):
        for t in TILES:
            ev = []
            for _ in range(5):
                g.copy_(g0)
                u.copy_(u0)
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                launch(*t)
                e.record()
                ev.append((s, e))
            torch.cuda.synchronize()
            times[t].append(statistics.median(s.elapsed_time(e) for s, e in ev) * 1e3)
    nbytes = 5 * M * N * 2
    shipped = (la._EW_BLOCK_M, la._EW_BLOCK_N, la._EW_WARPS)
    for t, ts in times.items():
        us = statistics.median(ts)
        bench.row(model=name, tile=f"{t[0]}x{t[1]} w{t[2]}" + (" (shipped)" if t == shipped else ""), us_median=us,
                  us_min=min(ts), gbps=nbytes / us * 1e-3, pct_of_copy=100 * nbytes / us * 1e-3 / copy)  # fmt: skip


if __name__ == "__main__":
    import sys

    sys.exit(main())
