"""Cross-entropy over a row whose logits arrive in vocabulary slices (linear_cross_entropy's
"lean" mode): the same loss and gradient as `cross_entropy`'s one-row kernel, in two steps.

Why. linear_cross_entropy keeps one (C, V) chunk of logits at a time. At Liger's transient
budget (C x V ~ N x H: C = 256 rows at N 8192, H 2048, V 128256) each chunk adds its
dlogits^T @ h into dW with a GEMM only C rows deep, so every chunk re-reads and re-writes all of
dW (0.53 ms of cuBLAS per chunk there, 32 chunks). With the same buffer holding C' = 2C rows of
half the vocabulary, dW is walked half as often; the price is that a row's softmax normaliser
needs every slice, so the slices are walked twice:

    pass 1, slice s = 1..k:  logits_s = h_c @ W_s^T          state(row) <- merge(state, stats(logits_s))
    pass 2, slice s = k, 1..k-1 (slice k is still in the buffer; the others are recomputed):
                             dlogits_s = grad(logits_s, state)   dh_c += dlogits_s @ W_s,
                                                                 dW_s += dlogits_s^T @ h_c

Per row, state = (m, d, zsum) with z = logits (soft-capped: z = cap * tanh(x / cap)):
    m = max_j z_j,   d = sum_j exp(z_j - m)   (online: d <- d * exp(m - m') + sum exp(z - m'))
    zsum = sum_j z_j (label smoothing only),  x_t = z_target (from the slice that holds it)
then lse = m + log d, and loss / gradient are exactly `cross_entropy`'s:
    loss = (1 - eps) * (lse - z_t) + eps * (lse - zsum / V)
    dz   = softmax(z) - (1 - eps) * onehot(t) - eps / V     (times 1 - tanh^2 with soft-capping)
all times scale (/ divisor) (* row_scale). Ignored rows: loss 0, zero gradient; a target outside
[0, V) that is not ignored: NaN loss and NaN gradient row (as cross_entropy on CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonize.kernels._launch import fast_launch

from ._norm_common import device_ctx
from .cross_entropy import MAX_BLOCK, _fwd_config, _loss_scale, _online_stats, _tanh, _write_grad, _zero_grad_row


@fast_launch
@triton.jit
def _slice_stats_kernel(
    x_ptr,  # (R, n_cols) logits of one vocabulary slice, row stride stride_x, unit column stride
    t_ptr,  # (R,) integer targets, stride stride_t
    st_ptr,  # (3, R) fp32 state: m, d, zsum (read unless FIRST, then written)
    xt_ptr,  # (R,) fp32: z_target, written by the slice holding the target
    stride_st,  # row stride of the state (its rows may outnumber this chunk's)
    stride_x,
    stride_t,
    n_cols,  # valid columns of this slice
    col_off,  # the slice's first column in the vocabulary
    ignore_index,
    softcap,
    FIRST: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row * stride_t).to(tl.int64)
    if t == ignore_index:
        return  # the gradient kernel never reads an ignored row's state
    x_row = x_ptr + row * stride_x
    if FIRST:
        zero = tl.full([], 0.0, tl.float32)  # fp32 tensors, like the loaded state
        m = zero - float("inf")
        d = zero
        zsum = zero
    else:
        m = tl.load(st_ptr + row)
        d = tl.load(st_ptr + stride_st + row)
        zsum = tl.load(st_ptr + 2 * stride_st + row)
    m, d, zsum = _online_stats(x_row, n_cols, m, d, zsum, softcap, SMOOTHING, SOFTCAP, False, BLOCK)
    tl.store(st_ptr + row, m)
    tl.store(st_ptr + stride_st + row, d)
    tl.store(st_ptr + 2 * stride_st + row, zsum)
    tc = t - col_off
    if (tc >= 0) & (tc < n_cols):
        x_t = tl.load(x_row + tc).to(tl.float32)
        if SOFTCAP:
            x_t = softcap * _tanh(x_t / softcap)
        tl.store(xt_ptr + row, x_t)


@fast_launch
@triton.jit
def _slice_grad_kernel(
    x_ptr,  # (R, n_cols) logits of one slice; the gradient is written over them (in place)
    t_ptr,  # (R,) integer targets, stride stride_t
    loss_ptr,  # (R,) fp32 per-row loss (written if WRITE_LOSS)
    div_ptr,  # () divisor: int64 count or fp32 normalizer (read only if HAS_DIV)
    rs_ptr,  # (R,) per-row scale, stride stride_rs (read only if HAS_ROW_SCALE)
    st_ptr,  # (3, R) fp32 state of the whole row (every slice merged)
    xt_ptr,  # (R,) fp32 z_target
    stride_st,
    stride_x,
    stride_t,
    stride_rs,
    n_cols,  # valid columns of this slice
    col_off,  # the slice's first column in the vocabulary
    n_total,  # V
    ignore_index,
    scale,
    smoothing,
    softcap,
    HAS_DIV: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    t = tl.load(t_ptr + row * stride_t).to(tl.int64)
    if t == ignore_index:
        if WRITE_LOSS:
            tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            _zero_grad_row(x_row, n_cols, BLOCK)
        return
    s = _loss_scale(scale, div_ptr, rs_ptr, row, stride_rs, HAS_DIV, HAS_ROW_SCALE)
    valid = (t >= 0) & (t < n_total)
    lse = tl.load(st_ptr + row) + tl.log(tl.load(st_ptr + stride_st + row))
    if WRITE_LOSS:
        x_t = tl.load(xt_ptr + row, mask=valid, other=0.0)
        loss = lse - x_t
        if SMOOTHING:
            loss = (1.0 - smoothing) * loss + smoothing * (lse - tl.load(st_ptr + 2 * stride_st + row) / n_total)
        tl.store(loss_ptr + row, tl.where(valid, loss * s, float("nan")))
    if COMPUTE_GRAD:
        _write_grad(x_row, x_row, n_cols, t - col_off, lse, s, valid, n_total, smoothing, softcap, SMOOTHING, SOFTCAP,
                    False, BLOCK)  # fmt: skip


def slice_stats(logits, target, state, x_t, col_off, *, first, ignore_index, smoothing, softcap):
    """Merge the (R, n) slice `logits` (unit column stride) into `state` (3, R) / `x_t` (R,)."""
    r, n = logits.shape
    blk, warps = _fwd_config(n, MAX_BLOCK)
    with device_ctx(logits):
        _slice_stats_kernel[(r,)](
            logits, target, state, x_t, state.stride(0), logits.stride(0), target.stride(0), n, col_off, ignore_index,
            float(softcap or 1.0), FIRST=first, SMOOTHING=smoothing > 0.0, SOFTCAP=softcap is not None,
            BLOCK=blk, num_warps=warps,
        )  # fmt: skip


def slice_grad(logits, target, state, x_t, loss, col_off, n_total, *, ignore_index, divisor, scale, smoothing,
               softcap, row_scale, compute_grad, write_loss):  # fmt: skip
    """Loss rows (if `write_loss`) and, if `compute_grad`, the gradient of the slice written over
    `logits` in place, from the merged row `state`."""
    r, n = logits.shape
    blk, warps = _fwd_config(n, MAX_BLOCK)
    with device_ctx(logits):
        _slice_grad_kernel[(r,)](
            logits, target, loss, divisor if divisor is not None else loss,
            row_scale if row_scale is not None else loss, state, x_t, state.stride(0), logits.stride(0), target.stride(0),
            row_scale.stride(0) if row_scale is not None and row_scale.dim() else 0, n, col_off, n_total,
            ignore_index, float(scale), float(smoothing), float(softcap or 1.0),
            HAS_DIV=divisor is not None, HAS_ROW_SCALE=row_scale is not None, SMOOTHING=smoothing > 0.0,
            SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, WRITE_LOSS=write_loss,
            BLOCK=blk, num_warps=warps,
        )  # fmt: skip


def state_buffers(rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(state (3, rows) fp32, x_t (rows,) fp32) for one chunk's rows, reused across chunks."""
    buf = torch.empty((4, rows), dtype=torch.float32, device=device)
    return buf[:3], buf[3]
