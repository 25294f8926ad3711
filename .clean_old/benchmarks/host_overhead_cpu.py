"""Python time per call of each op's eager fast path, on a CPU-only machine, Triton launches stubbed.

On the H100 host our row-wise ops are bound by CPU time at realistic sizes (docs/results/rowwise.md,
docs/results/overhead.md). This script isolates the part of that time that is *our* Python:

- `TRITON_INTERPRET=1` (set below, before triton is imported) makes `use_triton(cpu_tensor)` true,
  so every public op takes the same eager fast path (`torch.autograd.Function` + launchers) as a
  CUDA tensor does on the GPU;
- every Triton launch is stubbed: `run` of the interpreter's kernel object, of `Autotuner` and of
  `Heuristics` returns at once (and counts the launch), so no kernel executes and the outputs are
  uninitialised memory — only timings are taken, never values;
- tensors are tiny, so torch's own CPU ops (`torch.empty`, views, the cuBLAS stand-ins) cost their
  dispatch time only, as small ops do on the GPU host.

What is left is exactly the Python the launchers, checks and autograd wrappers run. The real
launch adds Triton's own host cost on top (`JITFunction.run`, ~30-40 us a launch on the H100
host), which is why the `launches` columns are printed: fewer launches is the other lever.

Columns: `fwd_us` / `fwd_bwd_us` are the fastest of `--repeats` samples of per-call microseconds (forward alone, and forward
+ backward through `torch.autograd.backward` with a preallocated upstream gradient);
`launches` = Triton launches per forward / per forward+backward. `torch` rows run the eager
torch equivalent on the same CPU tensors (its kernels do run: tiny shapes keep that small).

    python -m benchmarks.host_overhead_cpu                 # table of every op
    python -m benchmarks.host_overhead_cpu --ops layer_norm softmax --profile   # + cProfile top entries
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / tritonize are imported (read at import)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LAUNCHES = [0]


def stub_triton_launches():
    """Make every `kernel[grid](...)` return at once, counting it. Patched on the classes whose
    `run` a `kernel[grid]` call reaches first (the outermost wrapper: Autotuner / Heuristics wrap
    the interpreted function), so each launch is counted once."""
    from triton.runtime import autotuner, interpreter, jit

    def run(self, *args, **kwargs):
        LAUNCHES[0] += 1

    for cls in (interpreter.InterpretedFunction, autotuner.Autotuner, autotuner.Heuristics, jit.JITFunction):
        cls.run = run


def skip_cpu_only_checks():
    """`check_targets` range-checks CPU targets (a reduction and a host read); CUDA targets skip
    it (the kernel flags bad ones). Skipped here too, so the timings are those of the GPU path."""
    import importlib

    # by importlib: the package attributes of these names are the ops, not the modules
    for mod in ("cross_entropy", "linear_cross_entropy"):
        importlib.import_module(f"tritonize.kernels.{mod}").check_targets = lambda *args: None


def _median_us(fn, iters: int, repeats: int) -> float:
    for _ in range(max(iters // 10, 5)):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t) / iters * 1e6)
    # the fastest sample: on a shared CPU, other processes only ever add time
    return min(samples)


def _launches(fn) -> int:
    LAUNCHES[0] = 0
    fn()
    return LAUNCHES[0]


def cases(dtype=torch.float32):
    """{op: (ours, torch)}: each a zero-argument callable returning the output(s) to backprop."""
    import tritonize.kernels as K

    def p(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    def param(*shape):  # weights are nn.Parameters in a model (a tensor subclass: some paths check)
        return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))

    x = p(16, 64)
    r = p(16, 64)
    w = param(64)
    b = param(64)
    W = param(96, 64)
    Wb = param(96)
    Wu = param(96, 64)
    logits = p(16, 100)
    tgt = torch.randint(0, 100, (16,))
    Wv = param(100, 64)
    q, k, v = p(2, 4, 32, 16), p(2, 2, 32, 16), p(2, 2, 32, 16)  # GQA: 4 query heads, 2 kv heads

    def rms_torch(x, w):  # HF Llama numerics, as bench_overhead
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    return {
        "layer_norm": (lambda: K.layer_norm(x, w, b, 1e-5), lambda: F.layer_norm(x, (64,), w, b, 1e-5)),
        "add_layer_norm": (
            lambda: K.add_layer_norm(x, r, w, b, 1e-5),
            lambda: (lambda s: (F.layer_norm(s, (64,), w, b, 1e-5), s))(x + r),
        ),
        "rms_norm": (lambda: K.rms_norm(x, w, 1e-6), lambda: rms_torch(x, w)),
        "add_rms_norm": (lambda: K.add_rms_norm(x, r, w, 1e-6), lambda: (lambda s: (rms_torch(s, w), s))(x + r)),
        "softmax": (lambda: K.softmax(x, -1), lambda: torch.softmax(x, -1)),
        "dropout": (lambda: K.dropout(x, 0.1), lambda: F.dropout(x, 0.1)),
        "cross_entropy": (lambda: K.cross_entropy(logits, tgt), lambda: F.cross_entropy(logits.float(), tgt)),
        "linear_cross_entropy": (
            lambda: K.linear_cross_entropy(x, Wv, tgt),
            lambda: F.cross_entropy(F.linear(x, Wv).float(), tgt),
        ),
        "linear_act": (
            lambda: K.linear_act(x, W, Wb, "gelu_tanh"),
            lambda: F.gelu(F.linear(x, W, Wb), approximate="tanh"),
        ),
        "gated_linear": (lambda: K.gated_linear(x, W, Wu, "silu"), lambda: F.silu(F.linear(x, W)) * F.linear(x, Wu)),
        "attention": (
            lambda: K.attention(q, k, v, causal=True),
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        ),
    }


def _fwd_bwd(fn):
    """fn() + backward with preallocated upstream gradients (built once, outside the timing)."""
    out = fn()
    outs = out if isinstance(out, tuple) else (out,)
    grads = tuple(torch.ones_like(o) for o in outs)

    def step():
        o = fn()
        torch.autograd.backward(o if isinstance(o, tuple) else (o,), grads)

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="*", help="subset of ops (default: all)")
    ap.add_argument("--iters", type=int, default=200, help="calls per timing sample")
    ap.add_argument("--repeats", type=int, default=7, help="timing samples (the fastest is printed)")
    ap.add_argument("--profile", action="store_true", help="print cProfile top entries of ours (fwd+bwd)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    # The stubbed kernels leave their outputs uninitialised, and the matmuls of linear_act /
    # gated_linear / linear_cross_entropy's backward then read garbage: denormals there made one
    # 16x96x64 CPU mm cost ~100 us instead of ~3. Flushed to zero, the mm rows time the host path.
    torch.set_flush_denormal(True)
    stub_triton_launches()
    skip_cpu_only_checks()
    from tritonize.kernels import _common

    assert _common.INTERPRET, "TRITON_INTERPRET must be set before tritonize is imported"
    rows = []
    for name, (ours, ref) in cases().items():
        if args.ops and name not in args.ops:
            continue
        for impl, fn in (("tritonize", ours), ("torch", ref)):
            try:
                fb = _fwd_bwd(fn)
                row = {
                    "op": name,
                    "impl": impl,
                    "fwd_us": round(_median_us(fn, args.iters, args.repeats), 1),
                    "fwd_bwd_us": round(_median_us(fb, args.iters, args.repeats), 1),
                }
                if impl == "tritonize":
                    row["launches"] = f"{_launches(fn)} / {_launches(fb)}"
            except Exception as e:  # a broken op is a row, not a crash that loses the others
                row = {"op": name, "impl": impl, "error": f"{type(e).__name__}: {e}"[:200]}
            print(json.dumps({"bench": "host_overhead_cpu", **row}), flush=True)
            rows.append(row)
        if args.profile:
            fb = _fwd_bwd(ours)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(500):
                fb()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            print(f"# cProfile {name} (500 fwd+bwd)\n" + "\n".join(s.getvalue().splitlines()[:45]))

    cols = ["op", "impl", "fwd_us", "fwd_bwd_us", "launches", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = [
        f"### Python time per call, Triton launches stubbed (CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread)",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
