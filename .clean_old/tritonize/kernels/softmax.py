"""softmax(x, dim=-1): Triton forward and backward, fp32 accumulation, rows of any width.

Layout. The softmax dim is moved last by a *view* (`movedim`), and the remaining dims are merged
into at most two "row" dims (R1, R2), each with its own stride per tensor. The kernels take every
stride, so a softmax over dim=0, a padded row buffer or a stride-0 upstream gradient is read in
place; a copy happens only when the leading dims cannot be expressed as two strided dims.

Tiling. A program owns a [BLOCK_R, BLOCK_N] tile: BLOCK_R rows of the same r1, BLOCK_N columns.
- Unit-stride softmax dim (the usual case): BLOCK_N covers the row when it fits (narrow rows
  pack several rows per program), otherwise the row is walked in BLOCK_N chunks.
- Unit-stride *row* dim (softmax over dim=0 of a contiguous tensor, a transposed view): BLOCK_R
  rows side by side, so that each load of a column chunk is coalesced across rows.

Wide rows (the row does not fit one block) take the online max/sum (Milakov & Gimelshein):
    m_new = max(m, max(block));  s = s * exp(m - m_new) + sum(exp(block - m_new))
and a second pass writes exp(x - m) / s. The row is re-read once, mostly from L2.

Backward needs only the output:  dx = y * (dy - sum(dy * y)).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tritonize.kernels._launch import fast_launch

from ._common import FLOAT_DTYPES, INTERPRET, check_arg, check_tensor, eager_fast_path, fast_apply, use_triton
from ._norm_common import cdiv, device_ctx, next_pow2

# Widest row done in one block (as Liger); above it the looped (online) kernel walks the row in
# LOOP_BLOCK chunks. At 32768 the one-block kernel runs 32 warps (1024 threads, so at most 64
# registers a thread) holding 32 fp32 values per live tensor: the backward (y and dy live) may
# spill there. Not yet measured: `python -m benchmarks.bench_rowwise --sweep` times the
# alternatives (16384 / 8192 caps, other warp counts) to settle these two numbers on the H100.
MAX_BLOCK = 32768
LOOP_BLOCK = 8192
# Elements per program tile for narrow rows (several rows per program) and transposed layouts.
# The interpreter runs programs one after another, so there fewer, larger tiles are faster.
TILE = 16384 if INTERPRET else 2048
TILE_STRIDED = 4096
ROWS_STRIDED = 64  # rows per program when rows, not columns, are unit-stride


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@fast_launch
@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # (R1, R2, N) strided: the input, softmax dim last
    y_ptr,  # (R1, R2, N) strided: the output, same dtype as x
    R2,
    N,
    sx1,
    sx2,
    sxn,
    sy1,
    sy2,
    syn,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the whole row stays in registers
):
    r1 = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R2
    # Rows past the end re-read the last row (always valid memory, already cached) instead of
    # loading -inf, which would make them NaN; only the store is masked by row.
    rows_in = tl.minimum(rows, R2 - 1)
    x_rows = x_ptr + r1 * sx1 + rows_in[:, None] * sx2  # [BLOCK_R, 1]
    y_rows = y_ptr + r1 * sy1 + rows[:, None] * sy2
    cols = tl.arange(0, BLOCK_N).to(tl.int64)

    if ONE_BLOCK:
        col_ok = cols < N
        x = tl.load(x_rows + cols[None, :] * sxn, mask=col_ok[None, :], other=-float("inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        e = tl.exp(x - m[:, None])
        inv = 1.0 / tl.sum(e, axis=1)
        y = e * inv[:, None]
        tl.store(y_rows + cols[None, :] * syn, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        # Pass 1, online max and sum over the row's chunks (fp32):
        #   m_new = max(m, max(chunk));  s = s * exp(m - m_new) + sum(exp(chunk - m_new))
        m = tl.full([BLOCK_R], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = tl.load(
                x_rows + c[None, :] * sxn, mask=(c < N)[None, :], other=-float("inf"), eviction_policy="evict_last"
            ).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            # While every value seen is -inf, m_new is -inf and exp(-inf - -inf) is NaN: shift by
            # 0 instead, which leaves s = 0 (a fully -inf row still ends as NaN, as in torch).
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
            m = m_new
        inv = 1.0 / s
        # Pass 2: y = exp(x - m) / s, re-reading the row (mostly from L2).
        for start in range(0, N, BLOCK_N):
            c = start + cols
            col_ok = c < N
            x = tl.load(
                x_rows + c[None, :] * sxn, mask=col_ok[None, :], other=-float("inf"), eviction_policy="evict_first"
            ).to(tl.float32)
            y = tl.exp(x - m[:, None]) * inv[:, None]
            tl.store(y_rows + c[None, :] * syn, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@fast_launch
@triton.jit
def _softmax_bwd_kernel(
    y_ptr,  # (R1, R2, N) strided: the forward output
    dy_ptr,  # (R1, R2, N) strided (stride 0 allowed): upstream gradient
    dx_ptr,  # (R1, R2, N) strided: gradient of the input, same dtype as y
    R2,
    N,
    sy1,
    sy2,
    syn,
    sdy1,
    sdy2,
    sdyn,
    sdx1,
    sdx2,
    sdxn,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    # y = softmax(x):  dx_i = sum_j dy_j * dy_j/dx_i = y_i * (dy_i - sum_j dy_j * y_j)
    r1 = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R2
    rows_in = tl.minimum(rows, R2 - 1)
    y_rows = y_ptr + r1 * sy1 + rows_in[:, None] * sy2
    dy_rows = dy_ptr + r1 * sdy1 + rows_in[:, None] * sdy2
    dx_rows = dx_ptr + r1 * sdx1 + rows[:, None] * sdx2
    cols = tl.arange(0, BLOCK_N).to(tl.int64)

    if ONE_BLOCK:
        col_ok = (cols < N)[None, :]
        y = tl.load(y_rows + cols[None, :] * syn, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_rows + cols[None, :] * sdyn, mask=col_ok, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=1)
        dx = y * (dy - dot[:, None])
        tl.store(dx_rows + cols[None, :] * sdxn, dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)
    else:
        dot = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            col_ok = (c < N)[None, :]
            y = tl.load(y_rows + c[None, :] * syn, mask=col_ok, other=0.0, eviction_policy="evict_last")
            dy = tl.load(dy_rows + c[None, :] * sdyn, mask=col_ok, other=0.0, eviction_policy="evict_last")
            dot += tl.sum(y.to(tl.float32) * dy.to(tl.float32), axis=1)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            col_ok = (c < N)[None, :]
            y = tl.load(y_rows + c[None, :] * syn, mask=col_ok, other=0.0, eviction_policy="evict_first")
            dy = tl.load(dy_rows + c[None, :] * sdyn, mask=col_ok, other=0.0, eviction_policy="evict_first")
            dx = y.to(tl.float32) * (dy.to(tl.float32) - dot[:, None])
            tl.store(dx_rows + c[None, :] * sdxn, dx.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _row_dims(tensors, dim):
    """Views of `tensors` (same shape) as (R1, R2, N) with the softmax dim last, as strides.

    Returns (R1, R2, N, [(s1, s2, sn) per tensor]) or None when the leading dims do not merge
    into two strided dims for every tensor at once. Merging dim i into dim i+1 is valid when
    stride[i] == stride[i+1] * size[i+1] (for each tensor); size-1 dims are dropped.
    """
    t0 = tensors[0]
    n = t0.shape[dim]
    merged = []  # [size, [stride per tensor]]
    for i in range(t0.dim()):
        if i == dim or t0.shape[i] == 1:
            continue
        size = t0.shape[i]
        strides = [t.stride(i) for t in tensors]
        if merged and all(prev == s * size for prev, s in zip(merged[-1][1], strides)):
            merged[-1] = [merged[-1][0] * size, strides]
        else:
            merged.append([size, strides])
    if len(merged) > 2:
        return None
    if len(merged) == 2 and abs(merged[0][1][0]) < abs(merged[1][1][0]):
        # Rows may be visited in any order: put the first tensor's smaller-stride row dim inner
        # (R2), so a unit-stride row dim gets the coalesced "rows side by side" tiling.
        merged.reverse()
    while len(merged) < 2:
        merged.insert(0, [1, [0] * len(tensors)])
    if merged[0][0] > 65535 >= merged[1][0]:
        merged.reverse()  # R1 rides on grid dim 1, limited to 65535
    (r1, st1), (r2, st2) = merged
    if r1 > 65535:
        return None
    return r1, r2, n, [(a, b, t.stride(dim)) for a, b, t in zip(st1, st2, tensors)]


def _row_dims_contiguous(t, dim, n_tensors=2):
    """`_row_dims` for the usual case, without its per-dim loop (host time on the hot path): all
    tensors contiguous (an empty_like of a contiguous tensor is) and the softmax dim last, so
    every leading dim merges into R2 with row stride N. Any other dim: the general `_row_dims`."""
    if dim != t.dim() - 1:
        return _row_dims((t,) * n_tensors, dim)
    n = t.shape[-1]
    return 1, t.numel() // n, n, [(0, n, 1)] * n_tensors


@functools.lru_cache(maxsize=1024)
def _launch_config(rows_p2: int, n: int, rows_unit: bool, max_block: int, loop_block: int, num_warps):
    """(BLOCK_R, BLOCK_N, ONE_BLOCK, num_warps), deterministic: no autotune, no recompiles per shape.

    rows_p2: next power of two of the number of rows (caps BLOCK_R); rows_unit: the row dim,
    not the softmax dim, is unit-stride (transposed layout). A row wider than `max_block` is
    walked in chunks of `loop_block`.
    """
    n_p2 = triton.next_power_of_2(max(n, 1))
    if rows_unit:
        block_r = min(ROWS_STRIDED, rows_p2)
        block_n = min(n_p2, max_block, max(TILE_STRIDED // block_r, 1))
    else:
        block_n = n_p2 if n_p2 <= max_block else min(loop_block, max_block)
        block_r = min(max(TILE // block_n, 1), rows_p2)
    tile = block_r * block_n
    if num_warps is None:
        # ~16 elements per thread up to 16 warps; the widest one-block rows get 32 warps.
        num_warps = max(1, min(16, tile // 512))
        if tile >= 32768:
            num_warps = 32
    return block_r, block_n, n <= block_n, num_warps


def softmax_forward(
    x: torch.Tensor, dim: int = -1, max_block: int = MAX_BLOCK, loop_block: int = LOOP_BLOCK, num_warps=None
) -> torch.Tensor:
    """y = softmax(x, dim) in x's dtype.

    `max_block` caps the one-block width (tests use it to reach the looped path with narrow
    rows); `loop_block` / `num_warps` override the launch (benchmarks sweep them).
    """
    dim = dim % x.dim()
    # empty_like keeps x's strides when x is dense (a transposed x gives a transposed y, as torch).
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    rd = _row_dims_contiguous(x, dim) if x.is_contiguous() else _row_dims((x, y), dim)
    if rd is None:
        # Leading dims not expressible as two strided dims (e.g. a 4-D permuted slice): one
        # explicit copy makes them mergeable.
        x = x.contiguous()
        y = torch.empty_like(x)
        rd = _row_dims((x, y), dim)
    r1, r2, n, ((sx1, sx2, sxn), (sy1, sy2, syn)) = rd
    block_r, block_n, one_block, warps = _launch_config(
        next_pow2(r2), n, sx2 == 1 and sxn != 1, max_block, loop_block, num_warps
    )
    with device_ctx(x):
        _softmax_fwd_kernel[(cdiv(r2, block_r), r1)](
            x, y, r2, n, sx1, sx2, sxn, sy1, sy2, syn,
            BLOCK_R=block_r, BLOCK_N=block_n, ONE_BLOCK=one_block, num_warps=warps,
        )  # fmt: skip
    return y


def softmax_backward(
    y: torch.Tensor,
    dy: torch.Tensor,
    dim: int = -1,
    max_block: int = MAX_BLOCK,
    loop_block: int = LOOP_BLOCK,
    num_warps=None,
) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y, dim)), from the forward output only (launch knobs as forward)."""
    dim = dim % y.dim()
    dx = torch.empty_like(y)
    if y.numel() == 0:
        return dx
    if y.is_contiguous() and dy.is_contiguous():
        rd = _row_dims_contiguous(y, dim, 3)
    else:
        rd = _row_dims((y, dy, dx), dim)
    if rd is None:
        # See softmax_forward: an explicit copy where the leading dims do not merge.
        y, dy = y.contiguous(), dy.contiguous()
        dx = torch.empty_like(y)
        rd = _row_dims((y, dy, dx), dim)
    r1, r2, n, ((sy1, sy2, syn), (sdy1, sdy2, sdyn), (sdx1, sdx2, sdxn)) = rd
    block_r, block_n, one_block, warps = _launch_config(
        next_pow2(r2), n, sy2 == 1 and syn != 1, max_block, loop_block, num_warps
    )
    with device_ctx(y):
        _softmax_bwd_kernel[(cdiv(r2, block_r), r1)](
            y, dy, dx, r2, n, sy1, sy2, syn, sdy1, sdy2, sdyn, sdx1, sdx2, sdxn,
            BLOCK_R=block_r, BLOCK_N=block_n, ONE_BLOCK=one_block, num_warps=warps,
        )  # fmt: skip
    return dx


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to Dynamo/AOTAutograd/Inductor) + autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tritonize::softmax_fwd", mutates_args=())
def _softmax_fwd_op(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _fwd_impl(x, dim)


@_softmax_fwd_op.register_fake
def _(x, dim):
    return torch.empty_like(x)


@torch.library.custom_op("tritonize::softmax_bwd", mutates_args=())
def _softmax_bwd_op(y: torch.Tensor, dy: torch.Tensor, dim: int) -> torch.Tensor:
    if use_triton(y):
        return softmax_backward(y, dy, dim)
    return softmax_backward_reference(y, dy, dim, upcast=True)


@_softmax_bwd_op.register_fake
def _(y, dy, dim):
    return torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_bwd_op(y, dy, ctx.dim), None


_softmax_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _fwd_impl(x, dim):
    if use_triton(x):
        return softmax_forward(x, dim)
    return softmax_reference(x, dim, upcast=True)


class _SoftmaxFn(torch.autograd.Function):
    """Eager fast path (see `_common.eager_fast_path`): the launchers without the custom-op
    dispatch layers, which cost several times the Python time of a plain autograd.Function per
    forward+backward and left the GPU idle (8192x4096 bf16 fwd+bwd: 0.56 ms vs 0.05 + 0.14)."""

    @staticmethod
    def forward(ctx, x, dim):
        # the launcher directly: the public function has checked that Triton runs on x
        y = softmax_forward(x, dim)
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return softmax_backward(y, dy, ctx.dim), None


# the C autograd apply without torch's Python layer (see _common.fast_apply)
_softmax_fn = fast_apply(_SoftmaxFn)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def softmax_reference(x: torch.Tensor, dim: int = -1, upcast: bool = True) -> torch.Tensor:
    """torch.softmax, computed in fp32 when `upcast`, returned in x's dtype."""
    xc = x.float() if upcast else x
    return torch.softmax(xc, dim).to(x.dtype)


def softmax_backward_reference(y: torch.Tensor, dy: torch.Tensor, dim: int = -1, upcast: bool = True) -> torch.Tensor:
    yc, dyc = (y.float(), dy.float()) if upcast else (y, dy)
    return (yc * (dyc - (yc * dyc).sum(dim, keepdim=True))).to(y.dtype)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` (torch.softmax semantics, output in x's dtype, fp32 accumulation).

    Any dim, any strides; rows of any width (one block up to 32768, looped above).
    """
    # fast path for the common (valid) call: no message is formatted unless a check fails
    if not (isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and type(dim) is int and -x.dim() <= dim < x.dim()):
        check_tensor("softmax", "x", x)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"tritonize.softmax: argument 'dim' must be an int, got {type(dim).__name__}")
        nd = max(x.dim(), 1)
        check_arg("softmax", "dim", -nd <= dim < nd, f"is out of range for a {x.dim()}-d tensor, got {dim}")
    if x.dim() == 0:
        return softmax(x.reshape(1), 0).reshape(())
    if eager_fast_path(x):
        return _softmax_fn(x, dim % x.dim())
    return _softmax_fwd_op(x, dim % x.dim())
