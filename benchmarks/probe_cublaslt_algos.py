"""Does cuBLASLt have faster algorithms than the one torch.mm runs, for the GEMMs of linear_act /
gated_linear's forward and backward at the bench shapes?

    python -m benchmarks.probe_cublaslt_algos [--quick] [--top 32] [--out table.md]
    python -m benchmarks.probe_cublaslt_algos --ab [--rounds 15]
    python -m benchmarks.probe_cublaslt_algos [--ab] --sustained 500 [--models llama8b]

--sustained MS: each timing is a block of back-to-back calls lasting about MS ms, so the GPU runs at
the clock its power limit allows (a training run's state) rather than the boost clock single calls
after a pause see; the picks were timed in the latter state.
--ab: gated_linear's fwd+bwd at the Llama shapes with its large GEMMs on the timed cuBLASLt pick
(as shipped) and on torch.mm (TUNED_MM_MIN_WORK off), and eager's (F.silu(F.linear) * F.linear),
interleaved by round in one process: the medians of the per-round ratios, and which candidate
each GEMM's timing kept.

Why (session 15): at Llama-8B's MLP (8192 x 4096 -> 14336, bf16) 87-90% of gated_linear's fwd+bwd
is cuBLAS GEMMs that eager runs too, so our margin over eager is bounded by the element-wise passes
we save (~5%). A faster GEMM than the one torch's heuristic picks would widen it. This asks
cuBLASLt's heuristic for up to --top algorithms per GEMM (workspace 32 MiB, as tritonize's
cuBLASLt path uses), times each (CUDA events, median of 15 calls after 3 warm-ups) beside torch.mm
on the same operands (timed before and after, to show drift), and checks each algorithm's output
against torch.mm's. Rows: every GEMM's torch.mm time, heuristic top-1, and the fastest algorithm
with its config (tile, stages, split-K, reduction scheme); split-K algorithms are marked (their
reduction order differs from split-K 1).
"""

from __future__ import annotations

import ctypes
import statistics

import torch

from benchmarks._common import Bench, parser

# (model, gemm, M, K, N, a's layout, b's layout): C (M, N) = a (M, K) @ b (K, N); "row" = row-major
# (unit column stride), "t" = the transpose of a row-major matrix (unit row stride)
GEMMS = [
    ("llama8b", "fwd x Wg^T", 8192, 4096, 14336, "row", "t"),
    ("llama8b", "bwd dX = dG Wg", 8192, 14336, 4096, "row", "row"),
    ("llama8b", "bwd dWg = dG^T x", 14336, 8192, 4096, "t", "row"),
    ("llama1b", "fwd x Wg^T", 8192, 2048, 8192, "row", "t"),
    ("llama1b", "bwd dX = dG Wg", 8192, 8192, 2048, "row", "row"),
    ("llama1b", "bwd dWg = dG^T x", 8192, 8192, 2048, "t", "row"),
    ("gpt2", "fwd x W^T", 8192, 768, 3072, "row", "t"),
    ("gpt2", "bwd dX = dZ W", 8192, 3072, 768, "row", "row"),
    ("gpt2", "bwd dW = dZ^T x", 3072, 8192, 768, "t", "row"),
]

_ALGO_ATTRS = {"id": 0, "tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6}


def _operand(rows: int, cols: int, layout: str) -> torch.Tensor:
    if layout == "row":
        return torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    return torch.randn(cols, rows, device="cuda", dtype=torch.bfloat16).t()


def _layouts(a: torch.Tensor, b: torch.Tensor):
    """cuBLASLt (column-major) view of C = a @ b: C^T (N x M) = b^T a^T.
    Returns (opA, (rows, cols, ld) of A), (opB, (rows, cols, ld) of B) with A from b, B from a."""
    M, K = a.shape
    N = b.shape[1]
    if b.stride(1) == 1:
        A = (0, (N, K, b.stride(0)))
    else:
        A = (1, (K, N, b.stride(1)))
    if a.stride(1) == 1:
        B = (0, (K, M, a.stride(0)))
    else:
        B = (1, (M, K, a.stride(1)))
    return A, B


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--top", type=int, default=32, help="algorithms asked of the heuristic per GEMM")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--ab", action="store_true", help="gated_linear fwd+bwd, tuned GEMMs vs torch.mm (see above)")
    p.add_argument("--sustained", type=float, default=0.0, metavar="MS",
                   help="time each candidate as back-to-back calls for about MS ms (the GPU at its power limit) "
                        "instead of the median of 15 single calls")
    p.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(sorted({g[0] for g in GEMMS})))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_cublaslt_algos: needs a CUDA GPU")
        return 0
    from tritonize.kernels import _cublaslt as lt

    if args.ab:
        return _ab(args)
    lib = lt._library()
    if lib is None:
        print("probe_cublaslt_algos: cuBLASLt not loadable")
        return 0
    lib.cublasLtMatmulAlgoConfigGetAttribute.restype = ctypes.c_int
    handle = ctypes.c_void_p()
    assert lib.cublasLtCreate(ctypes.byref(handle)) == 0
    ws = torch.empty(lt._WORKSPACE_MAX, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    bench = Bench("probe_cublaslt_algos")
    torch.manual_seed(0)
    one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def timed(fn):
        return _timed_block(fn, args.sustained) if args.sustained else _timed_calls(fn, reps=15, warm=3)

    _warm_gpu()
    gemms = [g for g in GEMMS if g[0] != "llama1b"] if args.quick else GEMMS
    if args.models:
        gemms = [g for g in gemms if g[0] in args.models.split(",")]
    for model, gemm, M, K, N, la, lb in gemms:
        a = _operand(M, K, la)
        b = _operand(K, N, lb)
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        ref = torch.mm(a, b)
        (opa, (ra, ca, lda)), (opb, (rb, cb, ldb)) = _layouts(a, b)
        desc = ctypes.c_void_p()
        assert lib.cublasLtMatmulDescCreate(ctypes.byref(desc), lt._COMPUTE_32F, lt._CUDA_R_32F) == 0
        lt._set(lib.cublasLtMatmulDescSetAttribute, desc, lt._DESC_TRANSA, ctypes.c_int32(opa))
        lt._set(lib.cublasLtMatmulDescSetAttribute, desc, lt._DESC_TRANSB, ctypes.c_int32(opb))
        lays = []
        for rows, cols, ld in ((ra, ca, lda), (rb, cb, ldb), (N, M, N)):
            lay = ctypes.c_void_p()
            assert lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), lt._CUDA_R_16BF, rows, cols, ld) == 0
            lays.append(lay)
        pref = ctypes.c_void_p()
        assert lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)) == 0
        lt._set(lib.cublasLtMatmulPreferenceSetAttribute, pref, lt._PREF_MAX_WORKSPACE, ctypes.c_uint64(lt._WORKSPACE_MAX))
        results = (lt._Heuristic * args.top)()
        count = ctypes.c_int(0)
        st = lib.cublasLtMatmulAlgoGetHeuristic(handle, desc, lays[0], lays[1], lays[2], lays[2], pref, args.top,
                                                results, ctypes.byref(count))
        if st != 0 or count.value == 0:
            bench.row(model=model, gemm=gemm, error=f"heuristic status {st}, {count.value} algorithms")
            continue
        rows = []
        for i in range(count.value):
            r = results[i]
            if r.state != 0:
                continue
            info = {}
            for name, attr in _ALGO_ATTRS.items():
                v = ctypes.c_uint32(0)
                wr = ctypes.c_size_t(0)
                lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(r.algo), attr, ctypes.byref(v), 4, ctypes.byref(wr))
                info[name] = v.value
            algo_addr = ctypes.addressof(r.algo)
            wsz = r.workspaceSize

            def call(algo_addr=algo_addr, wsz=wsz):
                s = lib.cublasLtMatmul(handle.value, desc.value, ctypes.addressof(one), b.data_ptr(), lays[0].value,
                                       a.data_ptr(), lays[1].value, ctypes.addressof(zero), c.data_ptr(),
                                       lays[2].value, c.data_ptr(), lays[2].value, algo_addr,
                                       ws.data_ptr() if wsz else None, wsz, stream)  # fmt: skip
                if s != 0:
                    raise RuntimeError(f"cublasLtMatmul status {s}")

            try:
                c.zero_()
                call()
                torch.cuda.synchronize()
                err = ((c.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            except RuntimeError as e:
                rows.append(dict(rank=i, error=str(e), **info))
                continue
            rows.append(dict(rank=i, call=call, times=[], err=err, ws_mb=wsz / 2**20, **info))
        # interleaved rounds: torch.mm, then every algorithm, per round; the GPU's clock drifts with its
        # temperature and power draw, so each candidate is compared with torch.mm of the same round
        ok = [r for r in rows if "call" in r]
        torch_times = []
        for _ in range(args.rounds):
            torch_times.append(timed(lambda: torch.mm(a, b, out=c)))
            for r in ok:
                r["times"].append(timed(r["call"]))
        for r in ok:
            r["ms"] = statistics.median(r["times"])
            r["ratio"] = statistics.median(tt / t for tt, t in zip(torch_times, r["times"]))
        t_torch = statistics.median(torch_times)
        t_torch0, t_torch1 = min(torch_times), max(torch_times)
        flops = 2 * M * N * K
        best = max(ok, key=lambda r: r["ratio"])
        top1 = next((r for r in ok if r["rank"] == 0), None)
        base = dict(model=model, gemm=gemm, shape=f"{M}x{K}x{N}", torch_ms=t_torch, torch_ms_min_max=f"{t_torch0:.4f}/{t_torch1:.4f}",
                    torch_tflops=flops / t_torch * 1e-9, n_algos=len(ok))  # fmt: skip
        bench.row(**base, pick="heuristic top-1", ms=top1["ms"] if top1 else None,
                  x_torch=top1["ratio"] if top1 else None,
                  config=_cfg(top1) if top1 else None, err=top1["err"] if top1 else None)  # fmt: skip
        bench.row(**base, pick=f"fastest (rank {best['rank']})", ms=best["ms"], x_torch=best["ratio"],
                  tflops=flops / best["ms"] * 1e-9, config=_cfg(best), err=best["err"])  # fmt: skip
        no_split = [r for r in ok if r["splitk"] <= 1]
        if no_split:
            nb = max(no_split, key=lambda r: r["ratio"])
            if nb is not best:
                bench.row(**base, pick=f"fastest split-K 1 (rank {nb['rank']})", ms=nb["ms"], x_torch=nb["ratio"],
                          config=_cfg(nb), err=nb["err"])  # fmt: skip
        print(f"# {model} {gemm}: torch {t_torch:.4f}; " + ", ".join(f"{r['rank']}:{r['ms']:.4f} ({r['ratio']:.3f}x)" for r in ok),
              flush=True)
        torch.cuda.empty_cache()
    bench.table(["model", "gemm", "shape", "pick", "ms", "torch_ms", "x_torch", "torch_ms_min_max", "torch_tflops",
                 "tflops", "n_algos", "config", "err", "error"], out=args.out)  # fmt: skip
    return 0


def _ab(args) -> int:
    import importlib

    la = importlib.import_module("tritonize.kernels.linear_act")
    from tritonize.kernels import _cublaslt as lt

    bench = Bench("probe_cublaslt_algos --ab")
    torch.manual_seed(0)
    M = 8192
    _warm_gpu()
    for name, K, N in [("llama8b", 4096, 14336), ("llama1b", 2048, 8192)]:
        if args.models and name not in args.models.split(","):
            continue
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        wg, wu = ((torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5).requires_grad_() for _ in range(2))
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

        def step():
            return torch.autograd.grad(la.gated_linear(x, wg, wu, "silu"), (x, wg, wu), dy)

        def eager():
            y = torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu)
            return torch.autograd.grad(y, (x, wg, wu), dy)

        default = la.TUNED_MM_MIN_WORK
        arms = {"tuned": (default, step), "torch_mm": (1 << 62, step), "eager": (default, eager)}
        times = {k: [] for k in arms}
        ref = None
        for r in range(args.rounds + 1):
            for arm, (thr, fn) in arms.items():
                la.TUNED_MM_MIN_WORK = thr
                t = _timed_block(fn, args.sustained) if args.sustained else _timed_calls(fn, reps=5)
                if r:  # round 0: warm-up (and the tuned arm's timing step)
                    times[arm].append(t)
                if ref is None:
                    ref = step()
                elif r == 0:
                    got = fn()
                    errs = [((g.float() - e.float()).abs().max() / e.float().abs().max()).item() for g, e in zip(got, ref)]
                    print(f"# {name}: {arm} vs the first arm's grads, max rel diff {max(errs):.2e}", flush=True)
        la.TUNED_MM_MIN_WORK = default
        ratio = statistics.median(a / b for a, b in zip(times["torch_mm"], times["tuned"]))
        picks = []
        for key, plan in lt._mm_plans.items():
            if plan and key[2:5] in {(M, N, K), (N, K, M)}:
                picks.append(f"{key[2]}x{key[4]}x{key[3]} s{key[5]},{key[6]}: candidate {plan.picked}")
        bench.row(model=name, tuned_ms=statistics.median(times["tuned"]), torch_mm_ms=statistics.median(times["torch_mm"]),
                  eager_ms=statistics.median(times["eager"]), tuned_min=min(times["tuned"]),
                  torch_mm_min=min(times["torch_mm"]), speedup=ratio,
                  tuned_vs_eager=statistics.median(a / b for a, b in zip(times["eager"], times["tuned"])),
                  picks="; ".join(picks))  # fmt: skip
        torch.cuda.empty_cache()
    bench.table(["model", "tuned_ms", "torch_mm_ms", "eager_ms", "tuned_min", "torch_mm_min", "speedup", "tuned_vs_eager",
                 "picks"], out=args.out)  # fmt: skip
    return 0


def _warm_gpu():
    """200 8192^3 GEMMs: the GPU at its loaded clock before timing (an idle H100 sits at 345 MHz)."""
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(200):
        w @ w
    torch.cuda.synchronize()


def _timed_calls(fn, reps: int, warm: int = 1) -> float:
    """Median CUDA-event time of reps calls (each call's events around it), after warm untimed calls."""
    for _ in range(warm):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev)


def _timed_block(fn, ms: float) -> float:
    """Milliseconds per call of fn run back to back for about `ms` ms between two events (the GPU
    never idles, so it settles at the clock its power limit allows: the state of a training run,
    where single timed calls after a pause see a boost clock)."""
    t0 = _timed_calls(fn, reps=2)
    n = max(3, round(ms / max(t0, 1e-3)))
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


def _cfg(r: dict) -> str:
    return (f"id {r['id']} tile {r['tile']} stages {r['stages']} splitK {r['splitk']} red {r['reduction']} "
            f"swz {r['swizzle']} ws {r.get('ws_mb', 0):.1f}MB")  # fmt: skip


if __name__ == "__main__":
    import sys

    sys.exit(main())
