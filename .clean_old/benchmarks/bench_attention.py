"""Attention forward and forward+backward: tritonize vs SDPA (flash, efficient) vs naive.

    python -m benchmarks.bench_attention [--quick] [--out table.md]

bf16, B8 H16, T in {512, 2048, 8192}, D in {64, 128}, causal and not, plus a padding-mask case
(HF style: additive finfo.min on padded keys, causal). FLOPs: forward 4*B*H*Tq*Tk*D (two
matmuls), forward+backward 3.5x that (backward = 5 matmuls); causal counts half (the convention
of flash-attn's benchmarks), the padding case counts as causal (its padding is not discounted).
Peak memory: bytes allocated during one forward+backward above what existed before it.
The naive path (matmul -> softmax -> matmul) is skipped at T=8192, where its (B, H, T, T) scores
alone take 17 GB per copy.
"""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F

from benchmarks._common import Bench, matmul_tflops, parser, peak_memory_bytes, time_ms


def _naive(q, k, v, mask=None, causal=False):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        T = q.shape[-2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        s = s + mask
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, mask=None, causal=False):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    return run


def _impls():
    from torch.nn.attention import SDPBackend

    from tritonize.kernels import attention
    attention_mod = importlib.import_module("tritonize.kernels.attention")  # the module (the package exports the function)

    def customop(q, k, v, mask=None, causal=False):
        # every call through the registered custom ops (what torch.compile graphs call), to show
        # what the eager fast path saves
        attention_mod.EAGER_FAST_PATH = False
        try:
            return attention(q, k, v, mask=mask, causal=causal)
        finally:
            attention_mod.EAGER_FAST_PATH = True

    return {
        "tritonize": lambda q, k, v, mask=None, causal=False: attention(q, k, v, mask=mask, causal=causal),
        "tritonize_atomic_dq": lambda q, k, v, mask=None, causal=False: attention(
            q, k, v, mask=mask, causal=causal, deterministic=False
        ),
        "tritonize_customop": customop,
        "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "naive": _naive,
    }


def _padding_masks(B, T, device, dtype):
    """HF-style: (B, 1, 1, T) additive key-padding mask (random lengths >= T/2), and the (B, 1, T, T)
    causal+padding mask HF's sdpa path builds (what SDPA and the naive path get)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g).to(device)
    neg = torch.finfo(dtype).min
    keep = torch.arange(T, device=device)[None, :] < lengths[:, None]
    pad = torch.zeros(B, 1, 1, T, device=device, dtype=dtype).masked_fill(~keep[:, None, None, :], neg)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    full = torch.zeros(B, 1, T, T, device=device, dtype=dtype).masked_fill(~(causal[None, None] & keep[:, None, None, :]), neg)
    return pad, full


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU; none found, nothing measured.", file=sys.stderr)
        return 0
    bench = Bench("attention")
    dtype, B, H = torch.bfloat16, 8, 16
    ceiling = matmul_tflops()
    bench.row(op="ceiling", impl="bf16 matmul 8192^3", tflops=ceiling)
    Ts = (512, 2048) if args.quick else (512, 2048, 8192)
    Ds = (64,) if args.quick else (64, 128)
    cases = [(T, D, causal, "none") for T in Ts for D in Ds for causal in (False, True)]
    cases.append((2048, 64, True, "padding"))
    impls = _impls()
    for T, D, causal, mask_kind in cases:
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
        fwd_flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
        pad = full = None
        if mask_kind == "padding":
            pad, full = _padding_masks(B, T, "cuda", dtype)
        for name, fn in impls.items():
            if name == "tritonize_atomic_dq" and not (T == 2048 and causal and mask_kind == "none"):
                continue  # one data point per D for the deterministic/atomic choice
            if name == "tritonize_customop" and not (T == 512 and mask_kind == "none"):
                continue  # the dispatch cost only shows at short T
            shape = f"B{B} H{H} T{T} D{D}"
            base = dict(op="attention", impl=name, shape=shape, causal=causal, mask=mask_kind)
            if name == "naive" and T >= 8192:
                bench.row(**base, skipped="naive (B,H,T,T) scores would not fit / take minutes")
                continue
            if mask_kind == "padding":
                if name == "sdpa_flash":
                    bench.row(**base, skipped="flash backend takes no attn_mask")
                    continue
                if name.startswith("tritonize"):
                    kw = dict(mask=pad, causal=True)  # key-padding mask + causal block skipping
                else:
                    kw = dict(mask=full, causal=False)  # HF's combined 4-D mask
            else:
                kw = dict(causal=causal)

            def fwd():
                with torch.no_grad():
                    return fn(q, k, v, **kw)

            def fwd_bwd():
                out = fn(q, k, v, **kw)
                return torch.autograd.grad(out, (q, k, v), do)

            try:
                ms_f = time_ms(fwd)
                ms_fb = time_ms(fwd_bwd)
                peak = peak_memory_bytes(fwd_bwd)
                bench.row(
                    **base, fwd_ms=ms_f, fwd_tflops=fwd_flops / ms_f * 1e-9,
                    fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3.5 * fwd_flops / ms_fb * 1e-9,
                    pct_of_matmul=100 * 3.5 * fwd_flops / ms_fb * 1e-9 / ceiling, peak_mb=peak / 2**20,
                )
            except Exception as e:  # a failing impl is a row, never a crash that loses the others
                bench.row(**base, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
                torch.cuda.empty_cache()
        del q, k, v, do, pad, full
        torch.cuda.empty_cache()
    bench.table(
        ["impl", "shape", "causal", "mask", "fwd_tflops", "fwd_bwd_tflops", "fwd_bwd_ms", "peak_mb", "skipped", "error"],
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
