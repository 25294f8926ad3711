"""Where a model's train step spends its time: GPU busy time vs wall time, top kernels, top host frames.

    python -m benchmarks.profile_model --model gpt2 --impl tritonize
    python -m benchmarks.profile_model --model llama --impl tritonize+inductor --stacks 30

A diagnostic, not a benchmark table: it answers "is this step bound by the GPU or by the host,
and by what". Per step it prints the wall time (CUDA events), the sum of GPU kernel time
(torch.profiler; kernels may overlap, so this is an upper bound of GPU busy time), the top
kernels by GPU time and the top Python functions by own host time (cProfile). `--stacks S`
dumps every thread's stack every S seconds during the first step (faulthandler): what a first
call that does not finish is doing.
"""

from __future__ import annotations

import argparse
import cProfile
import faulthandler
import io
import pstats
import sys
import time

import torch

from benchmarks.bench_models import FULL, IMPLS, QUICK, _fused_count, build_train_model, make_runner, train_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(FULL))
    p.add_argument("--impl", default="tritonize", choices=[i for i in IMPLS if i != "liger"])
    p.add_argument("--quick", action="store_true", help="tiny model (CPU smoke run)")
    p.add_argument("--exclude", default="", help="comma list of pattern names tritonize leaves alone")
    p.add_argument("--patterns", default="",
                   help="comma list of pattern names/families to apply (tritonize's patterns=; default all; "
                        "naming linear_act keeps it in rest='inductor')")
    p.add_argument("--trace", default="", help="write a Chrome trace (with Python stacks) of the profiled steps here")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--stacks", type=float, default=0.0, help="dump stacks every S seconds during the first step")
    p.add_argument("--cheap-errors", action="store_true", help="short Inductor lowering errors (see below)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="tritonize(cudagraphs=True), or torch.compile(mode='reduce-overhead')")
    p.add_argument("--sync-debug", action="store_true",
                   help="torch.cuda.set_sync_debug_mode('warn') after the warm-up: every call that "
                        "synchronizes the host with the GPU warns, with its stack (a host stall's cause)")
    args = p.parse_args(argv)

    spec = (QUICK if args.quick else FULL)[args.model]
    if spec["task"] != "train":
        p.error("profile_model profiles training steps (gpt2, llama)")
    model, ids, dev = build_train_model(args.model, args.quick)
    B, T = ids.shape
    impl = "compile+cudagraphs" if args.cudagraphs and args.impl == "torch.compile" else args.impl
    extra = {}
    if impl.startswith("tritonize"):
        extra = {"exclude": tuple(x for x in args.exclude.split(",") if x)}
        if args.patterns:
            extra["patterns"] = tuple(x for x in args.patterns.split(",") if x)
        if args.cudagraphs:
            extra["cudagraphs"] = True
    runner = make_runner(model, impl, **extra)
    step = train_step(runner, model, ids, dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    if args.cheap_errors:
        # Inductor formats a failed lowering's arguments with str() of the whole IR subtree, which
        # can take minutes (exponential in a DAG) and hide the error itself.
        import torch._inductor.exc as ind_exc

        ind_exc.operator_str = lambda target, args, kwargs: f"{target}(<{len(args)} args>)"
    if args.stacks > 0:
        faulthandler.dump_traceback_later(args.stacks, repeat=True, file=sys.stderr)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    faulthandler.cancel_dump_traceback_later()
    print(f"{args.model} {args.impl}: first step {first:.1f} s, fused sites {_fused_count(model, args.impl)}")
    if args.impl.startswith("tritonize"):
        from tritonize import report

        print(report(model))
        import importlib

        lce = importlib.import_module("tritonize.kernels.linear_cross_entropy")
        print("linear_cross_entropy custom-op (slow path) weight types:", lce.SLOW_PATH)
    for i in range(2, 6):  # single steps: a step that re-captures or re-records stands out
        t0 = time.perf_counter()
        step()
        sync()
        print(f"step {i}: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    from torch._dynamo.utils import counters

    if args.impl.startswith("tritonize"):
        # direct launches that fell back to Triton's own (slow) path, and why: a kernel that does so
        # every step costs 30-80 us of host time per call
        import pkgutil

        import tritonize.kernels as K
        from tritonize.kernels._launch import FastKernel

        for info in pkgutil.iter_modules(K.__path__):
            mod = sys.modules.get(f"tritonize.kernels.{info.name}")
            for name, fk in vars(mod).items() if mod is not None else ():
                if isinstance(fk, FastKernel) and fk.fallbacks:
                    print(f"fast-launch fallbacks {info.name}.{name}: {fk.fallbacks}")
    print("counters:", {k: dict(v) for k, v in counters.items() if v})

    if args.sync_debug and dev == "cuda":
        import warnings

        warnings.simplefilter("always")  # one warning per synchronizing call, not one per site
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
        sync()
    # Wall per step, and host time to issue one step when the GPU is not waited on. The host's
    # speed drifts on the lent machines (docs/benchmarks.md, session 6): print it beside the figure.
    from benchmarks._common import host_probe_us

    print(f"host probe {host_probe_us(20000)} us/op")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    host_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    print(f"wall {wall_ms:.2f} ms/step ({B * T / wall_ms:.1f} ktok/s); host returns after {host_ms:.2f} ms/step")

    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=bool(args.trace)) as prof:
            for _ in range(args.steps):
                step()
            sync()
        events = prof.key_averages()
        # device-only rows (kernels, memcpy/memset) have no CPU time; op rows repeat their kernels' time
        gpu_us = sum(e.self_device_time_total for e in events if e.cpu_time_total == 0) / args.steps
        print(f"GPU kernel time {gpu_us / 1e3:.2f} ms/step = {gpu_us / 1e3 / wall_ms:.0%} of wall "
              f"(sum of kernel durations; overlapping kernels count twice)")
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=70))
        # CUDA runtime/driver calls by host time: a call that blocks (cudaStreamSynchronize,
        # cudaMemcpy, cudaMalloc/cudaFree, a full launch queue) shows as a long cuda* row here
        agg = {}
        for e in prof.events():
            if e.name.startswith(("cuda", "cu")) and e.device_type == torch.autograd.DeviceType.CPU:
                d = e.time_range.elapsed_us()
                n, tot, mx = agg.get(e.name, (0, 0.0, 0.0))
                agg[e.name] = (n + 1, tot + d, max(mx, d))
        print("CUDA API calls by host time: name, calls/step, ms/step, longest call us")
        for name, (n, tot, mx) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"  {name:40s} {n / args.steps:8.1f} {tot / 1e3 / args.steps:9.2f} {mx:10.1f}")
        if args.trace:
            prof.export_chrome_trace(args.trace)
            print(f"trace written: {args.trace}")

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(args.steps):
        step()
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.top)
    print(f"cProfile, {args.steps} steps, by own time:\n" + s.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
