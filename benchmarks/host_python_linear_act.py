"""The Python time of linear_act's fwd+bwd above its launches, on any machine (CPU included).

    TRITON_INTERPRET=1 python -m benchmarks.host_python_linear_act [--rounds 7] [--calls 2000]

host_linear_act times the whole host path on a GPU (launches, cuBLASLt through ctypes, autograd's
device thread). This one isolates the part that is ours alone and that no GPU is needed to
measure: the launches are stubbed (the cuBLASLt forward returns preallocated Y, Z; the backward's
bound launch does nothing; the two torch.mm are real, on a tiny shape), so every row is Python and
torch dispatch above the kernels. Rows (us per call, median and min over interleaved rounds;
over_ref_us is the median over rounds of the row minus its reference in the same round):

  lean Function        a bare autograd.Function calling the same (stubbed) forward and backward:
                       the floor for a Python Function doing this work
  tritonize            the public linear_act, autograd.grad
  _LinearActFn C apply our Function called past the public wrapper (its checks and dispatch)
  no-grad forward      linear_act under no_grad, against the stubbed cuBLASLt call alone: the
                       public wrapper's checks and dispatch plus linear_act_forward's

The GPU host runs the same Python slower (session 13: 1.5-2x by the host probe), so read the
differences between rows, not the absolute numbers, and confirm on the GPU with host_linear_act.
"""

from __future__ import annotations

import importlib
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors take the Triton path, as on a GPU

import torch  # noqa: E402

from benchmarks._common import Bench, parser  # noqa: E402
from benchmarks.host_linear_act import lean_function  # noqa: E402


def _per_call_us(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 2, 200
    la = importlib.import_module("tritonize.kernels.linear_act")
    lt = importlib.import_module("tritonize.kernels._cublaslt")
    common = importlib.import_module("tritonize.kernels._common")
    if not common.INTERPRET:
        print("host_python_linear_act: run it with TRITON_INTERPRET=1 (set before torch/triton import)")
        return 0
    linear_act = la.linear_act

    M, K, N, act = 16, 8, 24, "gelu_tanh"
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True)
    dy = torch.randn(M, N)
    Y, Z = torch.randn(M, N), torch.randn(M, N)

    def epilogue(x2, weight, bias, activation, store_pre):  # the cuBLASLt forward, stubbed
        return Y, (Z if store_pre else None)

    saved = (la.FORWARD_IMPL, lt.linear_act_epilogue)
    la.FORWARD_IMPL, lt.linear_act_epilogue = "cublaslt", epilogue
    # the backward's plan, as the forward looks it up (the same cached object), its launch stubbed
    plan = la._bwd_plan(x.detach(), M, N, act, True, True, True)
    real_launch, plan.launch = plan.launch, (lambda *a: None)
    try:
        Lean, _ = lean_function(la, lt, plan, act)  # the bare Function host_linear_act times on the GPU
        c_apply = common._FUNCTION_BASE_APPLY.__get__(None, la._LinearActFn)
        grads = (x, w, b)
        xd, wd, bd = x.detach(), w.detach(), b.detach()
        cases = {
            "lean Function": lambda: torch.autograd.grad(Lean.apply(x, w, b), grads, dy),
            "tritonize": lambda: torch.autograd.grad(linear_act(x, w, b, act), grads, dy),
            "_LinearActFn C apply": lambda: torch.autograd.grad(c_apply(x, w, b, (act, True)), grads, dy),
            "no-grad forward": lambda: linear_act(xd, wd, bd, act),
            "no-grad epilogue only": lambda: lt.linear_act_epilogue(xd, wd, bd, act, False),
        }
        res = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                res[name].append(_per_call_us(fn, args.calls))
    finally:
        la.FORWARD_IMPL, lt.linear_act_epilogue = saved
        plan.launch = real_launch
    bench = Bench("host_python_linear_act")
    for name, v in res.items():
        ref = "lean Function" if "forward" not in name and "epilogue" not in name else "no-grad epilogue only"
        # the difference per round (the rows of a round ran back to back), then its median: steadier
        # than the difference of medians when the machine drifts
        over = statistics.median(a - r for a, r in zip(v, res[ref]))
        bench.row(case=name, median_us=statistics.median(v), min_us=min(v), over_ref_us=over, ref=ref)
    bench.table(["case", "median_us", "min_us", "over_ref_us", "ref"],
                title=f"Python per call above stubbed launches, {act} {M}x{K}->{N} (CPU: {os.cpu_count()} cores)", out=args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
