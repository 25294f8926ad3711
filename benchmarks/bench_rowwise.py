"""Row-wise kernels: layer_norm, rms_norm (HF numerics), softmax — fwd, bwd and fwd+bwd, bf16.

    python -m benchmarks.bench_rowwise [--quick] [--ops softmax,rms_norm] [--out table.md]

Implementations: tritonize vs torch eager vs torch.compile vs Liger-Kernel (when installed).

Timing: median of CUDA events (triton.testing.do_bench, L2 flushed between runs).
- fwd:      y = f(x, ...) with inputs that require grad (the training-time forward).
- bwd:      torch.autograd.grad(y, inputs, dy, retain_graph=True) on one fixed graph (grads
            returned, never accumulated into .grad, so no extra add kernel is timed).
- fwd+bwd:  both, a fresh graph each time.

Bytes counted = the minimum traffic of the op, not what an implementation happens to move
(N = hidden size, R = rows, e = 2 bytes for bf16):
- layer_norm  fwd: read x, w, b; write y                    = 2*R*N*e + 2*N*e
              bwd: read x, dy, w; write dx, dw, db          = 3*R*N*e + 3*N*e
              (x is re-read rather than counting saved mean/rstd: 8 bytes/row, negligible)
- rms_norm    fwd: read x, w; write y                       = 2*R*N*e + N*e
              bwd: read x, dy, w; write dx, dw              = 3*R*N*e + 2*N*e
- softmax     fwd: read x; write y                          = 2*R*N*e
              bwd: read y, dy; write dx                     = 3*R*N*e
fwd+bwd counts the sum. GB/s = bytes / time; "% copy" = GB/s over the device-to-device copy
bandwidth (read + write) measured in this same run by `copy_bandwidth_gbps()`.
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.nn.functional as F

from benchmarks._common import Bench, copy_bandwidth_gbps, liger_available, parser, time_ms

SHAPES = [(16384, 1024), (8192, 4096), (4096, 8192), (4096, 32768)]
OPS = ("layer_norm", "rms_norm", "softmax")
EPS = 1e-5
DTYPE = torch.bfloat16


# --- torch references ------------------------------------------------------------------------


def torch_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def torch_rms_norm(x, w):
    # HF Llama/T5 RMSNorm: fp32 upcast, normalize, cast back, then the weight multiply
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * xf.to(x.dtype)


def torch_softmax(x):
    return torch.softmax(x, -1)


# --- implementations: op -> impl -> builder returning f(*inputs) ---------------------------------


def _ours(op):
    from tritonize import kernels as K

    if op == "layer_norm":
        f = K.layer_norm
        return lambda x, w, b: f(x, w, b, EPS)
    if op == "rms_norm":
        f = K.rms_norm
        return lambda x, w: f(x, w, EPS)
    f = K.softmax
    return lambda x: f(x, -1)


def _torch(op):
    return {"layer_norm": torch_layer_norm, "rms_norm": torch_rms_norm, "softmax": torch_softmax}[op]


_COMPILED = {}


def _compiled(op):
    # one compiled function per op; dynamic=False: each shape gets its own specialized kernels
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(_torch(op), dynamic=False)
    return _COMPILED[op]


def _liger(op):
    if op == "layer_norm":
        from liger_kernel.ops import LigerLayerNormFunction

        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
    if op == "rms_norm":
        from liger_kernel.ops import LigerRMSNormFunction

        # casting_mode="llama" is HF's Llama numerics; in_place=False: the default overwrites dy,
        # which would corrupt the repeated backward on a fixed graph.
        return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    from liger_kernel.ops import LigerSoftmaxFunction

    return lambda x: LigerSoftmaxFunction.apply(x)


def _inputs(op, r, n):
    x = torch.randn(r, n, device="cuda", dtype=DTYPE, requires_grad=True)
    if op == "softmax":
        return [x]
    w = (1 + 0.1 * torch.randn(n, device="cuda", dtype=DTYPE)).requires_grad_()
    if op == "rms_norm":
        return [x, w]
    b = (0.1 * torch.randn(n, device="cuda", dtype=DTYPE)).requires_grad_()
    return [x, w, b]


def _bytes(op, r, n):
    e = torch.finfo(DTYPE).bits // 8
    big = r * n * e
    small = {"layer_norm": (2, 3), "rms_norm": (1, 2), "softmax": (0, 0)}[op]
    fwd = 2 * big + small[0] * n * e
    bwd = 3 * big + small[1] * n * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def bench_one(b: Bench, op, shape, impl, build, copy_gbps, torch_ms, rep):
    r, n = shape
    sname = f"{r}x{n}"
    try:
        f = build(op)
        inputs = _inputs(op, r, n)
        dy = torch.randn(r, n, device="cuda", dtype=DTYPE)
        # warm up (compiles, autotunes) outside the timed region, and check it runs end to end
        torch.autograd.grad(f(*inputs), inputs, dy)
        y = f(*inputs)
        fns = {
            "fwd": lambda: f(*inputs),
            "bwd": lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(f(*inputs), inputs, dy),
        }
        nbytes = _bytes(op, r, n)
        for pas, fn in fns.items():
            ms = time_ms(fn, warmup=10, rep=rep)
            gbps = nbytes[pas] / (ms * 1e-3) / 1e9
            row = dict(op=op, shape=sname, impl=impl, **{"pass": pas}, ms=ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps)
            if impl == "torch":
                torch_ms[(op, sname, pas)] = ms
            elif (op, sname, pas) in torch_ms:
                row["vs_torch"] = torch_ms[(op, sname, pas)] / ms
            b.row(**row)
        del y, inputs, dy
    except Exception as e:  # one failing implementation must not lose the other rows
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(f"# {op} {sname} {impl} failed:\n{traceback.format_exc()}", file=sys.stderr)
        b.row(op=op, shape=sname, impl=impl, error=msg)
    torch.cuda.empty_cache()


SWEEP = [  # (max_block, loop_block, num_warps); None = the launcher's default
    (None, None, None),
    *[(None, None, w) for w in (4, 8, 16, 32)],
    (16384, 8192, None),
    (8192, 8192, None),
    (8192, 4096, None),
    (4096, 4096, None),
    (16384, 16384, 16),
]


def softmax_sweep(b: Bench, copy_gbps, rep):
    """Launch-config sweep of the softmax launchers (no autograd), to choose the defaults."""
    from tritonize.kernels import softmax as S

    for r, n in [(4096, 8192), (4096, 32768)]:
        x = torch.randn(r, n, device="cuda", dtype=DTYPE)
        dy = torch.randn_like(x)
        y = S.softmax_forward(x)
        nbytes = _bytes("softmax", r, n)
        for mb, lb, w in SWEEP:
            kw = dict(max_block=mb or S.MAX_BLOCK, loop_block=lb or S.LOOP_BLOCK, num_warps=w)
            cfg = f"max_block={kw['max_block']} loop_block={kw['loop_block']} warps={w or 'auto'}"
            for pas, fn in [
                ("fwd", lambda: S.softmax_forward(x, -1, **kw)),
                ("bwd", lambda: S.softmax_backward(y, dy, -1, **kw)),
            ]:
                try:
                    fn()
                    ms = time_ms(fn, warmup=10, rep=rep)
                    gbps = nbytes[pas] / (ms * 1e-3) / 1e9
                    b.row(op="softmax-sweep", shape=f"{r}x{n}", impl=cfg, **{"pass": pas}, ms=ms, gbps=gbps,
                          pct_copy=100 * gbps / copy_gbps)  # fmt: skip
                except Exception as e:
                    b.row(op="softmax-sweep", shape=f"{r}x{n}", impl=cfg, **{"pass": pas}, error=f"{type(e).__name__}: {e}"[:200])
        del x, dy, y
        torch.cuda.empty_cache()


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--impls", default="tritonize,torch,torch.compile,liger", help="comma-separated implementations")
    p.add_argument("--sweep", action="store_true", help="also sweep softmax launch configs (block caps, warps)")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        p.error(f"unknown op(s) {bad}; choose from {OPS}")
    if not torch.cuda.is_available():
        print("bench_rowwise needs a CUDA GPU; none found, nothing measured.")
        return 0

    builders = {"tritonize": _ours, "torch": _torch, "torch.compile": _compiled}
    if liger_available():
        builders["liger"] = _liger
    wanted = [i.strip() for i in args.impls.split(",")]
    builders = {k: v for k, v in builders.items() if k in wanted}
    # torch eager first: the others report their speed-up over it
    order = ["torch"] + [k for k in builders if k != "torch"]
    builders = {k: builders[k] for k in order if k in builders}

    shapes = SHAPES[1:3] if args.quick else SHAPES
    rep = 30 if args.quick else 60
    b = Bench("rowwise")
    copy_gbps = copy_bandwidth_gbps()
    b.row(op="copy", shape="1 GiB", impl="torch", **{"pass": "copy"}, gbps=copy_gbps, pct_copy=100.0)
    torch_ms = {}
    for op in ops:
        for shape in shapes:
            for impl, build in builders.items():
                bench_one(b, op, shape, impl, build, copy_gbps, torch_ms, rep)
    if args.sweep:
        softmax_sweep(b, copy_gbps, rep)
    cols = ["op", "shape", "impl", "pass", "ms", "gbps", "pct_copy", "vs_torch", "error"]
    text = b.table(cols, title="row-wise kernels, bf16 (GB/s = minimum traffic / time)")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
