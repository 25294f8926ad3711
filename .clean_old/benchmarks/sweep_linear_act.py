"""Where the time of linear_act / gated_linear goes, and which forward tile config wins (H100).

    python -m benchmarks.sweep_linear_act [--warm] [--only gpt2,llama1b] [--out table.md]

At the three benchmark shapes of bench_linear_act (bf16, M=8192), one row each for:
  cublas_gemm        the forward GEMM(s) alone on cuBLAS (no activation): the forward's ceiling
  cublas+ew          FORWARD_IMPL="cublas": cuBLAS GEMM(s) writing Z (G, U), then the element-wise
                     epilogue kernel reading them back (what the forward costs without fusion)
  triton <config>    the Triton forward kernel with that tile config, launched directly (no
                     autotune), storing Y and Z (G, U) as the training forward does
  tma <config>       the same with TMA-descriptor tile loads (FORWARD_IMPL="tma")
  triton_raw <cfg>   the Triton GEMM with no activation and no Z store: the main loop alone
  bwd_total          linear_act_backward / gated_linear_backward (element-wise dZ kernel + cuBLAS)
  bwd_gemms          the backward's cuBLAS GEMMs alone; bwd_total - bwd_gemms = element-wise pass
--warm launches everything once and times nothing (fills Triton's cache; can run beside other
GPU work). Used to choose FORWARD_IMPL and the autotune lists in tritonize/kernels/linear_act.py.
"""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
import triton

from benchmarks._common import Bench, parser, time_ms

SHAPES = [  # name, K, N, activation, gated, bias (as bench_linear_act)
    ("gpt2", 768, 3072, "gelu_tanh", False, True),
    ("llama1b", 2048, 8192, "silu", True, False),
    ("llama8b", 4096, 14336, "silu", True, False),
]
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, stages, warps): the autotune lists and their neighbours
LINEAR_SWEEP = [
    (128, 256, 64, 8, 3, 8),
    (128, 256, 64, 8, 4, 8),
    (256, 128, 64, 8, 3, 8),
    (256, 128, 64, 8, 4, 8),
    (128, 128, 64, 8, 4, 8),
    (128, 128, 64, 8, 4, 4),
    (128, 128, 64, 8, 5, 4),
    (128, 256, 128, 8, 2, 8),
    (128, 128, 128, 8, 3, 8),
    (128, 256, 64, 16, 3, 8),
    (64, 256, 64, 8, 4, 4),
]
GATED_SWEEP = [
    (128, 128, 64, 8, 3, 8),
    (128, 128, 64, 8, 4, 8),
    (128, 128, 64, 8, 4, 4),
    (64, 256, 64, 8, 3, 8),
    (64, 256, 64, 8, 4, 8),
    (128, 64, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 8),
    (64, 128, 64, 8, 4, 4),
    (128, 128, 128, 8, 2, 8),
    (128, 128, 64, 16, 3, 8),
    (128, 256, 64, 8, 2, 8),
]

LINEAR_TMA_SWEEP = [
    (128, 256, 64, 8, 3, 8),
    (128, 256, 64, 8, 4, 8),
    (256, 128, 64, 8, 3, 8),
    (128, 128, 64, 8, 4, 8),
    (128, 128, 64, 8, 4, 4),
    (128, 256, 128, 8, 2, 8),
]
GATED_TMA_SWEEP = [
    (128, 128, 64, 8, 3, 8),
    (128, 128, 64, 8, 4, 8),
    (64, 256, 64, 8, 3, 8),
    (128, 64, 64, 8, 4, 4),
    (128, 128, 128, 8, 2, 8),
    (128, 256, 64, 8, 2, 8),
]


def _launch_linear(la, cfg, x, w, b, y, pre, act, store=True):
    bm, bn, bk, gm, st, wp = cfg
    M, K = x.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    la._linear_act_fwd_kernel.fn[grid](  # .fn: the heuristics-wrapped kernel, below the autotuner
        x, w, b if b is not None else y, y, pre, y, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1), 0, 0, la._m_bucket(M),
        ACTIVATION=act, HAS_BIAS=b is not None, STORE_PRE=store, GRAD_OUT=False, INPUT_PRECISION="tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_stages=st, num_warps=wp,
    )  # fmt: skip


def _launch_gated(la, cfg, x, wg, wu, out, g, u, act, store=True):
    bm, bn, bk, gm, st, wp = cfg
    M, K = x.shape
    N = wg.shape[0]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    la._gated_linear_fwd_kernel.fn[grid](
        x, wg, wu, out, g, u, M, N, K,
        x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1),
        out.stride(0), out.stride(1), la._m_bucket(M),
        ACTIVATION=act, STORE_GU=store, INPUT_PRECISION="tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_stages=st, num_warps=wp,
    )  # fmt: skip


def _launch_linear_tma(la, cfg, x, w, b, y, pre, act):
    bm, bn, bk, gm, st, wp = cfg
    M, K = x.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    xd, wd = la.TensorDescriptor.from_tensor(x, [bm, bk]), la.TensorDescriptor.from_tensor(w, [bn, bk])
    la._linear_act_fwd_tma_kernel.fn[grid](
        xd, wd, b if b is not None else y, y, pre, M, N, K, y.stride(0), y.stride(1), la._m_bucket(M),
        ACTIVATION=act, HAS_BIAS=b is not None, STORE_PRE=True,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_stages=st, num_warps=wp,
    )  # fmt: skip


def _launch_gated_tma(la, cfg, x, wg, wu, out, g, u, act):
    bm, bn, bk, gm, st, wp = cfg
    M, K = x.shape
    N = wg.shape[0]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    TD = la.TensorDescriptor
    la._gated_linear_fwd_tma_kernel.fn[grid](
        TD.from_tensor(x, [bm, bk]), TD.from_tensor(wg, [bn, bk]), TD.from_tensor(wu, [bn, bk]), out, g, u, M, N, K,
        out.stride(0), out.stride(1), la._m_bucket(M),
        ACTIVATION=act, STORE_GU=True,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_stages=st, num_warps=wp,
    )  # fmt: skip


def _cfg_name(c):
    return f"{c[0]}x{c[1]}x{c[2]} g{c[3]} s{c[4]} w{c[5]}"


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--warm", action="store_true", help="launch everything once, time nothing")
    p.add_argument("--only", default="", help="comma-separated shape names (gpt2, llama1b, llama8b); default all")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_linear_act needs a CUDA GPU; none found, nothing measured.", file=sys.stderr)
        return 0
    la = importlib.import_module("tritonize.kernels.linear_act")
    bench = Bench("linear_act_sweep")
    dtype, M = torch.bfloat16, 8192

    def measure(base, flops, fn):
        try:
            fn()
            torch.cuda.synchronize()
            if args.warm:
                return
            ms = time_ms(fn)
            bench.row(**base, ms=ms, tflops=flops / ms * 1e-9 if flops else None)
        except Exception as e:  # a config that does not compile (shared memory, registers) is a row
            bench.row(**base, error=f"{type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}")

    only = [n for n in args.only.split(",") if n]
    for name, K, N, act, gated, has_bias in SHAPES:
        if only and name not in only:
            continue
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        ws = [torch.randn(N, K, device="cuda", dtype=dtype) * K**-0.5 for _ in range(1 + gated)]
        b = torch.randn(N, device="cuda", dtype=dtype) if has_bias else None
        dy = torch.randn(M, N, device="cuda", dtype=dtype)
        fl = 2 * M * N * K * (1 + gated)
        row = lambda what: dict(model=name, shape=f"{M}x{K}->{N}", act=act, what=what)  # noqa: E731
        bufs = [torch.empty(M, N, device="cuda", dtype=dtype) for _ in range(3)]
        if gated:
            wg, wu = ws
            measure(row("cublas_gemm"), fl, lambda: (F.linear(x, wg), F.linear(x, wu)))
        else:
            (w,) = ws
            measure(row("cublas_gemm"), fl, lambda: F.linear(x, w, b))
        saved = la.FORWARD_IMPL
        la.FORWARD_IMPL = "cublas"
        try:
            if gated:
                measure(row("cublas+ew"), fl, lambda: la.gated_linear_forward(x, wg, wu, act, True))
            else:
                measure(row("cublas+ew"), fl, lambda: la.linear_act_forward(x, w, b, act, True))
        finally:
            la.FORWARD_IMPL = saved
        for cfg in GATED_SWEEP if gated else LINEAR_SWEEP:
            if gated:
                measure(row(f"triton {_cfg_name(cfg)}"), fl, lambda: _launch_gated(la, cfg, x, wg, wu, *bufs, act))
            else:
                measure(row(f"triton {_cfg_name(cfg)}"), fl, lambda: _launch_linear(la, cfg, x, w, b, *bufs[:2], act))
        for cfg in GATED_TMA_SWEEP if gated else LINEAR_TMA_SWEEP:
            if gated:
                measure(row(f"tma {_cfg_name(cfg)}"), fl, lambda: _launch_gated_tma(la, cfg, x, wg, wu, *bufs, act))
            else:
                measure(row(f"tma {_cfg_name(cfg)}"), fl, lambda: _launch_linear_tma(la, cfg, x, w, b, *bufs[:2], act))
        raw = (GATED_SWEEP if gated else LINEAR_SWEEP)[0]
        if gated:
            measure(row(f"triton_raw {_cfg_name(raw)}"), fl, lambda: _launch_gated(la, raw, x, wg, wu, *bufs, "none", False))
        else:
            measure(row(f"triton_raw {_cfg_name(raw)}"), fl, lambda: _launch_linear(la, raw, x, w, None, *bufs[:2], "none", False))
        # backward: the element-wise pass rewrites the saved tensor(s) in place on every call,
        # so repeated calls keep the same memory traffic (values stay bounded: |act'| <= 1.2)
        if gated:
            _, g, u = la.gated_linear_forward(x, wg, wu, act, True)
            measure(row("bwd_total"), 2 * fl, lambda: la.gated_linear_backward(dy, x, wg, wu, g, u, act, True, True))
            measure(row("bwd_gemms"), 2 * fl, lambda: (torch.mm(g, wg).addmm_(u, wu), g.t() @ x, u.t() @ x))
        else:
            _, z = la.linear_act_forward(x, w, b, act, True)
            measure(row("bwd_total"), 2 * fl, lambda: la.linear_act_backward(dy, x, w, b, z, act, True, True, True))
            measure(row("bwd_gemms"), 2 * fl, lambda: (torch.mm(z, w), z.t() @ x))
        del x, ws, b, dy, bufs
        torch.cuda.empty_cache()
    if args.warm:
        return 0
    text = bench.table(["model", "shape", "act", "what", "ms", "tflops", "error"])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
