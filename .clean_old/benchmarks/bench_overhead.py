"""Host (Python + launch) time per call of each op, on tiny inputs where GPU time is negligible.

Models such as GPT-2 124M run many small ops, where a step is bound by how fast the host issues
kernels, not by the GPU. This prints microseconds per forward and per forward+backward for ours
vs torch eager, and (with --profile) the top cProfile entries of ours, to show where the time goes.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from benchmarks._common import Bench, parser


def _per_call_us(fn, iters=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e6


def cases():
    import tritonize.kernels as K

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(64, 256, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(256, device=dev, dtype=dt, requires_grad=True)
    b = torch.randn(256, device=dev, dtype=dt, requires_grad=True)
    W = torch.randn(512, 256, device=dev, dtype=dt, requires_grad=True)
    Wb = torch.randn(512, device=dev, dtype=dt, requires_grad=True)
    q = torch.randn(1, 4, 64, 64, device=dev, dtype=dt, requires_grad=True)
    logits = torch.randn(64, 1000, device=dev, dtype=dt, requires_grad=True)
    tgt = torch.randint(0, 1000, (64,), device=dev)

    def rms_torch(x, w):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    return {
        "layer_norm": (lambda: K.layer_norm(x, w, b, 1e-5), lambda: F.layer_norm(x, (256,), w, b, 1e-5)),
        "rms_norm": (lambda: K.rms_norm(x, w, 1e-6), lambda: rms_torch(x, w)),
        "softmax": (lambda: K.softmax(x, -1), lambda: torch.softmax(x, -1)),
        "linear_act": (lambda: K.linear_act(x, W, Wb, "gelu_tanh"), lambda: F.gelu(F.linear(x, W, Wb), approximate="tanh")),
        "attention": (lambda: K.attention(q, q, q, causal=True), lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)),
        "cross_entropy": (lambda: K.cross_entropy(logits, tgt), lambda: F.cross_entropy(logits.float(), tgt)),
    }


def main():
    p = parser(__doc__)
    p.add_argument("--profile", action="store_true", help="print cProfile top entries of ours")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_overhead: needs a CUDA GPU; nothing measured")
        return
    bench = Bench("overhead")
    for name, (ours, ref) in cases().items():
        for impl, fn in (("tritonize", ours), ("torch", ref)):
            fwd = _per_call_us(lambda: fn())
            fb = _per_call_us(lambda: fn().float().sum().backward())
            bench.row(op=name, impl=impl, fwd_us=fwd, fwd_bwd_us=fb)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                ours().float().sum().backward()
            torch.cuda.synchronize()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
            print(f"# cProfile {name} (100 fwd+bwd)\n" + "\n".join(s.getvalue().splitlines()[:40]))
    bench.table(["op", "impl", "fwd_us", "fwd_bwd_us"], title="host time per call (tiny inputs)", out=args.out)


if __name__ == "__main__":
    main()
