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

Two more columns, from a second "queued" measurement (`queued_time`): the GPU is first given
~20 ms of work (torch.cuda._sleep), so the CPU enqueues all the timed calls before the GPU
reaches them, as in a training step where the CPU runs ahead of the GPU.
- gpu_ms: device time per call with no launch gaps (what the op costs inside a step whose
  other ops, e.g. GEMMs, keep the GPU busy while Python launches this one);
- cpu_us: CPU time per call (Python + launches). `ms` above is the standard do_bench figure,
  which starts each call with an idle GPU and so includes any launch time the GPU waits for:
  when cpu_us/1000 > gpu_ms the op is launch-bound in isolation.

torch.compile rows: `torch._functorch.config.donated_buffer = False` below. With donated
buffers (the default) a compiled backward may reuse the saved activations' memory, so it refuses
a second backward through the same graph; the "bwd" row replays one fixed graph
(retain_graph=True), which it then rejects. Turning the option off only costs that memory reuse
(an allocation, not a kernel), so the timed kernels are the same as in a training step.

`--sweep` times launch alternatives of our kernels (gpu_ms of the launchers, no autograd) to
choose the defaults in tritonize/kernels/_norm_common.py and softmax.py.
"""

from __future__ import annotations

import importlib
import sys
import time
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


SLEEP_CYCLES = 40_000_000  # ~20 ms at H100 clocks: longer than the CPU takes to enqueue the calls


def queued_time(fn, iters: int = 20):
    """(gpu_ms, cpu_us, ok): device time and CPU time per call of fn with the GPU kept busy.

    torch.cuda._sleep queues SLEEP_CYCLES of GPU work first, so the CPU enqueues all `iters` calls
    before the GPU reaches the first: the events then time the kernels back to back (no L2 flush
    between calls; inputs of 32+ MB mostly miss L2 anyway). ok is False when the CPU took longer
    than the sleep, i.e. gpu_ms may still include launch gaps.
    """
    fn()
    torch.cuda.synchronize()
    before, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    before.record()
    torch.cuda._sleep(SLEEP_CYCLES)
    start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    cpu_s = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    gpu_ms = start.elapsed_time(end) / iters
    # the sleep must still have been running when the CPU finished enqueueing
    return gpu_ms, cpu_s / iters * 1e6, cpu_s * 1e3 < before.elapsed_time(start)


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
            gpu_ms, cpu_us, ok = queued_time(fn)
            row = dict(op=op, shape=sname, impl=impl, **{"pass": pas}, ms=ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps,
                       gpu_ms=gpu_ms, gpu_pct_copy=100 * nbytes[pas] / (gpu_ms * 1e-3) / 1e9 / copy_gbps,
                       cpu_us=cpu_us)  # fmt: skip
            if not ok:
                row["note"] = "cpu slower than the queued sleep: gpu_ms includes launch gaps"
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


def _sweep_row(b, op, shape, cfg, pas, fn, nbytes, copy_gbps):
    try:
        gpu_ms, cpu_us, ok = queued_time(fn, iters=10)
        b.row(op=op + "-sweep", shape=f"{shape[0]}x{shape[1]}", impl=cfg, **{"pass": pas}, gpu_ms=gpu_ms,
              gpu_pct_copy=100 * nbytes / (gpu_ms * 1e-3) / 1e9 / copy_gbps, cpu_us=cpu_us,
              **({} if ok else {"note": "launch-bound"}))  # fmt: skip
    except Exception as e:  # a config that fails to compile is a row, not a crash
        b.row(op=op + "-sweep", shape=f"{shape[0]}x{shape[1]}", impl=cfg, **{"pass": pas},
              error=f"{type(e).__name__}: {e}"[:200])  # fmt: skip


def norm_sweep(b: Bench, copy_gbps):
    """Launch alternatives of the LayerNorm / RMSNorm launchers, timed on the GPU only.

    Knobs (tritonize/kernels/_norm_common.py): CONFIG_OVERRIDE[(kind, BLOCK_N)] = (ROWS, warps)
    for the register-resident kernels; BWD_PROGRAMS_PER_SM (persistent backward grid);
    LN_FWD_FUSED_MAX / FWD_LOOP / BWD_LOOP / LOOP_PROGRAMS_PER_SM for 32K-wide rows.
    """
    from tritonize.kernels import _norm_common as nc
    from tritonize.kernels.layer_norm import layer_norm_backward, layer_norm_forward
    from tritonize.kernels.rms_norm import rms_norm_backward, rms_norm_forward

    saved = {k: getattr(nc, k) for k in ("LN_FWD_FUSED_MAX", "FWD_LOOP", "BWD_LOOP", "LOOP_PROGRAMS_PER_SM",
                                          "BWD_PROGRAMS_PER_SM")}  # fmt: skip

    def setknobs(override=None, **knobs):
        for k, v in saved.items():
            setattr(nc, k, knobs.get(k, v))
        nc.CONFIG_OVERRIDE.clear()
        nc.CONFIG_OVERRIDE.update(override or {})
        nc.clear_config_cache()

    for op in ("layer_norm", "rms_norm"):
        ln = op == "layer_norm"
        k = "ln" if ln else "rms"
        for r, n in [(4096, 8192), (8192, 4096)]:
            x, w, *rest = (t.detach() for t in _inputs(op, r, n))
            b_ = rest[0] if rest else None
            dy = torch.randn_like(x)
            nb = _bytes(op, r, n)
            if ln:
                fwd = lambda: layer_norm_forward(x, w, b_, EPS)  # noqa: E731
                _, _, mean, rstd = layer_norm_forward(x, w, b_, EPS)
                bwd = lambda: layer_norm_backward(dy, x, w, mean, rstd, compute_dw=True, compute_db=True)  # noqa: E731
            else:
                fwd = lambda: rms_norm_forward(x, w, EPS)  # noqa: E731
                _, _, rstd = rms_norm_forward(x, w, EPS)
                bwd = lambda: rms_norm_backward(dy, x, w, rstd, compute_dw=True)  # noqa: E731
            fwd_cfgs = [(1, 4), (1, 8), (1, 16), (2, 8), (2, 16)] if ln else [(1, 4), (1, 8), (1, 16)]
            for rows, warps in [(None, None)] + fwd_cfgs:
                setknobs({(f"{k}_fwd", n): (rows, warps)} if rows else None)
                _sweep_row(b, op, (r, n), f"default {nc.row_config(n, 1 << 30, (0, 0), k + '_fwd')[1:3]}"
                           if rows is None else f"rows={rows} warps={warps}", "fwd", fwd, nb["fwd"], copy_gbps)
            bwd_warps = (4, 8, 16) if n <= 4096 else (8, 16, 32)
            for warps in (None,) + bwd_warps:
                for per_sm in (None, 1, 2):
                    setknobs({(f"{k}_bwd", n): (1, warps)} if warps else None, BWD_PROGRAMS_PER_SM=per_sm)
                    cfg = f"warps={warps or 'default'} per_sm={per_sm or 'auto'}"
                    _sweep_row(b, op, (r, n), cfg, "bwd", bwd, nb["bwd"], copy_gbps)
            setknobs()
            del x, w, b_, dy
        # 32K-wide rows: looped kernels (and, for the LN forward, the register-resident one)
        r, n = 4096, 32768
        x, w, *rest = (t.detach() for t in _inputs(op, r, n))
        b_ = rest[0] if rest else None
        dy = torch.randn_like(x)
        nb = _bytes(op, r, n)
        if ln:
            _, _, mean, rstd = layer_norm_forward(x, w, b_, EPS)
            fwd = lambda: layer_norm_forward(x, w, b_, EPS)  # noqa: E731
            bwd = lambda: layer_norm_backward(dy, x, w, mean, rstd, compute_dw=True, compute_db=True)  # noqa: E731
            fwd_alts = [dict(), dict(FWD_LOOP=(8192, 16)), dict(FWD_LOOP=(8192, 16), LOOP_PROGRAMS_PER_SM=4),
                        dict(FWD_LOOP=(16384, 32), LOOP_PROGRAMS_PER_SM=1),
                        dict(LN_FWD_FUSED_MAX=32768), dict(LN_FWD_FUSED_MAX=32768, override={("ln_fwd", 32768): (1, 16)})]
            for alt in fwd_alts:
                alt = dict(alt)
                setknobs(alt.pop("override", None), **alt)
                _sweep_row(b, op, (r, n), str(alt) if alt else "default", "fwd", fwd, nb["fwd"], copy_gbps)
        else:
            _, _, rstd = rms_norm_forward(x, w, EPS)
            bwd = lambda: rms_norm_backward(dy, x, w, rstd, compute_dw=True)  # noqa: E731
        for alt in [dict(), dict(LOOP_PROGRAMS_PER_SM=4), dict(BWD_LOOP=(4096, 8)), dict(BWD_LOOP=(4096, 8), LOOP_PROGRAMS_PER_SM=4),
                    dict(BWD_LOOP=(16384, 32))]:  # fmt: skip
            setknobs(**alt)
            _sweep_row(b, op, (r, n), str(alt) if alt else "default", "bwd", bwd, nb["bwd"], copy_gbps)
        setknobs()
        del x, w, b_, dy
        torch.cuda.empty_cache()


# Knobs of _norm_common that the wide-row backward sweep sets (all restored afterwards).
WIDE_KNOBS = ("WIDE_BWD", "BWD_FUSED_MAX", "DX_FUSED_MAX", "BWD_LOOP", "LOOP_PROGRAMS_PER_SM", "STATS_CFG",
              "SPLIT_TILE", "SPLIT_PROGRAMS_PER_SM", "CHAIN_ROWS", "CHAIN_LAG", "CHAIN_TILE", "CHAIN_WARPS",
              "CHAIN_EVICT_HINTS", "CHAIN_PREFETCH", "CHAIN_SUPER")


def wide_bwd_variants(n):
    """(label, knobs, CONFIG_OVERRIDE) for the backward of rows of width n that needs dw (and db).

    At n <= BWD_FUSED_MAX the default is the fused persistent kernel; the wide-row variants are
    reached there by lowering BWD_FUSED_MAX below n (labelled "BWD_FUSED_MAX<n").
    """
    from tritonize.kernels import _norm_common as nc

    force = {"BWD_FUSED_MAX": n // 2} if n <= nc.BWD_FUSED_MAX else {}
    tag = f" [BWD_FUSED_MAX<{n}]" if force else ""
    out = [("default (current knobs)", {}, None)]
    # "loop": dx-only row kernel (+ _norm_dwdb_kernel); single-pass dx when n <= DX_FUSED_MAX
    # (at 32768 it spills: 1.07-1.28 ms on the H100, one row is enough to track it)
    out.append((f"loop DX_FUSED_MAX={max(nc.DX_FUSED_MAX, n)} (1-pass dx) + dwdb{tag}",
                dict(force, WIDE_BWD="loop", DX_FUSED_MAX=max(nc.DX_FUSED_MAX, n)), None))
    if n > 16384:
        out.append((f"loop 2-pass dx BWD_LOOP=(16384, 32) + dwdb{tag}",
                    dict(force, WIDE_BWD="loop", DX_FUSED_MAX=16384, BWD_LOOP=(16384, 32)), None))
    # "split": stats kernel + tile kernel
    split = [dict(), dict(SPLIT_TILE=(4, 1024, 8)), dict(SPLIT_TILE=(8, 1024, 8)), dict(SPLIT_TILE=(4, 2048, 16)),
             dict(SPLIT_PROGRAMS_PER_SM=2), dict(SPLIT_PROGRAMS_PER_SM=8), dict(STATS_CFG=(2048, 4))]
    for knobs in split:
        label = " ".join(f"{k}={v}" for k, v in knobs.items()) or "SPLIT_* defaults"
        out.append((f"split {label}{tag}", dict(force, WIDE_BWD="split", **knobs), None))
    # "chain": one launch, tiles re-read x and dy from L2 (defaults: CHAIN_ROWS=32, CHAIN_LAG=4,
    # CHAIN_TILE (2, 2048) for LayerNorm / (4, 1024) for RMSNorm, CHAIN_WARPS=4, prefetch and
    # eviction hints on; a tuple CHAIN_TILE below sets both norms' tile)
    chain = [dict(), dict(CHAIN_PREFETCH=False), dict(CHAIN_EVICT_HINTS=False), dict(CHAIN_LAG=1), dict(CHAIN_LAG=2),
             dict(CHAIN_ROWS=16), dict(CHAIN_ROWS=64), dict(CHAIN_TILE=(4, 1024)),
             dict(CHAIN_TILE=(4, 1024), CHAIN_LAG=2), dict(CHAIN_TILE=(2, 2048)),
             dict(CHAIN_TILE=(2, 1024)), dict(CHAIN_WARPS=8), dict(STATS_CFG=(8192, 8)),
             dict(STATS_CFG=(8192, 8), CHAIN_PREFETCH=False),
             *[dict(CHAIN_SUPER=g) for g in (2, 4, 8, 16, 32, 128)]]
    for knobs in chain:
        label = " ".join(f"{k}={v}" for k, v in knobs.items()) or "CHAIN_* defaults"
        out.append((f"chain {label}{tag}", dict(force, WIDE_BWD="chain", **knobs), None))
    return out


def norm_wide_sweep(b: Bench, copy_gbps, ops=("layer_norm", "rms_norm"), shapes=((4096, 32768), (4096, 8192)),
                    only=None):
    """Wide-row backward variants of layer_norm_backward / rms_norm_backward (dw and db computed),
    GPU time of the launchers (queued, no autograd), bf16. Knobs: WIDE_BWD ("loop", "split",
    "chain") and their sizes in tritonize/kernels/_norm_common.py; `rel_err` = the largest
    max|got - ref| / max|ref| over dx, dw (, db) against fp32 torch (bf16 rounding: ~4e-3; a
    wrong variant shows up as O(1)). `only`: label prefixes to keep (None: every variant)."""
    from tritonize.kernels import _norm_common as nc

    # the modules by their import paths (`tritonize.kernels.layer_norm` as an attribute may be the function)
    ln = importlib.import_module("tritonize.kernels.layer_norm")
    rms = importlib.import_module("tritonize.kernels.rms_norm")
    saved = {k: getattr(nc, k) for k in WIDE_KNOBS}
    saved_override = dict(nc.CONFIG_OVERRIDE)

    def setknobs(knobs, override):
        for k, v in saved.items():
            setattr(nc, k, knobs.get(k, v))
        nc.CONFIG_OVERRIDE.clear()
        nc.CONFIG_OVERRIDE.update(saved_override if override is None else override)
        nc.clear_config_cache()

    def rel_err(got, want):
        return max(((a.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30)).item()
                   for a, e in zip(got, want) if e is not None)

    try:
        for op in [o for o in ("layer_norm", "rms_norm") if o in ops]:
            for r, n in shapes:
                x, w, *rest = (t.detach() for t in _inputs(op, r, n))
                bias = rest[0] if rest else None
                dy = torch.randn_like(x)
                nb = _bytes(op, r, n)["bwd"]
                if op == "layer_norm":
                    _, _, mean, rstd = ln.layer_norm_forward(x, w, bias, EPS)
                    bwd = lambda: ln.layer_norm_backward(dy, x, w, mean, rstd, compute_dw=True, compute_db=True)  # noqa: E731
                    want = ln._bwd_torch(dy, None, x, w, mean, rstd, True, True, w.dtype, bias.dtype)
                else:
                    _, _, rstd = rms.rms_norm_forward(x, w, EPS)
                    bwd = lambda: rms.rms_norm_backward(dy, x, w, rstd, compute_dw=True)  # noqa: E731
                    want = rms._bwd_torch(dy, None, x, w, rstd, True)
                for label, knobs, override in wide_bwd_variants(n):
                    if only and not any(label.startswith(o) for o in only):
                        continue
                    setknobs(knobs, override)
                    try:
                        err = rel_err(bwd(), want)
                    except Exception as e:  # a variant that fails to compile is a row, not a crash
                        b.row(op=op + "-wide-bwd", shape=f"{r}x{n}", impl=label, **{"pass": "bwd"},
                              error=f"{type(e).__name__}: {e}"[:200])
                        continue
                    before = len(b.rows)
                    _sweep_row(b, op + "-wide-bwd", (r, n), label, "bwd", bwd, nb, copy_gbps)
                    if len(b.rows) > before:
                        b.rows[-1]["rel_err"] = float(f"{err:.2e}")
                        if err > 0.05:
                            b.rows[-1]["note"] = (b.rows[-1].get("note", "") + " WRONG RESULT").strip()
                setknobs({}, None)
                del x, w, bias, dy, want
                torch.cuda.empty_cache()
    finally:
        setknobs({}, None)


SWEEP = [  # (max_block, loop_block, num_warps); None = the launcher's default
    (None, None, None),
    *[(None, None, w) for w in (8, 16, 32)],
    (16384, 8192, None),
    (8192, 8192, None),
    (16384, 16384, 16),
]


def softmax_sweep(b: Bench, copy_gbps):
    """Launch-config sweep of the softmax launchers (no autograd, GPU time), to choose the defaults."""
    S = importlib.import_module("tritonize.kernels.softmax")

    for r, n in [(4096, 8192), (4096, 32768)]:
        x = torch.randn(r, n, device="cuda", dtype=DTYPE)
        dy = torch.randn_like(x)
        y = S.softmax_forward(x)
        nbytes = _bytes("softmax", r, n)
        for mb, lb, w in SWEEP:
            kw = dict(max_block=mb or S.MAX_BLOCK, loop_block=lb or S.LOOP_BLOCK, num_warps=w)
            cfg = f"max_block={kw['max_block']} loop_block={kw['loop_block']} warps={w or 'auto'}"
            _sweep_row(b, "softmax", (r, n), cfg, "fwd", lambda: S.softmax_forward(x, -1, **kw), nbytes["fwd"], copy_gbps)
            _sweep_row(b, "softmax", (r, n), cfg, "bwd", lambda: S.softmax_backward(y, dy, -1, **kw), nbytes["bwd"],
                       copy_gbps)  # fmt: skip
        del x, dy, y
        torch.cuda.empty_cache()


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--impls", default="tritonize,torch,torch.compile,liger", help="comma-separated implementations")
    p.add_argument("--shapes", default=None, help="comma-separated RxN shapes (default: all of SHAPES)")
    p.add_argument("--sweep", action="store_true", help="only sweep our launch configs (block caps, rows, warps, grids)")
    p.add_argument("--sweep-wide", action="store_true",
                   help="only the wide-row norm backward variants of --sweep (WIDE_BWD: loop / split / chain); "
                        "--shapes picks the shapes")
    p.add_argument("--only", default="", help="--sweep-wide: comma-separated label prefixes of the variants to time")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        p.error(f"unknown op(s) {bad}; choose from {OPS}")
    # see the module docstring: lets the "bwd" row replay one compiled graph (retain_graph=True).
    # Set before the GPU check so that a CPU run exercises it too.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    if not torch.cuda.is_available():
        print("bench_rowwise needs a CUDA GPU; none found, nothing measured.")
        return 0

    builders = {"tritonize": _ours, "torch": _torch, "torch.compile": _compiled}
    if liger_available():
        builders["liger"] = _liger
    wanted = [i.strip() for i in args.impls.split(",")]
    builders = {k: v for k, v in builders.items() if k in wanted}
    # torch eager first: the others report their speed-up over it
    order = ["torch", "tritonize", "liger", "torch.compile"]  # compile last: slowest to set up
    builders = {k: builders[k] for k in order if k in builders}

    shapes = SHAPES[1:3] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rep = 30 if args.quick else 60
    b = Bench("rowwise")
    copy_gbps = copy_bandwidth_gbps()
    b.row(op="copy", shape="1 GiB", impl="torch", **{"pass": "copy"}, gbps=copy_gbps, pct_copy=100.0)
    if args.sweep or args.sweep_wide:
        if ("layer_norm" in ops or "rms_norm" in ops) and not args.sweep_wide:
            norm_sweep(b, copy_gbps)
        if "layer_norm" in ops or "rms_norm" in ops:
            wide_shapes = shapes if args.shapes else ((4096, 32768), (4096, 8192))
            only = [o.strip() for o in args.only.split(",") if o.strip()] or None
            norm_wide_sweep(b, copy_gbps, ops, wide_shapes, only)
        if "softmax" in ops and not args.sweep_wide:
            softmax_sweep(b, copy_gbps)
        cols = ["op", "shape", "impl", "pass", "gpu_ms", "gpu_pct_copy", "cpu_us", "rel_err", "note", "error"]
        b.table(cols, title="row-wise launch sweep, bf16, GPU time (queued)", out=args.out)
        return 0
    torch_ms = {}
    for op in ops:
        for shape in shapes:
            for impl, build in builders.items():
                bench_one(b, op, shape, impl, build, copy_gbps, torch_ms, rep)
    cols = ["op", "shape", "impl", "pass", "ms", "gbps", "pct_copy", "vs_torch", "gpu_ms", "gpu_pct_copy", "cpu_us",
            "note", "error"]  # fmt: skip
    b.table(cols, title="row-wise kernels, bf16 (GB/s = minimum traffic / time)", out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
