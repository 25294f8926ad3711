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
the backward takes one of the WIDE_BWD variants below (see the comment above `wide_backward` for
the traffic of each):
  "loop":  the row-wise kernel computes only dx, and `_norm_dwdb_kernel` computes the partials
           from column tiles (it re-reads x and dy once: the price of not spilling a 2x N fp32
           accumulator);
  "split": `_norm_bwd_stats_kernel` (the per-row sums dx needs) + `_norm_bwd_tiles_kernel` (dx and
           the partials together, from column tiles);
  "chain": `_norm_bwd_chain_kernel`, the two steps of "split" in one launch, interleaved so that
           the tiles re-read x and dy from L2.
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

# Backward of rows wider than BWD_FUSED_MAX that also needs dweight / dbias: "loop", "split" or
# "chain" (module docstring; traffic per variant above `wide_backward`). "loop" with
# DX_FUSED_MAX = 32768 is the single-pass dx variant (whole row in registers): timed on the H100
# at 4096x32768 bf16 it spills far more than the forward does: 1.07 ms (RMS) / 1.28 ms (LN)
# against 0.495 / 0.516 for the two-pass default. First H100 timings of the others (before
# the prefetch option and the dx store hint): split 0.47-0.48 ms (RMS) / 0.48 (LN): 5 units
# at ~2.7 TB/s; chain 0.41-0.43 (RMS) / 0.45-0.46 (LN) at CHAIN_WARPS=4; ncu: the chain's
# re-reads hit L2 about half the time at CHAIN_ROWS=64, and its warps are 24% active.
# Default "chain": the fastest on the H100 at both norms (`--sweep-wide`, session 3: RMS 0.455 ms
# vs 0.494 for "loop", LN 0.465 vs 0.512). The same sweep timed CHAIN_PREFETCH=True faster still
# (RMS 0.415, LN 0.449; with CHAIN_TILE=(4, 1024) RMS 0.396 but LN 0.512), with correct results;
# it is on by default since session 4 (the GPU suite's "chain" tests run it, "chain-plain" the
# variant without prefetch and hints).
WIDE_BWD = "chain"
# (chunk width, warps) of the per-row sums pass of "split" (one row per program, looped).
STATS_CFG = (4096, 8)
# (BLOCK_M, BLOCK_N, warps) of "split"'s tile kernel, and its programs per SM (grid = column
# blocks x row groups; each program strides over the rows of its group, accumulating partials).
SPLIT_TILE = (2, 2048, 8)
SPLIT_PROGRAMS_PER_SM = 4
# "chain": rows per chunk (one dweight/dbias partial per chunk, CHAIN_SUPER chunks to a row), how
# many chunks the tile programs trail the stats programs by, the tile (BLOCK_M, BLOCK_N), the
# warps of the launch (the stats programs take STATS_CFG's chunk width), L2 eviction hints (the
# stats pass loads with evict_last, the tile pass re-loads and stores dx with evict_first), and
# software prefetch (each program loads its next chunk / tile before the current one's math).
# Values: the best of a grid timed on an H100 (4 warps beat 8 everywhere) and on an H200
# (prefetch off beat on for LayerNorm), re-swept on the H100 in sessions 4 and 9.
CHAIN_ROWS = 32
# lag 4 over 2 (session 9, H100 4096x32768 bwd, two runs): RMSNorm 0.383 vs 0.396 ms, LayerNorm
# 0.448 vs 0.449 (lag 1: 0.41 / 0.45)
CHAIN_LAG = 4
# per norm (a single tuple applies to both): RMSNorm's backward is lighter per element (no mean,
# no dbias) and took (4, 1024) faster with prefetch (H100 4096x32768 bwd 0.394 vs 0.414 ms,
# fwd+bwd 77.5% vs 74.6% of copy bandwidth, session 4), where LayerNorm lost with it (0.515 vs 0.448)
CHAIN_TILE = {"layer_norm": (2, 2048), "rms_norm": (4, 1024)}
CHAIN_WARPS = 4
# Chunks per dweight/dbias partial row, added up by the tiles in chunk order (1: one row per chunk).
# H100 4096x32768 bwd (session 9): 1 / 2 / 4 / 8 / 16 / 128 -> LayerNorm 0.447 / 0.438 / 0.432 /
# 0.427 / 0.425 / 0.424 ms, RMSNorm 0.382 / 0.378 / 0.379 / 0.375 / 0.373 / 0.372: the partial
# rows (33.5 MB at 128 chunks x 2 x 32768 fp32, written, then read back by reduce_partials) were
# ~5% of LayerNorm's backward traffic.
CHAIN_SUPER = 16
CHAIN_EVICT_HINTS = True
CHAIN_PREFETCH = True


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
# Wide-row backward, "split" and "chain" variants (see `wide_backward` for the traffic math)
# ---------------------------------------------------------------------------------------------
# Both rest on one observation: the row-wise part of the backward is two per-row scalars. With
# xhat = (x - mean) * rstd (RMSNorm: xhat = x * rstd, no mean) and g = dy * w:
#     LayerNorm: dx = rstd * (g - xhat * c1 - c2),   c1 = mean_j(g * xhat),  c2 = mean_j(g)
#     RMSNorm:   dx = rstd * (g - xhat * c1)          (the same c1; no c2 term)
# Once c1 (and c2) of every row are known (STATS, (M, 1 + HAS_MEAN) fp32), dx is element-wise, so
# it can be computed from column tiles by the programs that also accumulate the column sums
# dw[j] = sum_r dy * xhat (RMSNorm: xhat rounded to x's dtype) and db[j] = sum_r dy.


@triton.jit
def _load_hint(ptr, mask, HINT: tl.constexpr):
    """tl.load(ptr, mask, other=0) with an L2 eviction hint (0: none, 1: evict_last,
    2: evict_first). Literal policies in constexpr branches: long-standing Triton API only."""
    if HINT == 1:
        v = tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_last")
    elif HINT == 2:
        v = tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        v = tl.load(ptr, mask=mask, other=0.0)
    return v


@triton.jit
def _load_tile(X, DY, rows, cols, col_ok, row_end, stride_x, stride_dy, HINT: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tiles of x and dy at rows x cols (rows >= row_end masked), in
    their own dtypes (a prefetched tile costs half the registers of an fp32 one)."""
    m = (rows < row_end)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = _load_hint(X + rows64[:, None] * stride_x + cols[None, :], m, HINT)
    dy = _load_hint(DY + rows64[:, None] * stride_dy + cols[None, :], m, HINT)
    return x, dy


@triton.jit
def _row_grad_stats(X, W, DY, MEAN, RSTD, STATS, row, N, stride_x, stride_dy,
                    HAS_MEAN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HINT: tl.constexpr, PREFETCH: tl.constexpr,
                    BLOCK: tl.constexpr):
    """STATS[row] = (c1, c2) (RMSNorm: c1 only) of one row (int64 `row`), looping over BLOCK
    chunks. PREFETCH: chunk c + 1 is loaded before chunk c's math (two chunks' loads in flight:
    Triton does not pipeline plain loads by itself)."""
    rstd = tl.load(RSTD + row)
    if HAS_MEAN:
        mean = tl.load(MEAN + row)
    a1 = tl.zeros((BLOCK,), dtype=tl.float32)
    a2 = tl.zeros((BLOCK,), dtype=tl.float32)
    if PREFETCH:
        cols = tl.arange(0, BLOCK)
        x_next = _load_hint(X + row * stride_x + cols, cols < N, HINT)
        g_next = _load_hint(DY + row * stride_dy + cols, cols < N, HINT)
    for c0 in range(0, N, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cm = cols < N
        if PREFETCH:
            x = x_next.to(tl.float32)
            g = g_next.to(tl.float32)
            x_next = _load_hint(X + row * stride_x + BLOCK + cols, cols + BLOCK < N, HINT)
            g_next = _load_hint(DY + row * stride_dy + BLOCK + cols, cols + BLOCK < N, HINT)
        else:
            x = _load_hint(X + row * stride_x + cols, cm, HINT).to(tl.float32)
            g = _load_hint(DY + row * stride_dy + cols, cm, HINT).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        # g is 0 outside the row, so padded lanes add nothing to either sum
        if HAS_MEAN:
            a1 += g * ((x - mean) * rstd)
            a2 += g
        else:
            a1 += g * (x * rstd)
    if HAS_MEAN:
        tl.store(STATS + 2 * row, tl.sum(a1, axis=0) / N)
        tl.store(STATS + 2 * row + 1, tl.sum(a2, axis=0) / N)
    else:
        tl.store(STATS + row, tl.sum(a1, axis=0) / N)


@triton.jit
def _tile_dx(x, dy, X, DS, MEAN, RSTD, STATS, DX, w, rows, cols, col_ok, M, N, stride_ds,
             HAS_MEAN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_DS: tl.constexpr, ROUND_XHAT: tl.constexpr,
             STORE_HINT: tl.constexpr, VOLATILE_STATS: tl.constexpr):
    """dx of a (BLOCK_M, BLOCK_N) tile (x, dy: from _load_tile) from its rows' STATS; returns
    (dy, xhat) as fp32 for the caller's dw/db accumulators (dy is 0 outside the tile's mask, so
    dy and dy * xhat add nothing there). `w`: the tile's weight columns, fp32 (unused without
    HAS_WEIGHT). STORE_HINT 2: dx stored evict_first."""
    row_ok = rows < M
    m = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = x.to(tl.float32)
    dy = dy.to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if HAS_WEIGHT:
        g = dy * w[None, :]
    else:
        g = dy
    if HAS_MEAN:
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        # volatile: in "chain" STATS was written by other programs of this launch (not via L1)
        if VOLATILE_STATS:
            c1 = tl.load(STATS + 2 * rows64, mask=row_ok, other=0.0, volatile=True)
            c2 = tl.load(STATS + 2 * rows64 + 1, mask=row_ok, other=0.0, volatile=True)
        else:
            c1 = tl.load(STATS + 2 * rows64, mask=row_ok, other=0.0)
            c2 = tl.load(STATS + 2 * rows64 + 1, mask=row_ok, other=0.0)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    else:
        if VOLATILE_STATS:
            c1 = tl.load(STATS + rows64, mask=row_ok, other=0.0, volatile=True)
        else:
            c1 = tl.load(STATS + rows64, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        dx = (g - xhat * c1[:, None]) * rstd[:, None]
    if HAS_DS:
        dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=m, other=0.0).to(tl.float32)
    if STORE_HINT == 2:  # "chain": dx is not read again; keep L2 for the x, dy re-reads
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=m,
                 eviction_policy="evict_first")
    else:
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
    if ROUND_XHAT:  # RMSNorm (HF): dweight multiplies the normalised value rounded to x's dtype
        xhat = xhat.to(X.dtype.element_ty).to(tl.float32)
    return dy, xhat


@fast_launch
@triton.jit
def _norm_bwd_stats_kernel(
    X,  # (M, N) normalised input s, row stride stride_x
    W,  # (N,) weight (if HAS_WEIGHT)
    DY,  # (M, N) gradient of the normed output, row stride stride_dy
    MEAN,  # (M,) fp32 (if HAS_MEAN: layer norm)
    RSTD,  # (M,) fp32
    STATS,  # (M, 1 + HAS_MEAN) fp32 out: c1 (, c2)
    N,
    stride_x,
    stride_dy,
    HAS_MEAN: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # "split", step 1: one row per program (grid = M); reads x and dy once, writes 4-8 bytes.
    row = tl.program_id(0).to(tl.int64)
    _row_grad_stats(X, W, DY, MEAN, RSTD, STATS, row, N, stride_x, stride_dy, HAS_MEAN, HAS_WEIGHT, 0, False, BLOCK)


@fast_launch
@triton.jit
def _norm_bwd_tiles_kernel(
    X,  # (M, N) normalised input s, row stride stride_x
    W,  # (N,) weight (if HAS_WEIGHT)
    DY,  # (M, N) gradient of the normed output, row stride stride_dy
    DS,  # (M, N) gradient of the returned s, row stride stride_ds (if HAS_DS)
    MEAN,  # (M,) fp32 (if HAS_MEAN)
    RSTD,  # (M,) fp32
    STATS,  # (M, 1 + HAS_MEAN) fp32: c1 (, c2) from _norm_bwd_stats_kernel
    DX,  # (M, N) out, contiguous
    PART,  # (G, COMPUTE_DW + COMPUTE_DB, N) fp32 partials: dw (if COMPUTE_DW), then db (if COMPUTE_DB)
    M,
    N,
    stride_x,
    stride_dy,
    stride_ds,
    HAS_MEAN: tl.constexpr,
    ROUND_XHAT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # "split", step 2: grid = (cdiv(N, BLOCK_N), G), as _norm_dwdb_kernel; program (c, g) owns
    # columns [c*BLOCK_N, ...) and rows g*BLOCK_M + k*G*BLOCK_M, writes their dx and one partial
    # row per gradient. Reads x and dy once more; writes dx once.
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    G = tl.num_programs(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.zeros((BLOCK_N,), dtype=tl.float32)  # unused
    acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(pid_g * BLOCK_M, M, G * BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        x, dy = _load_tile(X, DY, rows, cols, col_ok, M, stride_x, stride_dy, 0)
        dy, xhat = _tile_dx(x, dy, X, DS, MEAN, RSTD, STATS, DX, w, rows, cols, col_ok, M, N, stride_ds, HAS_MEAN,
                            HAS_WEIGHT, HAS_DS, ROUND_XHAT, 0, False)
        if COMPUTE_DW:
            acc_w += dy * xhat  # dy is 0 outside the mask, so padded lanes add nothing
        if COMPUTE_DB:
            acc_b += dy
    part = PART + pid_g.to(tl.int64) * (COMPUTE_DW + COMPUTE_DB) * N
    if COMPUTE_DW:
        tl.store(part + cols, tl.sum(acc_w, axis=0), mask=col_ok)
    if COMPUTE_DB:
        tl.store(part + COMPUTE_DW * N + cols, tl.sum(acc_b, axis=0), mask=col_ok)


@fast_launch
@triton.jit
def _norm_bwd_chain_kernel(
    X,  # (M, N) normalised input s, row stride stride_x
    W,  # (N,) weight (if HAS_WEIGHT)
    DY,  # (M, N) gradient of the normed output, row stride stride_dy
    DS,  # (M, N) gradient of the returned s, row stride stride_ds (if HAS_DS)
    MEAN,  # (M,) fp32 (if HAS_MEAN)
    RSTD,  # (M,) fp32
    STATS,  # (M, 1 + HAS_MEAN) fp32 scratch: c1 (, c2), written by the stats programs
    SYNC,  # (n_chunks + 1 (+ n_chunks * n_col_blocks),) int32, zeroed: stats programs done per
    #        chunk, the ticket counter (, then a done flag per tile when SUPER > 1)
    DX,  # (M, N) out, contiguous
    PART,  # (cdiv(n_chunks, SUPER), COMPUTE_DW + COMPUTE_DB, N) fp32 partials: one row per SUPER chunks
    M,
    N,
    stride_x,
    stride_dy,
    stride_ds,
    n_chunks,
    n_col_blocks,  # cdiv(N, BLOCK_N)
    HAS_MEAN: tl.constexpr,
    ROUND_XHAT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    CHUNK_ROWS: tl.constexpr,  # rows per chunk, a multiple of BLOCK_M
    LAG: tl.constexpr,  # chunks by which the tile programs trail the stats programs (>= 1)
    SUPER: tl.constexpr,  # chunks per partial row (> 1: added up in chunk order by the tiles, see below)
    LOAD_HINT: tl.constexpr,  # _load_hint hints of the stats loads (1: evict_last) and of the
    RELOAD_HINT: tl.constexpr,  # tiles' re-loads and dx stores (2: evict_first); 0: none
    PREFETCH: tl.constexpr,  # both roles load their next chunk / tile before the current one's math
    STAT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # "split" in one launch, ordered so that the tile programs re-read x and dy from L2.
    # Programs take roles by a ticket v (an atomic counter, so v follows the order in which
    # programs actually start): v = step * (CHUNK_ROWS + n_col_blocks) + r;
    #   r <  CHUNK_ROWS: stats program of row step * CHUNK_ROWS + r (chunk `step`);
    #   r >= CHUNK_ROWS: tile program of column block r - CHUNK_ROWS of chunk step - LAG: waits
    #                    until the CHUNK_ROWS stats programs of its chunk are done, then computes
    #                    dx for its (CHUNK_ROWS, BLOCK_N) slab and that slab's partial dw/db.
    # A tile program only waits on programs with smaller tickets, which have all started already
    # and never wait themselves: no deadlock, whatever the hardware's block scheduling order (the
    # scheme of CUB's single-pass scan). Between a row's stats read and its tiles' re-read, the
    # x and dy of about (resident programs / (CHUNK_ROWS + n_col_blocks) + LAG) chunks pass
    # through L2 (CHUNK_ROWS * N * 4 bytes each in bf16: 4 MB at 32 x 32768; L2 is 50 MB on the
    # H100), plus their dx writes (hence the eviction hints): small chunks keep that reuse
    # distance short, at the price of more partial rows. ncu on the H100 at CHUNK_ROWS=64, 8
    # warps: 832 MB read from DRAM for 512 MB of x, dy (about half the re-reads missed L2).
    v = tl.atomic_add(SYNC + n_chunks, 1)
    per_step = CHUNK_ROWS + n_col_blocks
    step = v // per_step
    r = v % per_step
    if r < CHUNK_ROWS:
        if step < n_chunks:
            row = step.to(tl.int64) * CHUNK_ROWS + r
            if row < M:
                _row_grad_stats(X, W, DY, MEAN, RSTD, STATS, row, N, stride_x, stride_dy, HAS_MEAN, HAS_WEIGHT,
                                LOAD_HINT, PREFETCH, STAT_BLOCK)
            # every thread's STATS store is done before the count goes up (the atomic's release
            # order then publishes them to the tile programs)
            tl.debug_barrier()
            tl.atomic_add(SYNC + step, 1)
    else:
        chunk = step - LAG
        if chunk >= 0:
            # spin until the chunk's stats are published (acquire; the loop re-reads the count)
            done = tl.atomic_add(SYNC + chunk, 0)
            while done < CHUNK_ROWS:
                done = tl.atomic_add(SYNC + chunk, 0)
            cols = (r - CHUNK_ROWS) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            else:
                w = tl.zeros((BLOCK_N,), dtype=tl.float32)  # unused
            acc_w = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            row0 = chunk * CHUNK_ROWS
            row_end = tl.minimum(M, row0 + CHUNK_ROWS)  # no prefetch past the chunk
            if PREFETCH:
                x_next, dy_next = _load_tile(X, DY, row0 + tl.arange(0, BLOCK_M), cols, col_ok, row_end, stride_x,
                                             stride_dy, RELOAD_HINT)
            for i in range(0, CHUNK_ROWS, BLOCK_M):
                rows = row0 + i + tl.arange(0, BLOCK_M)
                if PREFETCH:
                    x = x_next
                    dy = dy_next
                    x_next, dy_next = _load_tile(X, DY, rows + BLOCK_M, cols, col_ok, row_end, stride_x, stride_dy,
                                                 RELOAD_HINT)
                else:
                    x, dy = _load_tile(X, DY, rows, cols, col_ok, row_end, stride_x, stride_dy, RELOAD_HINT)
                dy, xhat = _tile_dx(x, dy, X, DS, MEAN, RSTD, STATS, DX, w, rows, cols, col_ok, M, N, stride_ds,
                                    HAS_MEAN, HAS_WEIGHT, HAS_DS, ROUND_XHAT, RELOAD_HINT, True)
                if COMPUTE_DW:
                    acc_w += dy * xhat
                if COMPUTE_DB:
                    acc_b += dy
            part = PART + (chunk // SUPER).to(tl.int64) * (COMPUTE_DW + COMPUTE_DB) * N
            pw = tl.sum(acc_w, axis=0)
            pb = tl.sum(acc_b, axis=0)
            if SUPER > 1:
                # SUPER consecutive chunks share a partial row, added in chunk order (so the
                # result does not depend on timing): the tile of chunk k waits for the tile of the
                # same columns in chunk k - 1 (a smaller ticket: it has started, and waits only on
                # smaller tickets still), adds its part to that row and raises its own flag. Fewer
                # partial rows for reduce_partials to read back, mostly summed in L2.
                prev_flag = SYNC + n_chunks + 1 + (chunk - 1) * n_col_blocks + (r - CHUNK_ROWS)
                if chunk % SUPER != 0:
                    prev_done = tl.atomic_add(prev_flag, 0)
                    while prev_done == 0:
                        prev_done = tl.atomic_add(prev_flag, 0)
                    if COMPUTE_DW:
                        pw += tl.load(part + cols, mask=col_ok, other=0.0, volatile=True)
                    if COMPUTE_DB:
                        pb += tl.load(part + COMPUTE_DW * N + cols, mask=col_ok, other=0.0, volatile=True)
            if COMPUTE_DW:
                tl.store(part + cols, pw, mask=col_ok)
            if COMPUTE_DB:
                tl.store(part + COMPUTE_DW * N + cols, pb, mask=col_ok)
            if SUPER > 1:
                tl.debug_barrier()  # every thread's partial stores before the flag (release)
                tl.atomic_add(SYNC + n_chunks + 1 + chunk * n_col_blocks + (r - CHUNK_ROWS), 1)


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
    if t.is_cuda and t.get_device() != _current_device():
        return torch.cuda.device(t.device)
    return _NO_SWITCH


# torch.cuda.current_device() less its Python layer (a lazy-init check: a CUDA tensor exists, so
# CUDA is initialised); the Python function on builds without the C one
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


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


# Traffic of the wide-row backward in units of one (M, N) bf16 tensor (256 MB at 4096 x 32768);
# the minimum is 3 (read x, dy; write dx). dw/db partials: G x K x N fp32, written and re-read
# by `reduce_partials` (K = 2 for LayerNorm with bias).
#   "loop", N <= DX_FUSED_MAX:  dx row kernel 3 + _norm_dwdb_kernel 2                     = 5
#   "loop", N >  DX_FUSED_MAX:  as above, plus the dx kernel's second pass over each row
#                               (x, dy: 2 more, from L2 if LOOP_PROGRAMS_PER_SM keeps it)  = 5 (+2 L2)
#   "split":  stats 2 (x, dy) + tiles 3 (x, dy, dx) + partials 2*G*K*N*4 bytes (G ~ 17 at
#             N = 32768: ~0.02)                                                            = 5
#   "chain":  stats 2 from DRAM + tiles 1 (dx) + re-read of x, dy from L2 (0 from DRAM when it
#             hits) + partials 2*(M/(CHUNK_ROWS*CHAIN_SUPER))*K*N*4 bytes (4K/(CHUNK_ROWS*SUPER)
#             units: 0.016 at 32 rows x 16 with K = 2; 0.25 with one row per chunk)  ~ 3.0-3.3 (ideal)
#             (measured at CHUNK_ROWS=64: 3.25 read + 1 written, half the re-reads missing L2)
# plus 4-8 bytes per row of STATS, written once and read once per column block (L2).
def wide_backward(x2, weight, dy2, ds2, mean, rstd, dx, m, n, stride_x, stride_dy, stride_ds,
                  compute_dw: bool, compute_db: bool, *, round_xhat: bool, variant: str | None = None):
    """dx (written into the contiguous `dx`) and the (G, K, N) fp32 dw/db partials for
    `reduce_partials` (K = compute_dw + compute_db >= 1), by the "split" or "chain" variant
    (default WIDE_BWD). x2 / dy2 / ds2: base tensors of (m, n) rows with the given row strides
    (see `as_rows`); ds2 is None without the add variant's upstream gradient; mean is None for
    RMSNorm."""
    variant = variant or WIDE_BWD
    has_mean = mean is not None
    k = int(compute_dw) + int(compute_db)
    dev = x2.device
    stats = torch.empty((m, 2 if has_mean else 1), dtype=torch.float32, device=dev)
    stat_block = min(STATS_CFG[0], next_pow2(n))
    common = dict(HAS_MEAN=has_mean, ROUND_XHAT=round_xhat, HAS_WEIGHT=weight is not None, HAS_DS=ds2 is not None,
                  COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db)
    w = weight if weight is not None else x2  # unused pointers stand in for absent tensors
    mean_ = mean if has_mean else rstd
    ds_ = ds2 if ds2 is not None else dy2
    if variant == "split":
        _norm_bwd_stats_kernel[(m,)](
            x2, w, dy2, mean_, rstd, stats, n, stride_x, stride_dy,
            HAS_MEAN=has_mean, HAS_WEIGHT=weight is not None, BLOCK=stat_block, num_warps=STATS_CFG[1],
        )  # fmt: skip
        block_m, block_n, warps = SPLIT_TILE
        block_n = min(block_n, next_pow2(n))
        col_blocks = cdiv(n, block_n)
        # enough programs for SPLIT_PROGRAMS_PER_SM per SM, but few row groups (partials)
        g = max(1, min(cdiv(m, block_m), cdiv(device_sms(x2) * SPLIT_PROGRAMS_PER_SM, col_blocks)))
        part = torch.empty((g, k, n), dtype=torch.float32, device=dev)
        _norm_bwd_tiles_kernel[(col_blocks, g)](
            x2, w, dy2, ds_, mean_, rstd, stats, dx, part, m, n, stride_x, stride_dy, stride_ds,
            **common, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
        return part
    if variant == "chain":
        block_m, block_n = CHAIN_TILE if isinstance(CHAIN_TILE, tuple) else CHAIN_TILE[
            "layer_norm" if has_mean else "rms_norm"]
        block_n = min(block_n, next_pow2(n))
        rows = max(CHAIN_ROWS, block_m)  # both powers of two: rows is a multiple of block_m
        n_chunks = cdiv(m, rows)
        lag = max(1, min(CHAIN_LAG, n_chunks))
        col_blocks = cdiv(n, block_n)
        sup = max(1, min(CHAIN_SUPER, n_chunks))
        sync = torch.zeros((n_chunks + 1 + (n_chunks * col_blocks if sup > 1 else 0),), dtype=torch.int32, device=dev)
        part = torch.empty((cdiv(n_chunks, sup), k, n), dtype=torch.float32, device=dev)
        # n_chunks + lag steps of (rows stats programs + col_blocks tile programs); those whose
        # role falls outside [0, n_chunks) do nothing
        grid = (n_chunks + lag) * (rows + col_blocks)
        _norm_bwd_chain_kernel[(grid,)](
            x2, w, dy2, ds_, mean_, rstd, stats, sync, dx, part, m, n, stride_x, stride_dy, stride_ds,
            n_chunks, col_blocks, **common, CHUNK_ROWS=rows, LAG=lag, SUPER=sup,
            LOAD_HINT=1 if CHAIN_EVICT_HINTS else 0, RELOAD_HINT=2 if CHAIN_EVICT_HINTS else 0, PREFETCH=CHAIN_PREFETCH,
            STAT_BLOCK=stat_block, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=CHAIN_WARPS,
        )  # fmt: skip
        return part
    raise ValueError(f"unknown wide-row backward variant {variant!r} (WIDE_BWD: 'loop', 'split' or 'chain')")
