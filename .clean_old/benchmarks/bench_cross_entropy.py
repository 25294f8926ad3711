"""Cross-entropy and fused linear cross-entropy, fwd+bwd, bf16: tritonize vs torch eager vs
torch.compile vs Liger (when installed).

    python -m benchmarks.bench_cross_entropy [--quick] [--out table.md] [--no-compile] [--no-sweep]

cross_entropy at (N=8192, V=32000) and (8192, 128256): time, effective GB/s (the minimal traffic:
the logits read once and the gradient written once) against the copy bandwidth measured in the
same run, and peak memory above the inputs. tritonize runs with inplace=True (what the fuser uses
when the logits are dead) and without. A few block/warp configurations of our kernel are timed
too (impl "tritonize[block,warps]", the kernel pair alone, in place, no autograd) so the default
can be checked on this GPU; more vocabularies in the sweep rows (op "ce_sweep", N=4096).

linear_cross_entropy at N=8192, V=128256, H=2048 and 4096: time, TFLOP/s (6 N H V: logits,
dhidden, dweight) against the bf16 matmul ceiling, peak memory above the inputs (the gradients
themselves count: every implementation returns them). Our chunk size is swept too (impl
"tritonize (chunk C)"): the chunk's logits (C x V) are the only transient, and dW's in-place
accumulation (read + write of V x H per chunk) is memory-bound below C ~ 500. "tritonize (lean)"
is chunk_size="lean": Liger's chunk buffer, twice the rows over half the vocabulary at a time.
"""

from __future__ import annotations

import contextlib
import gc
import sys

import torch
import torch.nn.functional as F

from benchmarks._common import (
    Bench,
    copy_bandwidth_gbps,
    liger_available,
    matmul_tflops,
    parser,
    peak_memory_bytes,
    time_ms,
    try_compile,
)

CE_SHAPES = [(8192, 32000), (8192, 128256)]
LCE_SHAPES = [(8192, 2048, 128256), (8192, 4096, 128256)]
CE_CONFIGS = [(32768, 32), (32768, 16), (16384, 32), (16384, 16), (16384, 8), (8192, 16), (8192, 8), (4096, 8)]
SWEEP_VOCABS = [32000, 50257, 128256, 151936, 262144]  # Llama-2, GPT-2, Llama-3, Qwen2, Gemma-3
LCE_CHUNKS = [256, 512, 1024, 2048]


@contextlib.contextmanager
def custom_op_path(module_name: str):
    """Force the registered custom-op path (what compiled graphs call) instead of the eager fast
    path, to show what the dispatch layers cost."""
    mod = sys.modules[module_name]
    saved = mod.eager_fast_path
    mod.eager_fast_path = lambda _x: False
    try:
        yield
    finally:
        mod.eager_fast_path = saved


def _measure(b: Bench, fn, reset, derive, **fields):
    """Time and peak memory of fn() (fwd+bwd); derive(ms) -> throughput fields. A failure
    becomes a row with an error field."""
    try:
        reset()
        fn()  # warm-up / compile
        torch.cuda.synchronize()
        ms = time_ms(lambda: (reset(), fn()))
        reset()
        peak = peak_memory_bytes(fn)
        reset()
        return b.row(**fields, ms=ms, **derive(ms), extra_gb=peak / 1e9)
    except Exception as e:  # a failing implementation is a row, never a crash
        reset()
        gc.collect()
        torch.cuda.empty_cache()
        return b.row(**fields, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")


def bench_ce(b: Bench, quick: bool, bw: float, no_compile: bool = False):
    from tritonize.kernels import cross_entropy
    from tritonize.kernels.cross_entropy import cross_entropy_backward, cross_entropy_forward, divisor_for

    shapes = CE_SHAPES[-1:] if quick else CE_SHAPES
    for n, v in shapes:
        torch.manual_seed(0)
        x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_()
        t = torch.randint(0, v, (n,), device="cuda")
        nbytes = 2 * x.numel() * x.element_size()
        shape = f"{n}x{v}"

        def reset():
            x.grad = None

        def derive(ms):
            gbps = nbytes / (ms * 1e-3) / 1e9
            return {"gbps": gbps, "pct_copy_bw": 100 * gbps / bw}

        def add(impl, fn):
            _measure(b, fn, reset, derive, op="cross_entropy", impl=impl, shape=shape)

        # in place overwrites x with gradients each call: values stay finite, timing unaffected
        add("tritonize (inplace)", lambda: cross_entropy(x, t, inplace=True).backward())
        add("tritonize", lambda: cross_entropy(x, t).backward())
        if not quick:
            with custom_op_path("tritonize.kernels.cross_entropy"):
                add("tritonize (custom op)", lambda: cross_entropy(x, t).backward())
        add("torch eager", lambda: F.cross_entropy(x, t).backward())
        compiled = None if no_compile else try_compile(lambda a, b_: F.cross_entropy(a, b_))
        if compiled is not None:
            add("torch.compile", lambda: compiled(x, t).backward())
        if liger_available():
            try:
                from liger_kernel.transformers import LigerCrossEntropyLoss

                liger = LigerCrossEntropyLoss()
                add("liger", lambda: liger(x, t).backward())
            except Exception as e:
                b.row(op="cross_entropy", impl="liger", shape=shape, error=f"{type(e).__name__}: {e}"[:200])
        if not quick:
            # our kernel alone (fwd writing the gradient in place + the backward scale by 1.0)
            x2 = x.detach()
            one = torch.ones((), device="cuda").expand(n)
            for blk, warps in CE_CONFIGS:
                if blk > 2 * triton_next_pow2(v):
                    continue

                def run(blk=blk, warps=warps):
                    div = divisor_for(t, -100, "mean", None)
                    cross_entropy_forward(x2, t, divisor=div, grad=x2, block=blk, num_warps=warps)
                    cross_entropy_backward(x2, one)

                add(f"tritonize[{blk},{warps}]", run)
        del x, t
        gc.collect()
        torch.cuda.empty_cache()


def ce_sweep(b: Bench, bw: float, n: int = 4096):
    """Kernel pair alone (fwd in place + the bwd scale by 1) per (BLOCK, warps) and vocabulary:
    the data the default launch table (cross_entropy._fwd_config) is chosen from."""
    from tritonize.kernels.cross_entropy import _fwd_config, cross_entropy_backward, cross_entropy_forward, divisor_for

    for v in SWEEP_VOCABS:
        torch.manual_seed(0)
        x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
        t = torch.randint(0, v, (n,), device="cuda")
        one = torch.ones((), device="cuda").expand(n)
        nbytes = 2 * x.numel() * x.element_size()
        default = _fwd_config(v, 32768)
        for blk, warps in CE_CONFIGS:
            if blk > 2 * triton_next_pow2(v):
                continue

            def run(blk=blk, warps=warps):
                div = divisor_for(t, -100, "mean", None)
                cross_entropy_forward(x, t, divisor=div, grad=x, block=blk, num_warps=warps)
                cross_entropy_backward(x, one)

            try:
                run()
                ms = time_ms(run, warmup=10, rep=40)
                gbps = nbytes / (ms * 1e-3) / 1e9
                b.row(op="ce_sweep", impl=f"[{blk},{warps}]" + (" default" if (blk, warps) == default else ""),
                      shape=f"{n}x{v}", ms=ms, gbps=gbps, pct_copy_bw=100 * gbps / bw)  # fmt: skip
            except Exception as e:
                b.row(op="ce_sweep", impl=f"[{blk},{warps}]", shape=f"{n}x{v}", error=f"{type(e).__name__}: {e}"[:200])
        del x, t
        gc.collect()
        torch.cuda.empty_cache()


def triton_next_pow2(v: int) -> int:
    return 1 << (max(v, 1) - 1).bit_length()


def bench_lce(b: Bench, quick: bool, peak_tflops: float, no_compile: bool = False):
    from tritonize.kernels import linear_cross_entropy

    shapes = LCE_SHAPES[-1:] if quick else LCE_SHAPES
    for n, h, v in shapes:
        torch.manual_seed(0)
        hid = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
        w = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * h**-0.5).requires_grad_()
        t = torch.randint(0, v, (n,), device="cuda")
        flops = 6 * n * h * v
        shape = f"N{n} H{h} V{v}"

        def reset():
            hid.grad = None
            w.grad = None

        def derive(ms):
            tflops = flops / (ms * 1e-3) / 1e12
            return {"tflops": tflops, "pct_matmul": 100 * tflops / peak_tflops}

        def add(impl, fn):
            _measure(b, fn, reset, derive, op="linear_cross_entropy", impl=impl, shape=shape)

        def eager(a, ww, tt):
            return F.cross_entropy(F.linear(a, ww), tt)

        add("tritonize", lambda: linear_cross_entropy(hid, w, t).backward())
        if not quick:
            with custom_op_path("tritonize.kernels.linear_cross_entropy"):
                add("tritonize (custom op)", lambda: linear_cross_entropy(hid, w, t).backward())
            for c in LCE_CHUNKS:
                add(f"tritonize (chunk {c})", lambda c=c: linear_cross_entropy(hid, w, t, chunk_size=c).backward())
        # the least memory (Liger's chunk buffer), vocabulary slices: always run (the quick run too)
        add("tritonize (lean)", lambda: linear_cross_entropy(hid, w, t, chunk_size="lean").backward())
        add("torch eager", lambda: eager(hid, w, t).backward())
        compiled = None if no_compile else try_compile(eager)
        if compiled is not None:
            add("torch.compile", lambda: compiled(hid, w, t).backward())
        if liger_available():
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

                liger = LigerFusedLinearCrossEntropyLoss()
                add("liger", lambda: liger(w, hid, t).backward())
            except Exception as e:
                b.row(op="linear_cross_entropy", impl="liger", shape=shape, error=f"{type(e).__name__}: {e}"[:200])
        del hid, w, t
        gc.collect()
        torch.cuda.empty_cache()


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (saves compile time)")
    p.add_argument("--no-sweep", action="store_true", help="skip the block/warps sweep over vocabularies")
    p.add_argument("--only", choices=("ce", "lce"), default=None, help="run one of the two parts")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cross_entropy: needs a CUDA GPU; none found, nothing measured.", file=sys.stderr)
        return 0
    b = Bench("cross_entropy")
    bw = copy_bandwidth_gbps()
    tf = matmul_tflops()
    b.row(op="ceiling", impl="copy bandwidth", gbps=bw)
    b.row(op="ceiling", impl="bf16 matmul 8192^3", tflops=tf)
    if args.only in (None, "ce"):
        bench_ce(b, args.quick, bw, args.no_compile)
        if not (args.quick or args.no_sweep):
            ce_sweep(b, bw)
    if args.only in (None, "lce"):
        bench_lce(b, args.quick, tf, args.no_compile)
    b.table(["op", "impl", "shape", "ms", "gbps", "pct_copy_bw", "tflops", "pct_matmul", "extra_gb", "error"],
            out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
