"""Cross-entropy and fused linear cross-entropy, fwd+bwd, bf16: tritonize vs torch eager vs
torch.compile vs Liger (when installed).

    python -m benchmarks.bench_cross_entropy [--quick] [--out table.md]

cross_entropy at (N=8192, V=32000) and (8192, 128256): time, effective GB/s (the minimal traffic:
the logits read once and the gradient written once) against the copy bandwidth measured in the
same run, and peak memory above the inputs. tritonize runs with inplace=True (what the fuser uses
when the logits are dead) and without. A few block/warp configurations of our kernel are timed
too (impl "tritonize[block,warps]") so the default can be checked on this GPU.

linear_cross_entropy at N=8192, V=128256, H=2048 and 4096: time, TFLOP/s (6 N H V: logits,
dhidden, dweight) against the bf16 matmul ceiling, peak memory above the inputs (the gradients
themselves count: every implementation returns them).
"""

from __future__ import annotations

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
CE_CONFIGS = [(32768, 32), (16384, 32), (16384, 16), (8192, 16)]  # (BLOCK, num_warps) of ours


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


def bench_ce(b: Bench, quick: bool, bw: float):
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
        add("torch eager", lambda: F.cross_entropy(x, t).backward())
        compiled = try_compile(lambda a, b_: F.cross_entropy(a, b_))
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
                if blk > 2 * v:
                    continue

                def run(blk=blk, warps=warps):
                    div = divisor_for(t, -100, "mean", None)
                    cross_entropy_forward(x2, t, divisor=div, grad=x2, block=blk, num_warps=warps)
                    cross_entropy_backward(x2, one)

                add(f"tritonize[{blk},{warps}]", run)
        del x, t
        gc.collect()
        torch.cuda.empty_cache()


def bench_lce(b: Bench, quick: bool, peak_tflops: float):
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
            add("tritonize (chunk 1024)", lambda: linear_cross_entropy(hid, w, t, chunk_size=1024).backward())
        add("torch eager", lambda: eager(hid, w, t).backward())
        compiled = try_compile(eager)
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
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cross_entropy: needs a CUDA GPU; none found, nothing measured.", file=sys.stderr)
        return 0
    b = Bench("cross_entropy")
    bw = copy_bandwidth_gbps()
    tf = matmul_tflops()
    b.row(op="ceiling", impl="copy bandwidth", gbps=bw)
    b.row(op="ceiling", impl="bf16 matmul 8192^3", tflops=tf)
    bench_ce(b, args.quick, bw)
    bench_lce(b, args.quick, tf)
    text = b.table(["op", "impl", "shape", "ms", "gbps", "pct_copy_bw", "tflops", "pct_matmul", "extra_gb", "error"])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
