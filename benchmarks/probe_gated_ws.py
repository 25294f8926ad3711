"""Can a warp-specialized persistent Triton kernel (triton >= 3.5 schedules TMA loads, wgmma and the
epilogue in separate warp groups on Hopper) run gated_linear's forward -- G = x Wg^T, U = x Wu^T and
out = silu(G) * U, all three stored from the epilogue -- faster than the shipped cuBLAS GEMMs plus
element-wise pass?

    python -m benchmarks.probe_gated_ws [--rounds 7] [--sustained 400] [--out table.md]

Why (session 16): at Llama-8B every fused implementation (torch.compile, Liger, ours) lands at
1.03-1.05x eager, because 87-90% of the op is the same cuBLAS GEMMs at the power limit's clock.
What is left to save is in the GEMMs' epilogues: the forward's element-wise pass reads G and U
back (2 of its 3 M x N passes). Our earlier Triton forwards (pointer loads, TMA, persistent
without warp specialization) were 5-25% slower than cuBLAS's GEMMs. Each product gets its own
accumulator (BLOCK_N columns of G and of U for one x tile), the x tile is loaded once per K step.
Rows: the shipped forward (cuBLAS G and U + our element-wise kernel) and the kernel per config,
with and without warp specialization; outputs checked against the shipped forward (a config
whose output is wrong or NaN is an error row, not timed).
Session 16, H100, triton 3.6 (docs/results/linear_act.md): the best config, 128x128x64 s3 w8,
ties the shipped forward in single calls (0.997x at Llama-8B; 0.87x at Llama-1B) and loses 2% at
the power limit; warp specialization changes nothing there, and with 4 warps it gives NaN.
"""

from __future__ import annotations

import importlib
import statistics

import torch
import triton
import triton.language as tl

from benchmarks._common import Bench, parser
from benchmarks.probe_cublaslt_algos import _timed_block, _timed_calls, _warm_gpu
from tritonize.kernels.linear_act import _tile_offsets


@triton.jit
def _gated_fwd_ws_kernel(x_ptr, wg_ptr, wu_ptr, out_ptr, g_ptr, u_ptr, M, N, K,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         NUM_PROGS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):  # fmt: skip
    # G = x Wg^T, U = x Wu^T, out = silu(G) * U; x (M, K), W (N, K), outputs (M, N), all contiguous
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    wg_desc = tl.make_tensor_descriptor(wg_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    wu_desc = tl.make_tensor_descriptor(wu_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    u_desc = tl.make_tensor_descriptor(u_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    in_group = GROUP_M * num_pid_n
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=False, warp_specialize=WARP_SPECIALIZE):
        off_m, off_n = _tile_offsets(tile, num_pid_m, in_group, BLOCK_M, BLOCK_N, GROUP_M)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_steps):
            a = x_desc.load([off_m, k * BLOCK_K])
            acc_g = tl.dot(a, wg_desc.load([off_n, k * BLOCK_K]).T, acc_g)
            acc_u = tl.dot(a, wu_desc.load([off_n, k * BLOCK_K]).T, acc_u)
        g_desc.store([off_m, off_n], acc_g.to(g_ptr.dtype.element_ty))
        u_desc.store([off_m, off_n], acc_u.to(u_ptr.dtype.element_ty))
        out = acc_g * tl.sigmoid(acc_g) * acc_u
        o_desc.store([off_m, off_n], out.to(out_ptr.dtype.element_ty))


CONFIGS = [(128, 64, 64, 4, 8), (128, 64, 64, 3, 8), (128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sustained", type=float, default=0.0, metavar="MS")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_gated_ws: needs a CUDA GPU")
        return 0
    la = importlib.import_module("tritonize.kernels.linear_act")
    la._ensure_triton_allocator()
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    bench = Bench("probe_gated_ws")
    torch.manual_seed(0)
    _warm_gpu()
    shapes = [("llama8b", 4096, 14336), ("llama1b", 2048, 8192)]
    for name, K, N in shapes[:1] if args.quick else shapes:
        M = 8192
        bf = dict(device="cuda", dtype=torch.bfloat16)
        x = torch.randn(M, K, **bf)
        wg, wu = (torch.randn(N, K, **bf) * K**-0.5 for _ in range(2))
        out, g, u = (torch.empty(M, N, **bf) for _ in range(3))
        ref = la.gated_linear_forward(x, wg, wu, "silu", True)
        cases = {"shipped (cuBLAS G, U + element-wise)": lambda: la.gated_linear_forward(x, wg, wu, "silu", True)}
        for bm, bn, bk, st, w in CONFIGS:
            for ws in (True, False):
                def run(bm=bm, bn=bn, bk=bk, st=st, w=w, ws=ws):
                    _gated_fwd_ws_kernel[(n_sm,)](x, wg, wu, out, g, u, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                  GROUP_M=8, NUM_PROGS=n_sm, WARP_SPECIALIZE=ws, num_stages=st,
                                                  num_warps=w)  # fmt: skip
                label = f"{bm}x{bn}x{bk} s{st} w{w} {'ws' if ws else 'no ws'}"
                try:
                    run()
                    torch.cuda.synchronize()
                    errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip((out, g, u), ref)]
                    print(f"# {name} {label}: max rel err out/g/u vs shipped {', '.join(f'{e:.1e}' for e in errs)}", flush=True)
                    if not all(e <= 2e-2 for e in errs):  # NaN fails this too (max() would let it through)
                        raise AssertionError(f"wrong result, max rel err {errs}")
                    cases[label] = run
                except Exception as e:  # a config that does not compile or is wrong is a row, not a crash
                    bench.row(model=name, case=label, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
        times = {k: [] for k in cases}
        for _ in range(args.rounds):
            for k, fn in cases.items():
                times[k].append(_timed_block(fn, args.sustained) * 1e3 if args.sustained else _timed_calls(fn, reps=5) * 1e3)
        base = times["shipped (cuBLAS G, U + element-wise)"]
        for k, t in times.items():
            bench.row(model=name, case=k, us_median=statistics.median(t), us_min=min(t),
                      shipped_over_this=statistics.median(b / x_ for b, x_ in zip(base, t)),
                      tflops=4 * M * N * K / statistics.median(t) * 1e-6)  # fmt: skip
        del x, wg, wu, out, g, u, ref, cases
        torch.cuda.empty_cache()
    bench.table(["model", "case", "us_median", "us_min", "shipped_over_this", "tflops", "error"], out=args.out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
