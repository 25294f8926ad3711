"""Host (CPU) time of one linear -> gelu_tanh fwd+bwd at GPT-2's MLP shape: where it goes.

    python -m benchmarks.host_linear_act [--rounds 7] [--tokens 8192]

On a host slower than the GPU, a fwd+bwd timed end to end (bench_linear_act's fwd_bwd_ms) is host
time; this script says how much host time each implementation spends and on what. Every row is
host time per call with the GPU kept busy (a queued torch.cuda._sleep), so no call ever waits for
the GPU: min and median over interleaved rounds, and the p10/p50/p90 of single calls.

Rows:
  eager / tritonize         F.gelu(F.linear(...)) / tritonize's linear_act, autograd.grad
  lean Function             a hand-written autograd.Function with the same kernels (cuBLASLt
                            forward, the element-wise backward launched on a bound entry, 2 torch.mm):
                            the floor of a Python autograd.Function that does this work
  floor Function            the same forward, a backward that only allocates the 3 gradients:
                            autograd's own cost (apply, saved tensors, the engine, its device thread)
  ... manual                the same kernels called in a row, no autograd at all
  [single-thread autograd]  under torch.autograd.set_multithreading_enabled(False): the backward
                            runs on the caller's thread instead of autograd's device thread

--segments adds a second table: tritonize's fwd+bwd split where the host time goes (median and
min per call): the forward call, autograd.grad up to our backward's entry (the engine, the hand-off
to its device thread), our backward's body, and its return up to autograd.grad's (the hand-off
back); eager's forward and autograd.grad beside. Our backward is wrapped (not copied), so the
split follows the code as shipped.

Session 12 (H100 hosts, docs/results/linear_act.md): the kernels called manually cost eager's
host time (85-97 us), but inside autograd tritonize's fwd+bwd cost ~100 us more than the lean
Function: a CUDA backward runs on autograd's device thread, where Python ran ~2x slower than on
the caller's. That led to the backward's bound launch planned in the forward (linear_act.py).
"""

from __future__ import annotations

import importlib
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks._common import Bench, parser


def lean_function(la, lt, plan, activation: str):
    """(Lean, lean_bwd): a bare autograd.Function doing linear_act's work with its kernels — the
    cuBLASLt forward (`lt.linear_act_epilogue`, looked up at each call so a caller may stub it),
    the element-wise backward on `plan`'s bound launch, two torch.mm. The floor for a Python
    Function doing this work (also used by host_python_linear_act, with the launches stubbed)."""
    M, N = plan.M, plan.N

    def lean_bwd(x, w, z, dy):
        db = x.new_empty((N,))
        dbp, cnt = la._db_scratch(x, plan.groups * N, plan.col_blocks)
        plan.launch(dy, z, z, db, dbp, cnt, M, N, N, 1, N)
        return torch.mm(z, w), torch.mm(z.t(), x), db

    class Lean(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            y, z = lt.linear_act_epilogue(x, w, b, activation, True)
            ctx.save_for_backward(x, w, z)
            return y

        @staticmethod
        def backward(ctx, dy):
            x, w, z = ctx.saved_tensors
            return lean_bwd(x, w, z, dy)

    return Lean, lean_bwd


def _host_us(fn, n: int, single_thread: bool):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(1_400_000 * n))  # ~0.7 ms of GPU per call queued ahead: launches never wait
    ts = []
    with torch.autograd.set_multithreading_enabled(not single_thread):
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return ts


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--segments", action="store_true", help="also split tritonize's fwd+bwd into segments")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 2
    if not torch.cuda.is_available():
        print("host_linear_act: needs a CUDA GPU (it times launches)")
        return 0
    la = importlib.import_module("tritonize.kernels.linear_act")
    lt = importlib.import_module("tritonize.kernels._cublaslt")
    from tritonize.kernels import linear_act

    M, K, N = args.tokens, 768, 3072
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5).requires_grad_()
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    if lt.linear_act_epilogue(xd, wd, bd, "gelu_tanh", True) is None:
        print("host_linear_act: cuBLASLt's epilogue is not available here; the lean rows need it")
        return 0
    # the element-wise backward as the library binds it (ACTIVATION, tiles, grid)
    plan = la._bwd_plan(xd, M, N, "gelu_tanh", True, True, True)

    Lean, lean_bwd = lean_function(la, lt, plan, "gelu_tanh")

    class Floor(Lean):
        @staticmethod
        def backward(ctx, dy):
            x, w, z = ctx.saved_tensors
            return x.new_empty(x.shape), w.new_empty(w.shape), w.new_empty((N,))

    def eager_manual():
        z = torch.addmm(bd, xd, wd.t())
        F.gelu(z, approximate="tanh")
        dz = torch.ops.aten.gelu_backward(dy, z, approximate="tanh")
        return dz.mm(wd), dz.t().mm(xd), dz.sum(0)

    def lean_manual():
        y, z = lt.linear_act_epilogue(xd, wd, bd, "gelu_tanh", True)
        return lean_bwd(xd, wd, z, dy)

    grads = (x, w, b)
    cases = {
        "eager": lambda: torch.autograd.grad(F.gelu(F.linear(x, w, b), approximate="tanh"), grads, dy),
        "tritonize": lambda: torch.autograd.grad(linear_act(x, w, b, activation="gelu_tanh"), grads, dy),
        "lean Function": lambda: torch.autograd.grad(Lean.apply(x, w, b), grads, dy),
        "floor Function": lambda: torch.autograd.grad(Floor.apply(x, w, b), grads, dy),
        "eager manual": eager_manual,
        "lean manual": lean_manual,
    }
    # the lean Function computes what tritonize does, bit for bit
    ref = torch.autograd.grad(linear_act(x, w, b, activation="gelu_tanh"), grads, dy)
    got = torch.autograd.grad(Lean.apply(x, w, b), grads, dy)
    assert all(torch.equal(a, c) for a, c in zip(ref, got)), "lean Function differs from tritonize"

    res: dict = {}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            for single in (False, True) if "manual" not in name else (False,):
                ts = _host_us(fn, 30, single)
                r = res.setdefault((name, single), ([], []))
                r[0].append(sum(ts) / len(ts) * 1e6)
                r[1].extend(t * 1e6 for t in ts)
    bench = Bench("host_linear_act")
    for (name, single), (means, calls) in res.items():
        q = statistics.quantiles(calls, n=10)
        autograd = "none" if "manual" in name else ("single-thread" if single else "multithreaded")
        bench.row(case=name, autograd=autograd, shape=f"{M}x{K}->{N}", min_us=min(means),
                  median_us=statistics.median(means), p10_call_us=q[0], p50_call_us=q[4], p90_call_us=q[8])  # fmt: skip
    bench.table(["case", "autograd", "shape", "min_us", "median_us", "p10_call_us", "p50_call_us", "p90_call_us"],
                title="host time per fwd+bwd, bf16 gelu_tanh (min / median of round means)", out=args.out)  # fmt: skip
    if args.segments:
        _segments(la, linear_act, x, w, b, dy, args)
    return 0


def _segments(la, linear_act, x, w, b, dy, args):
    """tritonize's fwd+bwd in four host segments (see the module docstring), eager's in two."""
    ns = time.perf_counter_ns
    marks: list = []
    fn_cls = la._LinearActFn
    shipped = fn_cls.backward

    def stamped(ctx, *grads):
        marks.append(ns())
        out = shipped(ctx, *grads)
        marks.append(ns())
        return out

    grads = (x, w, b)

    def ours():
        marks.append(ns())
        y = linear_act(x, w, b, activation="gelu_tanh")
        marks.append(ns())
        torch.autograd.grad(y, grads, dy)
        marks.append(ns())

    def eager():
        marks.append(ns())
        y = F.gelu(F.linear(x, w, b), approximate="tanh")
        marks.append(ns())
        torch.autograd.grad(y, grads, dy)
        marks.append(ns())

    names = {5: ("forward", "grad -> backward entry", "backward body", "backward return -> grad return"),
             3: ("forward", "autograd.grad")}  # fmt: skip
    res: dict = {}
    fn_cls.backward = staticmethod(stamped)
    try:
        for _ in range(args.rounds):
            for case, fn in (("tritonize", ours), ("eager", eager)):
                for single in (False, True):
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                    torch.cuda._sleep(int(1_400_000 * 30))  # the GPU kept busy: no call waits for it
                    with torch.autograd.set_multithreading_enabled(not single):
                        for _ in range(30):
                            marks.clear()
                            fn()
                            if case == "tritonize" and len(marks) != 5:
                                raise RuntimeError("segments: tritonize's backward did not run through _LinearActFn")
                            for seg, t0, t1 in zip(names[len(marks)], marks, marks[1:]):
                                res.setdefault((case, single, seg), []).append((t1 - t0) / 1e3)
                            res.setdefault((case, single, "total"), []).append((marks[-1] - marks[0]) / 1e3)
                    torch.cuda.synchronize()
    finally:
        fn_cls.backward = shipped
    bench = Bench("host_linear_act_segments")
    for (case, single, seg), us in res.items():
        bench.row(case=case, autograd="single-thread" if single else "multithreaded", segment=seg,
                  median_us=statistics.median(us), min_us=min(us))  # fmt: skip
    out = f"{os.path.splitext(args.out)[0]}_segments.md" if args.out else None
    bench.table(["case", "autograd", "segment", "median_us", "min_us"],
                title="host time per fwd+bwd by segment (per call, GPU kept busy)", out=out)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
