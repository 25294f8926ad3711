"""Rotary position embedding (HF Llama's apply_rotary_pos_emb on q and k): fwd and fwd+bwd, bf16.

    python -m benchmarks.bench_rotary [--quick] [--impls tritonize,torch] [--out table.md]
    TRITON_INTERPRET=1 python -m benchmarks.bench_rotary --quick    # CPU smoke run (no GPU)

Cases (bf16), inputs as transformers makes them in LlamaAttention:
- q (B, H, T, D) = (4, 16, 2048, 64), k (4, 8, 2048, 64)
- q (1, 32, 4096, 128),               k (1, 8, 4096, 128)
q and k are `torch.randn(B, T, H, D).transpose(1, 2)` views (the projections' layout), leaves
that require grad; cos / sin are (B, 1, T, D) bf16 (LlamaRotaryEmbedding's (B, T, D) output,
unsqueezed at dim 1), real cos / sin of cat(freqs, freqs) angles (Liger reads only their first
half, which is exact only for that duplicated layout).

Implementations:
- tritonize:     tritonize.kernels.rotary_embedding(q, k, cos, sin) (q and k in one launch).
- torch:         HF's formula in eager torch: q * cos + rotate_half(q) * sin, same for k.
- torch.compile: the same function under torch.compile (inductor, dynamic=False).
- liger:         liger_kernel.transformers.rope.liger_rotary_pos_emb(q, k, cos, sin) with cos /
                 sin of shape (B, T, D), as HF passes them before its unsqueeze (unsqueeze_dim=1),
                 when Liger-Kernel is installed. Liger works on q.transpose(1, 2).contiguous():
                 for transformers' views that is no copy, and it writes its result IN PLACE into
                 q's and k's storage (the outputs are views of the inputs: no output is
                 allocated, and the inputs are overwritten, also in its backward, into dy). Other
                 layouts get a copy first (not the case here). Its peak memory is therefore not
                 comparable one to one with the out-of-place implementations.

Timing: median ms (`time_ms`: triton.testing.do_bench, CUDA events, L2 flushed between runs).
- fwd:      q_embed, k_embed = f(q, k, cos, sin) with q, k requiring grad (training forward).
- fwd+bwd:  forward, then torch.autograd.grad(outputs, (q, k), (dq, dk)) on a fresh graph;
            the upstream gradients are fixed randn_like(outputs) tensors (the outputs' layout).
Like bench_rowwise, two more columns from a "queued" run (GPU first kept busy with
torch.cuda._sleep, see bench_rowwise.queued_time): gpu_ms (device time per call, no launch gaps)
and cpu_us (host time per call); at these sizes the op is only tens of microseconds of GPU time,
so launch overhead matters.

Bytes counted (e = 2 bytes for bf16): the minimum traffic of q and k, cos / sin EXCLUDED:
- fwd:      read q, k; write q_embed, k_embed                = 2 * (|q| + |k|) * e
- fwd+bwd:  twice that (the backward reads dq, dk and writes dq_in, dk_in: the same amount)
GB/s = bytes / ms; "% copy" = GB/s over the device-to-device copy bandwidth (read + write)
measured in this same run (`copy_bandwidth_gbps`). `gbps_cs` adds cos and sin read once each
(2 * B * T * D * e per pass: ~4% and ~2.5% more bytes for the two shapes).
peak_mb: peak memory allocated during one call of the pass (fwd: the outputs; fwd+bwd: outputs,
saved tensors and gradients), above what was allocated before it (CUDA only).
max_err: max |out - fp32 reference| of q_embed and k_embed on the bench inputs (a wrong result
shows up as O(1); bf16 rounding is ~1e-2 for values of a few units).

--quick: small shapes, few repetitions. On a machine with no GPU it runs on the CPU as a smoke
test (Triton kernels under TRITON_INTERPRET=1; timings there are meaningless: wall-clock medians
of a few calls, no memory figures). torch.compile rows are attempted (an error row when inductor
cannot build on the machine); Liger rows only with an explicit --impls: its kernel computes in
bf16, which the interpreter does not emulate faithfully (NaNs; fp32 inputs come out exact).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback

import torch

from benchmarks._common import Bench, copy_bandwidth_gbps, liger_available, parser, peak_memory_bytes, time_ms

DTYPE = torch.bfloat16
# ((B, H, T, D) of q, number of k heads)
SHAPES = [((4, 16, 2048, 64), 8), ((1, 32, 4096, 128), 8)]
QUICK_SHAPES = [((2, 4, 32, 64), 2), ((1, 8, 64, 128), 2)]
IMPLS = ("tritonize", "torch", "torch.compile", "liger")


# --- implementations: f(q, k, cos4, sin4, cos3, sin3) -> (q_embed, k_embed) -------------------


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_rotary(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb after its unsqueeze (cos / sin already (B, 1, T, D))."""
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _tritonize():
    from tritonize.kernels import rotary_embedding

    return lambda q, k, c4, s4, c3, s3: rotary_embedding(q, k, c4, s4)


def _torch():
    return lambda q, k, c4, s4, c3, s3: hf_rotary(q, k, c4, s4)


_COMPILED = []


def _compiled():
    if not _COMPILED:  # one compiled function; dynamic=False: each shape gets its own kernels
        _COMPILED.append(torch.compile(hf_rotary, dynamic=False))
    f = _COMPILED[0]
    return lambda q, k, c4, s4, c3, s3: f(q, k, c4, s4)


def _liger():
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    # as its docstring says: cos / sin (B or 1, T, D), unsqueezed by Liger at unsqueeze_dim
    return lambda q, k, c4, s4, c3, s3: liger_rotary_pos_emb(q, k, c3, s3, None, 1)


BUILDERS = {"tritonize": _tritonize, "torch": _torch, "torch.compile": _compiled, "liger": _liger}


# --- inputs, bytes, timing ------------------------------------------------------------------


def _inputs(shape, hk, dev):
    B, H, T, D = shape
    q = torch.randn(B, T, H, D, device=dev, dtype=DTYPE).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, hk, D, device=dev, dtype=DTYPE).transpose(1, 2).requires_grad_()
    # LlamaRotaryEmbedding: emb = cat(freqs, freqs), positions 0..T-1 (per batch row), bf16
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D))
    pos = torch.arange(T, device=dev, dtype=torch.float32)[None, :].expand(B, T)
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    c3, s3 = emb.cos().to(DTYPE), emb.sin().to(DTYPE)  # (B, T, D)
    return q, k, c3.unsqueeze(1), s3.unsqueeze(1), c3, s3


def _bytes(shape, hk):
    B, H, T, D = shape
    e = torch.finfo(DTYPE).bits // 8
    qk = (B * H * T * D + B * hk * T * D) * e
    cs = 2 * B * T * D * e
    fwd = 2 * qk
    return {"fwd": (fwd, fwd + cs), "fwd+bwd": (2 * fwd, 2 * fwd + 2 * cs)}


def _cpu_time_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def _cpu_copy_gbps(nbytes=64 << 20):
    src = torch.empty(nbytes // 2, dtype=DTYPE).normal_()
    dst = torch.empty_like(src)
    ms = _cpu_time_ms(lambda: dst.copy_(src), 5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _max_err(f, inputs):
    """max |f - fp32 reference| over q_embed and k_embed, on copies of the inputs (same layout;
    Liger overwrites its inputs)."""
    q, k, c4, s4, c3, s3 = inputs
    with torch.no_grad():
        ref = hf_rotary(q.float(), k.float(), c4.float(), s4.float())
        qc, kc = (t.detach().clone() for t in (q, k))  # clone keeps a dense tensor's strides
        got = f(qc, kc, c4, s4, c3, s3)
        return max((g.float() - r).abs().max().item() for g, r in zip(got, ref))


def bench_one(b: Bench, shape, hk, impl, build, copy_gbps, torch_ms, rep, dev):
    sname = f"q{'x'.join(map(str, shape))}-kv{hk}"
    cuda = dev == "cuda"
    try:
        f = build()
        inputs = _inputs(shape, hk, dev)
        q, k = inputs[:2]
        err = _max_err(f, inputs)
        outs = f(*inputs)  # warm up (compiles, autotunes) outside the timed region
        dys = [torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, (q, k), dys)
        del outs
        fns = {
            "fwd": lambda: f(*inputs),
            "fwd+bwd": lambda: torch.autograd.grad(f(*inputs), (q, k), dys),
        }
        nbytes = _bytes(shape, hk)
        for pas, fn in fns.items():
            ms = time_ms(fn, warmup=10, rep=rep) if cuda else _cpu_time_ms(fn, rep)
            nb, nb_cs = nbytes[pas]
            gbps = nb / (ms * 1e-3) / 1e9
            row = dict(shape=sname, impl=impl, **{"pass": pas}, ms=ms, gbps=gbps, pct_copy=100 * gbps / copy_gbps,
                       gbps_cs=nb_cs / (ms * 1e-3) / 1e9, max_err=float(f"{err:.2e}"))  # fmt: skip
            if cuda:
                from benchmarks.bench_rowwise import queued_time

                gpu_ms, cpu_us, ok = queued_time(fn)
                row.update(gpu_ms=gpu_ms, gpu_pct_copy=100 * nb / (gpu_ms * 1e-3) / 1e9 / copy_gbps, cpu_us=cpu_us)
                if not ok:
                    row["note"] = "cpu slower than the queued sleep: gpu_ms includes launch gaps"
                row["peak_mb"] = peak_memory_bytes(fn) / 2**20
            if impl == "liger":
                row["note"] = (row.get("note", "") + " in place: outputs are q's / k's storage").strip()
            if impl == "tritonize" and not cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
                row["note"] = (row.get("note", "") + " no TRITON_INTERPRET: torch fallback path").strip()
            if not err <= 0.1:  # NaN included
                row["note"] = (row.get("note", "") + " WRONG RESULT").strip()
            if impl == "torch":
                torch_ms[(sname, pas)] = ms
            elif (sname, pas) in torch_ms:
                row["vs_torch"] = torch_ms[(sname, pas)] / ms
            b.row(**row)
    except Exception as e:  # one failing implementation must not lose the other rows
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(f"# {sname} {impl} failed:\n{traceback.format_exc()}", file=sys.stderr)
        b.row(shape=sname, impl=impl, error=msg)
    if cuda:
        torch.cuda.empty_cache()


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("bench_rotary needs a CUDA GPU; none found, nothing measured (--quick runs a CPU smoke test).")
        return 0
    dev = "cuda" if cuda else "cpu"
    wanted = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in wanted if i not in IMPLS]
    if bad:
        p.error(f"unknown implementation(s) {bad}; choose from {IMPLS}")
    if "liger" in wanted and not liger_available():
        print("# liger_kernel not importable: no liger rows", file=sys.stderr)
        wanted.remove("liger")
    if "liger" in wanted and not cuda and args.impls == p.get_default("impls"):
        # Liger computes in bf16 inside its kernel, which Triton's interpreter does not emulate
        # faithfully (NaNs here; fp32 inputs come out exact): only when asked for (--impls)
        print("# CPU: no liger rows by default (bf16 math under TRITON_INTERPRET gives NaN)", file=sys.stderr)
        wanted.remove("liger")
    # torch eager first: the others report their speed-up over it; compile last (slowest to set up)
    order = ["torch", "tritonize", "liger", "torch.compile"]
    builders = {k: BUILDERS[k] for k in order if k in wanted}

    shapes = QUICK_SHAPES if args.quick else SHAPES
    rep = (3 if not cuda else 30) if args.quick else 100
    b = Bench("rotary")
    copy_gbps = copy_bandwidth_gbps() if cuda else _cpu_copy_gbps()
    b.row(shape="1 GiB" if cuda else "64 MiB", impl="torch", **{"pass": "copy"}, gbps=copy_gbps, pct_copy=100.0)
    torch_ms = {}
    for shape, hk in shapes:
        for impl, build in builders.items():
            bench_one(b, shape, hk, impl, build, copy_gbps, torch_ms, rep, dev)
    cols = ["shape", "impl", "pass", "ms", "gbps", "pct_copy", "gbps_cs", "vs_torch", "gpu_ms", "gpu_pct_copy",
            "cpu_us", "peak_mb", "max_err", "note", "error"]  # fmt: skip
    title = "rotary embedding (q and k), bf16 (GB/s = q, k traffic / time, cos / sin excluded)"
    b.table(cols, title=title, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
