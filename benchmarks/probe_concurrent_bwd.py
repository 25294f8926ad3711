"""Would linear_act's backward GEMMs gain from running dX and dW side by side on two streams?

    python -m benchmarks.probe_concurrent_bwd [--rounds 15]

Why (session 15): at GPT-2's MLP (8192 x 768 -> 3072, bf16) the two backward GEMMs are small
for the H100's 132 SMs: dX (8192 x 768 output) is ~192 tiles of 256x128 (1.45 waves) and dW (3072
x 768, K = 8192) ~144 tiles of 128x128 (1.09 waves), so each ends with a partly idle wave. Issued
on two streams, the second can fill the first's tail. This times, with the GPU kept busy first
(queued: no launch gaps), per round and interleaved:
  seq     dX = dZ W, then dW = dZ^T X, one stream (what linear_act does)
  conc    dX on the current stream, dW on a side stream (event record / wait both ways)
  dx, dw  each GEMM alone
and the host time per call of seq and conc. Outputs are checked equal (bit for bit).
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks._common import Bench, parser

SHAPES = [("gpt2", 768, 3072), ("llama1b_down", 8192, 2048)]  # name, K (in), N (out)


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_concurrent_bwd: needs a CUDA GPU")
        return 0
    bench = Bench("probe_concurrent_bwd")
    M = 8192
    side = torch.cuda.Stream()
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(100):  # to the loaded clock
        w @ w
    del w
    for name, K, N in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        dz = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

        def seq():
            return torch.mm(dz, W), torch.mm(dz.t(), x)

        def conc():
            dw = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                torch.mm(dz.t(), x, out=dw)
            dx = torch.mm(dz, W)
            main.wait_stream(side)
            return dx, dw

        fns = {"seq": seq, "conc": conc, "dx": lambda: torch.mm(dz, W), "dw": lambda: torch.mm(dz.t(), x)}
        a, b = seq(), conc()
        torch.cuda.synchronize()
        same = all(torch.equal(u, v) for u, v in zip(a, b))
        gpu = {k: [] for k in fns}
        cpu = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                g, c = _queued(fn, 20)
                gpu[k].append(g)
                cpu[k].append(c)
        med = {k: statistics.median(v) for k, v in gpu.items()}
        ratio = statistics.median(s / c for s, c in zip(gpu["seq"], gpu["conc"]))
        bench.row(model=name, shape=f"{M}x{K}->{N}", seq_us=med["seq"], conc_us=med["conc"], dx_us=med["dx"],
                  dw_us=med["dw"], seq_over_conc=ratio, seq_cpu_us=statistics.median(cpu["seq"]),
                  conc_cpu_us=statistics.median(cpu["conc"]), bit_equal=same)  # fmt: skip
        del x, W, dz
        torch.cuda.empty_cache()
    bench.table(["model", "shape", "seq_us", "conc_us", "seq_over_conc", "dx_us", "dw_us", "seq_cpu_us", "conc_cpu_us",
                 "bit_equal"], out=args.out)  # fmt: skip
    return 0


def _queued(fn, iters: int):
    """(GPU us per call with the GPU kept busy first, host us per call)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(20_000_000)
    start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    cpu = (time.perf_counter() - t0) / iters * 1e6
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3, cpu


if __name__ == "__main__":
    import sys

    sys.exit(main())
