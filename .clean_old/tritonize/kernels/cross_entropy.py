"""cross_entropy(logits, target, ...): loss and gradient in one Triton kernel, fp32 inside.

Why the gradient is computed in the forward. The backward of softmax cross-entropy needs the whole
softmax row again: computing it there means a third read of the (N, V) logits (2.1 GB at
8192 x 128256 in bf16), and keeping the logits alive until the backward. The forward has already
found the row's max and sum, so a second pass over the row (still mostly in L2) writes
    dlogits = scale * (softmax(z) - (1 - eps) * onehot(t) - eps / V)
and the backward is only a multiplication by the upstream gradient. The usual upstream gradient
is exactly 1 (the loss is the last op), so the backward kernel reads one scalar per row and
returns: fwd+bwd costs one read of the logits from DRAM plus one write (Liger's trick).

Where the gradient goes. `inplace=True` (an explicit keyword; the fuser sets it only when the
logits are dead after the loss) writes it over the logits buffer (a custom op with
mutates_args=("logits",)): no memory beyond the logits. Otherwise it goes into a new buffer.
If something else still needs the logits (an op that saved them for its own backward), autograd's
version counter makes that op's backward fail loudly rather than use the overwritten values.

Math per row (z = logits, optionally soft-capped z = cap * tanh(x / cap); t = target; eps = label
smoothing; lse = log sum exp z, by the online max/sum of Milakov & Gimelshein):
    loss = (1 - eps) * (lse - z_t) + eps * (lse - mean(z))            (torch's label smoothing)
    dz   = softmax(z) - (1 - eps) * onehot(t) - eps / V
    dx   = dz * (1 - tanh(x / cap)^2)                                 (soft-capping only)
Both are multiplied by `scale` = 1 / (number of non-ignored targets) for mean, 1 for sum and
none, or 1 / normalizer. Ignored rows give loss 0 and gradient 0; an all-ignored batch gives
loss 0 (not NaN): every row returns before reading the count.

Bad targets. A target outside [0, V) that is not ignore_index raises a ValueError for CPU
tensors (a cheap check). On CUDA a check would cost a device->host sync per call, so the kernel
marks the row instead: its loss and its gradient row are NaN, so a mean/sum loss is NaN. A NaN
loss is impossible to miss and needs no sync; a device-side assert would kill the CUDA context.

Scale / normalizer handling never syncs: the count of non-ignored targets (or a tensor
normalizer, e.g. transformers' `num_items_in_batch`) stays on the device and the kernel loads it.
The loss is returned in fp32 (the rows are computed in fp32; a caller wanting the logits' dtype
casts it).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from tritonize.kernels._launch import fast_launch

from ._norm_common import device_ctx, next_pow2
from ._common import (
    FLOAT_DTYPES, INTERPRET, check_arg, check_same_device, check_tensor, eager_fast_path, fast_apply, rows_2d, use_triton,
)  # fmt: skip

# Widest column block of the row walk. 32768 values over 32 warps (Liger's H100 choice) keeps
# 32 fp32 registers per thread per live tensor. The interpreter uses a small block so that CPU
# tests with V ~ 1000-3000 take the multi-block path.
MAX_BLOCK = 1024 if INTERPRET else 32768
# Column block of the backward scale kernel (one program per row, walking its columns).
SCALE_BLOCK = 1024 if INTERPRET else 4096
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
REDUCTIONS = ("mean", "sum", "none")
LOG2E = tl.constexpr(1.4426950408889634)  # globals read by @triton.jit must be constexpr


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh without libdevice (triton 3.6 and 3.9 alike): tanh(x) = 2 * sigmoid(2x) - 1
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _online_stats(x_row, n_cols, m, d, zsum, softcap, SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr,
                  EVICT_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """(m, d, zsum) updated with the n_cols logits at x_row: online max m and sum d of exp(z - m)
    in fp32, base 2 (Milakov & Gimelshein), and the plain sum zsum (label smoothing only):
        m_new = max(m, max(block));  d = d * 2^((m - m_new) log2 e) + sum 2^((z - m_new) log2 e)"""
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        if EVICT_LAST:  # the row is read again by the gradient pass: keep it in L2
            z = tl.load(x_row + c, mask=mask, other=-float("inf"), eviction_policy="evict_last").to(tl.float32)
        else:
            z = tl.load(x_row + c, mask=mask, other=-float("inf")).to(tl.float32)
        if SOFTCAP:
            z = tl.where(mask, softcap * _tanh(z / softcap), -float("inf"))
        if SMOOTHING:
            zsum += tl.sum(tl.where(mask, z, 0.0))
        m_new = tl.maximum(m, tl.max(z))
        d = d * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((z - m_new) * LOG2E))
        m = m_new
    return m, d, zsum


@triton.jit
def _zero_grad_row(g_row, n_cols, BLOCK: tl.constexpr):
    """An ignored row's gradient: zeros (the linear form sums every row into dW)."""
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        tl.store(g_row + c, tl.zeros([BLOCK], tl.float32).to(g_row.dtype.element_ty), mask=c < n_cols)


@triton.jit
def _loss_scale(scale, div_ptr, rs_ptr, row, stride_rs, HAS_DIV: tl.constexpr, HAS_ROW_SCALE: tl.constexpr):
    """scale (/ divisor) (* the row's scale): the factor of a row's loss and gradient."""
    s = scale
    if HAS_DIV:
        # A count of 0 (all targets ignored) is never read: ignored rows return before this.
        s = s / tl.load(div_ptr).to(tl.float32)
    if HAS_ROW_SCALE:
        s = s * tl.load(rs_ptr + row * stride_rs).to(tl.float32)
    return s


@triton.jit
def _write_grad(x_row, g_row, n_cols, t_col, lse, s, valid, n_total, smoothing, softcap,
                SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr, EVICT_FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """g = s * (softmax(z) - (1 - eps) onehot(t) - eps / V) over the n_cols columns at x_row
    (t_col: the target's column among them, or outside [0, n_cols)), formed in fp32 before the
    one rounding to g's dtype (softmax_t - 1 cancels); times 1 - tanh^2 with soft-capping. An
    invalid row (not `valid`) gets NaN everywhere. g_row may be x_row (in place)."""
    on = 1.0 - smoothing
    off = smoothing / n_total
    bad = tl.where(valid, 0.0, float("nan"))
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        if EVICT_FIRST:  # the row's last read: leave L2 to the rows still being walked
            z = tl.load(x_row + c, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            z = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            th = _tanh(z / softcap)
            z = softcap * th
        p = tl.exp2((z - lse) * LOG2E)
        if SMOOTHING:
            p = p - off
        dz = (tl.where(c == t_col, p - on, p) + bad) * s
        if SOFTCAP:
            # d(cap * tanh(x / cap)) / dx = 1 - tanh(x / cap)^2
            dz = dz * (1.0 - th * th)
        tl.store(g_row + c, dz.to(g_row.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr,  # (N, V) logits, row stride stride_x, unit column stride
    g_ptr,  # (N, V) gradient out, row stride stride_g; may be x_ptr itself (in place)
    t_ptr,  # (N,) integer targets, stride stride_t
    loss_ptr,  # (N,) fp32 per-row loss (already multiplied by the scale)
    div_ptr,  # () divisor: int64 non-ignored count or fp32 normalizer (read only if HAS_DIV)
    rs_ptr,  # (N,) per-row gradient scale, stride stride_rs (read only if HAS_ROW_SCALE)
    stride_x,
    stride_g,
    stride_t,
    stride_rs,
    n_cols,
    ignore_index,
    scale,  # fp32 constant factor (1 / a Python-number normalizer, else 1)
    smoothing,  # label smoothing eps (used if SMOOTHING)
    softcap,  # soft-capping value (used if SOFTCAP)
    HAS_DIV: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    g_row = g_ptr + row * stride_g
    t = tl.load(t_ptr + row * stride_t).to(tl.int64)

    if t == ignore_index:
        # Ignored row: loss 0 and a zero gradient row (it is summed into dW by the linear form).
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            _zero_grad_row(g_row, n_cols, BLOCK)
        return

    s = _loss_scale(scale, div_ptr, rs_ptr, row, stride_rs, HAS_DIV, HAS_ROW_SCALE)
    valid = (t >= 0) & (t < n_cols)
    # Read z_t before pass 2 overwrites the row (in-place mode). An invalid t reads column 0
    # (always in bounds) and the row is marked NaN below.
    x_t = tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32)
    if SOFTCAP:
        x_t = softcap * _tanh(x_t / softcap)

    # Pass 1: online max m and sum d of exp(z - m) over the row (fp32; fp32 tensors from the
    # start, so the helper's loop carries one type)
    zero = tl.full([], 0.0, tl.float32)
    m, d, zsum = _online_stats(x_row, n_cols, zero - float("inf"), zero, zero, softcap, SMOOTHING, SOFTCAP, True,
                               BLOCK)  # fmt: skip
    lse = m + tl.log(d)

    loss = lse - x_t
    if SMOOTHING:
        # torch's smoothing: (1 - eps) * nll + eps * mean_j(-log p_j), and -log p_j = lse - z_j
        loss = (1.0 - smoothing) * loss + smoothing * (lse - zsum / n_cols)
    loss = loss * s
    tl.store(loss_ptr + row, tl.where(valid, loss, float("nan")))

    if COMPUTE_GRAD:
        # Pass 2 (the row is mostly still in L2)
        _write_grad(x_row, g_row, n_cols, t, lse, s, valid, n_cols, smoothing, softcap, SMOOTHING, SOFTCAP, True,
                    BLOCK)  # fmt: skip


@fast_launch
@triton.jit
def _cross_entropy_bwd_kernel(
    g_ptr,  # (R, C) gradient, scaled in place; row stride stride_g, unit column stride
    dy_ptr,  # (R,) upstream gradient per row, stride stride_dy (0 for a broadcast scalar)
    stride_g,
    stride_dy,
    n_cols,
    BLOCK: tl.constexpr,
):
    # g *= dy, skipped where dy == 1 (the loss is the last op): then the backward reads one
    # scalar per program and writes nothing. One program per row walking its columns: a 2-D
    # grid (rows x column blocks) made 262k programs at 8192 x 128256 that mostly just exit.
    row = tl.program_id(0).to(tl.int64)
    dy = tl.load(dy_ptr + row * stride_dy).to(tl.float32)
    if dy != 1.0:
        g_row = g_ptr + row * stride_g
        cols = tl.arange(0, BLOCK)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            mask = c < n_cols
            g = tl.load(g_row + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + c, (g * dy).to(g_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


# A torch.cuda.device context only when t is not on the current device (~10 us of host time per
# launch otherwise); see _norm_common.device_ctx.
_device = device_ctx


@functools.lru_cache(maxsize=256)
def _fwd_config(n_cols: int, max_block: int):
    """(BLOCK, num_warps), deterministic: the same V always gets the same launch."""
    block = min(triton.next_power_of_2(max(n_cols, 1)), max_block)
    if block == 32768 and n_cols <= 32768 and max_block >= 32768:
        # V in (16384, 32768] (Llama-2's 32000): two 16384-blocks over 16 warps beat one
        # 32768-block over 32 (H100: 0.438 vs 0.506 ms fwd+bwd at 8192 x 32000)
        return 16384, 16
    if block >= 16384:
        warps = 32
    elif block >= 4096:
        warps = 16
    elif block >= 1024:
        warps = 8 if block >= 2048 else 4
    else:
        warps = 1 if block <= 128 else 2
    return block, warps


def divisor_for(target: torch.Tensor, ignore_index: int, reduction: str, normalizer: torch.Tensor | None):
    """The device-side divisor of the per-row loss, or None (sum / none / a Python normalizer).

    mean: the number of non-ignored targets, an int64 0-d tensor (two torch ops; a float sum plus
    a clamp cost twice the host time). Stays on the device: no sync. It may be 0 (every target
    ignored): the kernel never reads it then (ignored rows return before), and the reference
    clamps it to >= 1, so an all-ignored batch gives 0, not 0/0.
    """
    if normalizer is not None:
        return normalizer
    if reduction == "mean":
        return torch.count_nonzero(target != ignore_index)
    return None


def cross_entropy_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    divisor: torch.Tensor | None = None,
    scale: float = 1.0,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    compute_grad: bool = True,
    grad: torch.Tensor | None = None,
    loss: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    block: int | None = None,
    num_warps: int | None = None,
):
    """Per-row loss (fp32, times scale / divisor [* row_scale]) and, if `compute_grad`, the
    gradient of sum(loss) w.r.t. logits, written into `grad` (new if None; may be `logits`
    itself for in place). logits (N, V) with unit column stride; target (N,). Returns (loss, grad).
    """
    n, v = logits.shape
    assert logits.stride(1) == 1 or v <= 1, "logits need a unit column stride (use rows_2d)"
    if loss is None:
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if compute_grad and grad is None:
        # empty_like is the cheaper call on the host; for a contiguous logits it is the same buffer
        grad = torch.empty_like(logits) if logits.is_contiguous() else logits.new_empty((n, v))
    if n == 0:
        return loss, grad
    blk, warps = _fwd_config(v, MAX_BLOCK)
    blk, warps = block or blk, num_warps or warps
    g = grad if compute_grad else logits  # unused pointer when not computing the gradient
    with _device(logits):
        _cross_entropy_fwd_kernel[(n,)](
            logits, g, target, loss,
            divisor if divisor is not None else loss,
            row_scale if row_scale is not None else loss,
            logits.stride(0), g.stride(0), target.stride(0) if target.dim() else 0,
            row_scale.stride(0) if row_scale is not None and row_scale.dim() else 0,
            v, ignore_index, float(scale), float(label_smoothing), float(softcap or 1.0),
            HAS_DIV=divisor is not None, HAS_ROW_SCALE=row_scale is not None,
            SMOOTHING=label_smoothing > 0, SOFTCAP=softcap is not None,
            COMPUTE_GRAD=compute_grad, BLOCK=blk, num_warps=warps,
        )  # fmt: skip
    return loss, grad


def cross_entropy_backward(grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """In place: grad (R, C) *= grad_loss (R,) per row (grad_loss may be stride 0).

    Rows whose upstream gradient is exactly 1 are left untouched without being read.
    """
    r, c = grad.shape
    if grad.numel() == 0:
        return
    assert grad.stride(1) == 1 or c <= 1
    blk = min(next_pow2(c), SCALE_BLOCK)
    with _device(grad):
        _cross_entropy_bwd_kernel[(r,)](
            grad, grad_loss, grad.stride(0), grad_loss.stride(0) if grad_loss.dim() else 0, c,
            BLOCK=blk, num_warps=8 if blk >= 4096 else (4 if blk >= 1024 else 2),
        )  # fmt: skip


def scale_rows_(grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """grad (..., C) *= grad_loss (...) in place, by the Triton kernel or by torch.

    The kernel needs a (R, C) view with unit column stride; where `grad` has none (a transposed
    logits buffer in in-place mode) it scales a copy and copies back, explicitly.
    """
    if grad.numel() == 0:
        return
    if not use_triton(grad):
        grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype))
        return
    g2 = rows_2d(grad)
    # a 0-d upstream gradient (mean / sum reductions) is read by every row with stride 0 as is
    dy = grad_loss if grad_loss.dim() == 0 else grad_loss.expand(grad.shape[:-1]).reshape(-1)
    cross_entropy_backward(g2, dy)
    if g2 is not grad and not _is_view_of(g2, grad):
        grad.copy_(g2.view(grad.shape))  # rows_2d had to copy: write the scaled copy back


def _is_view_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to Dynamo/AOTAutograd/Inductor) + autograd
# ---------------------------------------------------------------------------------------------


def _rows_impl(logits, target, normalizer, ignore_index, reduction, scale, label_smoothing, softcap, compute_grad, grad):
    """Shared body of the two forward ops: (loss (target.shape) fp32, grad (logits.shape) or None)."""
    if not use_triton(logits):
        loss, g = cross_entropy_rows_reference(
            logits, target, ignore_index=ignore_index, reduction=reduction, scale=scale,
            normalizer=normalizer, label_smoothing=label_smoothing, softcap=softcap, compute_grad=compute_grad,
        )  # fmt: skip
        if grad is not None and g is not None:
            grad.copy_(g)
            g = grad
        return loss, g
    x2 = rows_2d(logits)
    t1 = target if target.dim() == 1 else target.reshape(-1)  # (no view op when already 1-D)
    g2 = None
    if compute_grad:
        # In place: write over the logits when x2 is a view of them (the usual case).
        g2 = x2 if grad is not None and _is_view_of(x2, grad) else None
    div = divisor_for(t1, ignore_index, reduction, normalizer)
    loss, g2 = cross_entropy_forward(
        x2, t1, ignore_index=ignore_index, divisor=div, scale=scale, label_smoothing=label_smoothing,
        softcap=softcap, compute_grad=compute_grad, grad=g2,
    )  # fmt: skip
    if target.dim() != 1:
        loss = loss.view(target.shape)
    if not compute_grad:
        return loss, None
    if grad is not None:
        if g2 is not grad and not _is_view_of(g2, grad):
            grad.copy_(g2.view(grad.shape))  # logits had no unit-stride row view: explicit copy back
        return loss, grad
    return loss, (g2 if logits.dim() == 2 else g2.view(logits.shape))


@torch.library.custom_op("tritonize::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    normalizer: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    scale: float,
    label_smoothing: float,
    softcap: float | None,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = _rows_impl(
        logits, target, normalizer, ignore_index, reduction, scale, label_smoothing, softcap, compute_grad, None
    )
    if grad is None:
        grad = logits.new_empty(0)
    return loss, grad


@_cross_entropy_fwd_op.register_fake
def _(logits, target, normalizer, ignore_index, reduction, scale, label_smoothing, softcap, compute_grad):
    loss = logits.new_empty(target.shape, dtype=torch.float32)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty(0)
    return loss, grad


@torch.library.custom_op("tritonize::cross_entropy_fwd_inplace", mutates_args=("logits",))
def _cross_entropy_fwd_inplace_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    normalizer: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    scale: float,
    label_smoothing: float,
    softcap: float | None,
) -> torch.Tensor:
    loss, _ = _rows_impl(
        logits, target, normalizer, ignore_index, reduction, scale, label_smoothing, softcap, True, logits
    )
    return loss


@_cross_entropy_fwd_inplace_op.register_fake
def _(logits, target, normalizer, ignore_index, reduction, scale, label_smoothing, softcap):
    return logits.new_empty(target.shape, dtype=torch.float32)


@torch.library.custom_op("tritonize::cross_entropy_bwd", mutates_args=("grad",))
def _cross_entropy_bwd_op(grad: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """grad (..., V) *= grad_loss (...) in place (the gradient was computed by the forward)."""
    scale_rows_(grad, grad_loss)


@_cross_entropy_bwd_op.register_fake
def _(grad, grad_loss):
    return None


def _use_once(ctx):
    # The saved gradient is scaled in place, so a second backward (retain_graph=True) would
    # scale it twice: refuse instead of returning a wrong gradient.
    if getattr(ctx, "_used", False):
        raise RuntimeError(
            "tritonize.cross_entropy: backward ran twice through the same graph; the gradient is "
            "computed in the forward and scaled in place, so it can be used once (no retain_graph)"
        )
    ctx._used = True


def _setup_context(ctx, inputs, output):
    loss, grad = output
    ctx.mark_non_differentiable(grad)
    # Without this, autograd hands the backward a zero-filled (N, V) tensor as the "gradient" of
    # the non-differentiable grad output: 2.1 GB allocated and memset at 8192 x 128256 (measured
    # on the H100: +2.1 GB peak and +0.6 ms per fwd+bwd).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_grad):
    (grad,) = ctx.saved_tensors
    _use_once(ctx)
    _cross_entropy_bwd_op(grad, grad_loss)
    return grad, None, None, None, None, None, None, None, None


_cross_entropy_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _CrossEntropyInplace(torch.autograd.Function):
    """In-place form. A mutating custom op cannot carry register_autograd, so an
    autograd.Function wraps it; the backward is the same in-place scale op."""

    @staticmethod
    def forward(ctx, logits, target, normalizer, ignore_index, reduction, scale, label_smoothing, softcap):
        loss = _cross_entropy_fwd_inplace_op(
            logits, target, normalizer, ignore_index, reduction, scale, label_smoothing, softcap
        )
        # logits now hold the gradient. Save (and so return) a detached alias, not logits itself:
        # AccumulateGrad steals a returned gradient only if nothing else references that tensor
        # object, and the caller's leaf always does; returning logits made it clone 2.1 GB.
        ctx.save_for_backward(logits.detach())
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        _use_once(ctx)
        _cross_entropy_bwd_op(grad, grad_loss)
        return grad, None, None, None, None, None, None, None


class _CrossEntropyFn(torch.autograd.Function):
    """Eager fast path (see _common.eager_fast_path): the launchers without the custom-op
    dispatch layers, and the reduction inside, so a fwd+bwd is one autograd node. Same kernels,
    same numerics as the custom ops, which stay for torch.compile / export / fake tensors."""

    # The non-tensor arguments come packed in one tuple `opts` (see _common.fast_apply).
    @staticmethod
    def forward(ctx, logits, target, normalizer, opts):
        ignore_index, reduction, scale, label_smoothing, softcap, inplace = opts
        grad = logits if inplace else None
        rows, grad = _rows_impl(
            logits, target, normalizer, ignore_index, reduction, scale, label_smoothing, softcap, True, grad
        )
        if inplace:
            # the custom op declares this mutation; here it is bumped by hand, so an op that saved
            # the logits for its own backward fails loudly instead of reading the gradient
            torch.autograd.graph.increment_version(logits)
            grad = logits.detach()  # a separate tensor object: AccumulateGrad can steal it
        ctx.grad = grad  # an attribute, dropped in backward: used once, then owned by the caller
        return rows if reduction == "none" else rows.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad = getattr(ctx, "grad", None)
        if grad is None:
            _use_once(ctx)  # raises: the gradient was already handed out
        ctx.grad = None
        ctx._used = True
        scale_rows_(grad, grad_loss)
        return grad, None, None, None


_cross_entropy_fn = fast_apply(_CrossEntropyFn)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def cross_entropy_rows_reference(
    logits, target, *, ignore_index=-100, reduction="mean", scale=1.0, normalizer=None,
    label_smoothing=0.0, softcap=None, compute_grad=True, upcast=True,
):  # fmt: skip
    """The kernel's contract in plain torch (closed form, no autograd): (per-row loss fp32
    times the scale, gradient of their sum or None). The CPU fallback of the custom ops."""
    x = logits.float() if upcast else logits
    th = None
    if softcap is not None:
        th = torch.tanh(x / softcap)
        x = softcap * th
    v = x.shape[-1]
    keep = target != ignore_index
    t = torch.where(keep, target, 0).long()
    lse = torch.logsumexp(x, -1)
    loss = lse - x.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - x.mean(-1))
    s = torch.full((), float(scale), dtype=torch.float32, device=logits.device)
    div = divisor_for(target, ignore_index, reduction, normalizer)
    if div is not None:
        if normalizer is None:
            div = div.clamp_min(1)  # a mean's count may be 0 (see divisor_for)
        s = s / div.to(logits.device)
    loss = torch.where(keep, loss * s, 0.0).float()
    if not compute_grad:
        return loss, None
    g = torch.softmax(x, -1)
    if label_smoothing > 0:
        g = g - label_smoothing / v
    g = g - (1 - label_smoothing) * torch.nn.functional.one_hot(t, v).to(g.dtype)
    g = g * torch.where(keep, s, 0.0).unsqueeze(-1)
    if th is not None:
        g = g * (1 - th * th)
    return loss, g.to(logits.dtype)


def cross_entropy_reference(
    logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
    logit_softcap=None, normalizer=None, upcast=True,
):  # fmt: skip
    """cross_entropy in plain torch with autograd (F.cross_entropy underneath), our semantics:
    mean over non-ignored targets with an all-ignored batch giving 0; soft-capping; normalizer
    (loss = sum / normalizer). Returned in fp32 when `upcast`."""
    x = logits.float() if upcast else logits
    if logit_softcap is not None:
        x = logit_softcap * torch.tanh(x / logit_softcap)
    rows = torch.nn.functional.cross_entropy(
        x.reshape(-1, x.shape[-1]), target.reshape(-1), ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing,
    ).view(target.shape)  # fmt: skip
    if normalizer is not None:
        return rows.sum() / normalizer
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (target != ignore_index).sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def check_targets(op: str, target: torch.Tensor, n_classes: int, ignore_index: int):
    """CPU targets: a cheap range check with a clear error. CUDA targets are checked by the
    kernel (a bad row's loss is NaN) to avoid a device->host sync per call."""
    if target.is_cuda or target.numel() == 0 or torch.compiler.is_compiling() or type(target) is not torch.Tensor:
        # (under torch.compile, and while AOTAutograd traces with fake/functional tensors, a
        # data-dependent check would break the graph; the kernel's NaN marking, or the reference
        # path's gather, still reports a bad target)
        return
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if bool(bad.any()):
        first = target[bad].reshape(-1)[0].item()
        raise ValueError(
            f"tritonize.{op}: argument 'target' has a class index {first} outside [0, {n_classes}) "
            f"that is not ignore_index ({ignore_index})"
        )


def prepare_normalizer(op: str, normalizer, device):
    """(normalizer tensor or None, scale float). A Python number folds into the scale (no
    tensor, no copy); a tensor (e.g. num_items_in_batch) stays on the device as fp32."""
    if normalizer is None:
        return None, 1.0
    if isinstance(normalizer, torch.Tensor):
        check_arg(op, "normalizer", normalizer.numel() == 1, f"must be a number or a 1-element tensor, got shape {tuple(normalizer.shape)}")
        return normalizer.detach().to(device=device, dtype=torch.float32).reshape(()), 1.0
    check_arg(op, "normalizer", isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool), f"must be a number or a tensor, got {normalizer!r}")
    check_arg(op, "normalizer", normalizer > 0, f"must be > 0, got {normalizer}")
    return None, 1.0 / float(normalizer)


def check_common(op, reduction, label_smoothing, logit_softcap, ignore_index):
    check_arg(op, "reduction", reduction in REDUCTIONS, f"must be one of {REDUCTIONS}, got {reduction!r}")
    check_arg(op, "ignore_index", isinstance(ignore_index, int) and not isinstance(ignore_index, bool), f"must be an int, got {ignore_index!r}")
    check_arg(
        op, "label_smoothing", isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0,
        f"must be in [0, 1], got {label_smoothing!r}",
    )  # fmt: skip
    if logit_softcap is not None:
        check_arg(
            op, "logit_softcap", isinstance(logit_softcap, (int, float)) and math.isfinite(logit_softcap) and logit_softcap > 0,
            f"must be a positive number or None, got {logit_softcap!r}",
        )  # fmt: skip


def _check_detailed(op, logits, target, ignore_index, reduction, label_smoothing, logit_softcap, normalizer, inplace):
    check_tensor(op, "logits", logits)
    check_tensor(op, "target", target, dtypes=TARGET_DTYPES)
    check_same_device(op, logits=logits, target=target)
    check_arg(op, "logits", logits.dim() >= 1, "must have at least 1 dim (..., V)")
    check_arg(
        op, "target", tuple(target.shape) == tuple(logits.shape[:-1]),
        f"must have shape {tuple(logits.shape[:-1])} (logits' shape without the class dim), got {tuple(target.shape)}",
    )  # fmt: skip
    check_common(op, reduction, label_smoothing, logit_softcap, ignore_index)
    check_arg(op, "inplace", isinstance(inplace, bool), f"must be a bool, got {inplace!r}")
    if normalizer is not None:
        check_arg(op, "normalizer", reduction != "none", "cannot be combined with reduction='none'")
    v = logits.shape[-1]
    check_arg(op, "logits", v > 0 or target.numel() == 0, "has an empty class dim (V == 0)")


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    logit_softcap: float | None = None,
    normalizer=None,
    inplace: bool = False,
) -> torch.Tensor:
    """Cross-entropy over the last dim of `logits` (..., V) with class-index `target` (...).

    As F.cross_entropy, except: the loss is fp32; `mean` over an all-ignored batch is 0 (not
    NaN); `normalizer` (number or 1-element tensor, e.g. transformers' num_items_in_batch) gives
    loss = sum / normalizer; `logit_softcap` applies cap * tanh(logits / cap) first (Gemma-2);
    `inplace=True` overwrites `logits` with the gradient during the forward (only when nothing
    else needs the logits afterwards). Bad CUDA targets give a NaN loss (see the module doc).
    """
    op = "cross_entropy"
    T = torch.Tensor
    # Fast path for the common (valid) call: attribute reads only. The detailed checks below
    # format their messages (shape tuples, f-strings) eagerly, ~tens of us per call; they run
    # only when something is off (or for the rarer arguments: soft-capping, a normalizer).
    if not (
        isinstance(logits, T)
        and isinstance(target, T)
        and logits.dtype in FLOAT_DTYPES
        and target.dtype in TARGET_DTYPES
        and logits.device == target.device
        and logits.dim() >= 1
        and target.shape == logits.shape[:-1]
        and reduction in REDUCTIONS
        and type(ignore_index) is int
        and type(label_smoothing) is float
        and 0.0 <= label_smoothing <= 1.0
        and logit_softcap is None
        and normalizer is None
        and type(inplace) is bool
        and logits.shape[-1] > 0
    ):
        _check_detailed(op, logits, target, ignore_index, reduction, label_smoothing, logit_softcap, normalizer, inplace)
    v = logits.shape[-1]
    check_targets(op, target, v, ignore_index)  # CPU targets only: returns at once for CUDA ones
    norm_t, scale = prepare_normalizer(op, normalizer, logits.device)
    if normalizer is not None:
        reduction = "sum"  # loss = sum / normalizer, whatever the reduction said (transformers' rule)

    if target.numel() == 0:
        # No rows: keep the graph connected (zero gradient), launch nothing.
        rows = logits.float().sum(-1) * 0.0
        return rows if reduction == "none" else rows.sum()

    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    args = (norm_t, ignore_index, reduction, scale, float(label_smoothing),
            None if logit_softcap is None else float(logit_softcap))  # fmt: skip
    if eager_fast_path(logits):
        if compute_grad:
            return _cross_entropy_fn(logits, target, norm_t, args[1:] + (inplace,))
        rows, _ = _rows_impl(logits, target, *args, False, None)
        return rows if reduction == "none" else rows.sum()
    if inplace and compute_grad:
        rows = _CrossEntropyInplace.apply(logits, target, *args)
    else:
        rows, _ = _cross_entropy_fwd_op(logits, target, *args, compute_grad)
    return rows if reduction == "none" else rows.sum()
