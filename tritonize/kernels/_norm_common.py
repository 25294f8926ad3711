"""What layer_norm.py and rms_norm.py share: launch sizing and the weight/bias-gradient reduction.

The weight (and bias) gradient of a norm is a sum over every row:
    dw[j] = sum_r dy[r, j] * xhat[r, j]          db[j] = sum_r dy[r, j]
It is reduced in two stages, never with atomics on a hot (N,) buffer:
  1. per-program partials: each program of the backward keeps its own fp32 accumulator row(s) and
     writes them once, into a (G, K, N) buffer (K = 1 or 2: dw and/or db), G ~ a few per SM;
  2. `reduce_partials` adds the G rows up with one `torch.sum` (fp32, dw and db together) and
     casts to the parameters' dtype. A torch reduction, not a Triton kernel: the GPU work is a
     small column sum either way, but a Triton launch costs ~30-40 us of host time on the H100
     host against ~5-10 us for a torch op, and the row-wise ops are host-bound at realistic sizes.
When a row is too wide for a per-program accumulator to stay in registers (N > BWD_FUSED_MAX),
the row-wise backward computes only dx, and `_norm_dwdb_kernel` computes the partials from
column tiles instead (it re-reads x and dy once: the price of not spilling a 2x N fp32 accumulator).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from tritonize.kernels._launch import fast_launch

from tritonize.kernels._common import device_sms, rows_2d

# Launch knobs. Chosen from register budgets (64K 32-bit registers per SM; register and spill
# counts read from ptxas for sm_90 bf16 builds), not yet from timings. The tests shrink them to
# reach every path with small shapes.
# Widest row the forward keeps whole in registers; wider rows loop over chunks (FWD_LOOP).
# LayerNorm at 32768 spills ~320 B/thread (x, w, b live at once), yet the H100 sweep
# (benchmarks/bench_rowwise.py --sweep) timed it at 0.191 ms vs 0.244 for the three-pass loop at
# 4096x32768 bf16 (93% vs 73% of copy bandwidth): the spill stays in L1, the re-reads do not.
LN_FWD_FUSED_MAX = 32768
RMS_FWD_FUSED_MAX = 32768
# Widest row whose backward keeps fp32 dweight (and dbias) accumulators in registers across rows:
# x, dy, w and two accumulators at 16 values per thread x 16 warps fill an SM's registers at 8192.
BWD_FUSED_MAX = 8192
# Widest row the dx-only backward keeps whole in registers; wider rows take two passes (BWD_LOOP).
DX_FUSED_MAX = 16384
# (chunk width, warps) of the looped kernels: no spills at these sizes.
FWD_LOOP = (16384, 32)
# BWD_LOOP (16384, 32) beat (8192, 16) in the H100 sweep at 4096x32768: 0.514 vs 0.609 ms (LN),
# 0.492 vs 0.603 (RMS).
BWD_LOOP = (16384, 32)
# Programs per SM for the looped kernels: few, so each program's row (re-read in the next pass)
# is still in L2: 2 per SM x 132 SMs x 32768 x (x + dy) bf16 = 34 MB < 50 MB L2.
LOOP_PROGRAMS_PER_SM = 2
# Programs per SM of the persistent fused backward; None = as many as the register estimate in
# `persistent_grid` fits (the sweep in benchmarks/bench_rowwise.py times 1 and 2 against it).
BWD_PROGRAMS_PER_SM = None


@triton.jit
def load_sum_f32(X, R, row_off_x, row_off_r, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """s = x (+ residual), rounded to x's dtype exactly as torch's `x + residual` is; as fp32."""
    x = tl.load(X + row_off_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row_off_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
    return x.to(tl.float32)


@fast_launch
@triton.jit
def _norm_dwdb_kernel(
    X,  # (M, N) normalised input (x, or x + residual), row stride stride_x
    DY,  # (M, N) upstream gradient of the normed output, row stride stride_dy
    MEAN,  # (M,) fp32 row means, if HAS_MEAN (layer norm; RMSNorm has none)
    RSTD,  # (M,) fp32 row 1/std
    PART,  # (G, COMPUTE_DW + COMPUTE_DB, N) fp32 partials: dw (if COMPUTE_DW), then db (if COMPUTE_DB)
    M,
    N,
    stride_x,
    stride_dy,
    HAS_MEAN: tl.constexpr,
    ROUND_XHAT: tl.constexpr,  # RMSNorm (HF numerics): xhat is rounded to x's dtype before the weight multiply
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # grid = (cdiv(N, BLOCK_N), G): program (c, g) owns columns [c*BLOCK_N, ...) and rows
    # g*BLOCK_M + k*G*BLOCK_M; it never needs a whole row, so it works for any N.
    #   dw[j] += dy[r, j] * xhat[r, j],   xhat = (x - mean) * rstd   (rms: round(x * rstd))
    #   db[j] += dy[r, j]
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    G = tl.num_programs(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(pid_g * BLOCK_M, M, G * BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        m = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if COMPUTE_DW:
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            if HAS_MEAN:
                mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
                xhat = (x.to(tl.float32) - mean[:, None]) * rstd[:, None]
            else:
                xhat = x.to(tl.float32) * rstd[:, None]
            if ROUND_XHAT:
                xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
            acc_w += dy * xhat  # dy is 0 outside the mask, so padded lanes add nothing
        if COMPUTE_DB:
            acc_b += dy
    part = PART + pid_g.to(tl.int64) * (COMPUTE_DW + COMPUTE_DB) * N
    if COMPUTE_DW:
        tl.store(part + cols, tl.sum(acc_w, axis=0), mask=col_ok)
    if COMPUTE_DB:
        tl.store(part + COMPUTE_DW * N + cols, tl.sum(acc_b, axis=0), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launch sizing (deterministic, cached per row width: no autotune, no recompiles per row count)
# ---------------------------------------------------------------------------------------------


def cdiv(a: int, b: int) -> int:
    """triton.cdiv without its constexpr_function wrapper (~5 us a call in Python)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 without its constexpr_function wrapper; 1 for n <= 1."""
    return 1 << max(n - 1, 0).bit_length()


def as_rows(t: torch.Tensor):
    """(t2, rows, row_stride): t as rows of its last dim with unit inner stride, for a kernel that
    takes a base pointer and a row stride. A contiguous t is passed as is (no view: each view op
    costs microseconds on the launch path); otherwise `rows_2d` (a view, or a copy when the last
    dim is not unit-stride)."""
    n = t.shape[-1]
    if t.is_contiguous():
        return t, (t.numel() // n if n else math.prod(t.shape[:-1])), n
    t2 = rows_2d(t)
    return t2, t2.shape[0], t2.stride(0)


def vec(t):
    """A (N,) parameter the kernels index as contiguous: a strided view is copied (N elements)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


_NO_SWITCH = contextlib.nullcontext()


def device_ctx(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device), so cuda:1 tensors work.

    A `torch.cuda.device(...)` context costs ~10 us of CPU per call (two device exchanges), a
    real share of a row-wise op's launch path; it is entered only when t is not on the current
    device (the usual case needs none). A reusable nullcontext otherwise.
    """
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_SWITCH


# Per-kernel launch overrides, {(kind, BLOCK_N): (ROWS, num_warps)} with kind in "ln_fwd",
# "ln_bwd", "rms_fwd", "rms_bwd": set by benchmarks/bench_rowwise.py --sweep to time
# alternatives (call `clear_config_cache()` after changing it), and where an H100 sweep picked a
# config other than the rule in `_fused_config`.
CONFIG_OVERRIDE: dict = {}


def row_config(n: int, fused_max: int, loop: tuple[int, int], kind: str = "") -> tuple[int, int, int, bool]:
    """(BLOCK_N, ROWS, num_warps, LOOP) for a row-wise kernel over rows of width n.

    Rows up to `fused_max` are held whole in registers (BLOCK_N = next power of two); narrow rows
    are batched ROWS to a program so each program still moves ~4K elements (enough bytes in
    flight per SM). Wider rows loop over chunks: loop = (chunk width, warps), LOOP=True, ROWS=1.
    Cached per (n, ...): the launchers call this on every launch.
    """
    return _row_config(n, fused_max, loop, kind)


@functools.lru_cache(maxsize=4096)
def _row_config(n, fused_max, loop, kind):
    if n > fused_max:
        return loop[0], 1, loop[1], True
    block, rows, warps, _ = _fused_config(n)
    rows, warps = CONFIG_OVERRIDE.get((kind, block), (rows, warps))
    return block, rows, warps, False


def clear_config_cache():
    _row_config.cache_clear()


@functools.lru_cache(maxsize=None)
def _fused_config(n: int) -> tuple[int, int, int, bool]:
    block = triton.next_power_of_2(max(n, 1))
    rows = max(1, min(16, 4096 // block))
    elems = block * rows
    # ~16 fp32 values per thread (two 16-byte bf16 loads), up to 32 warps for 16K+ rows
    warps = min(32, max(1, elems // 512))
    return block, rows, warps, False


def persistent_grid(t: torch.Tensor, n_row_blocks: int, block_elems: int, warps: int, n_acc: int) -> int:
    """Programs for a persistent backward: as many as fit on the GPU at once (register-bound),
    never more than there are row blocks. Every program writes one partial row per accumulator,
    so fewer programs also means a cheaper second stage."""
    threads = 32 * warps
    # ~ (x, dy, w, n_acc accumulators) fp32 values per thread + overhead, 64K registers per SM
    # (ptxas, sm_90, bf16: 128 regs at 16 values/thread for 1024x4 rows and for 8192-wide rows).
    # An overestimate of occupancy only queues a second, equal wave of programs.
    regs = (3 + n_acc) * max(1, block_elems // threads) + 40
    per_sm = BWD_PROGRAMS_PER_SM or max(1, min(8, 65536 // (regs * threads)))
    return max(1, min(n_row_blocks, device_sms(t) * per_sm))


def reduce_partials(part, dtypes):
    """Stage 2: part (G, K, N) fp32 partial sums -> K (N,) gradients, gradient k in dtypes[k].

    One `torch.sum` over G in fp32, then one rounding per gradient (a cast only where the
    parameter is not fp32). Two gradients come back as two separate tensors, never two views of
    one buffer: the backward custom op may not return outputs that alias each other (torch
    refuses it under tracing, e.g. with rest="inductor").
    """
    total = part.sum(0)  # (K, N) fp32
    if len(dtypes) == 1:
        return (total[0] if dtypes[0] == torch.float32 else total[0].to(dtypes[0])),
    first, second = total.unbind(0)
    return (first if dtypes[0] == torch.float32 else first.to(dtypes[0]),
            second.clone() if dtypes[1] == torch.float32 else second.to(dtypes[1]))


def dwdb_split(x2, dy2, m, n, stride_x, stride_dy, mean, rstd, compute_dw: bool, compute_db: bool, *,
               round_xhat: bool):
    """Stage 1 for wide rows: (G, K, N) fp32 partials of dw and/or db (K = compute_dw +
    compute_db) from column tiles (any N). x2 / dy2: base tensors of (m, n) rows with the given
    row strides (see `as_rows`)."""
    block_m, block_n = 32, 128
    col_blocks = cdiv(n, block_n)
    # enough programs to fill the GPU ~4 deep, but few row groups so stage 2 stays small
    g = max(1, min(cdiv(m, block_m), cdiv(device_sms(x2) * 4, col_blocks)))
    part = torch.empty((g, int(compute_dw) + int(compute_db), n), dtype=torch.float32, device=x2.device)
    _norm_dwdb_kernel[(col_blocks, g)](
        x2,
        dy2,
        mean if mean is not None else rstd,
        rstd,
        part,
        m,
        n,
        stride_x,
        stride_dy,
        HAS_MEAN=mean is not None,
        ROUND_XHAT=round_xhat,
        COMPUTE_DW=compute_dw,
        COMPUTE_DB=compute_db,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=4,
    )
    return part
