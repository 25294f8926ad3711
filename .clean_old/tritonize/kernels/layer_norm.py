"""LayerNorm (and the fused residual-add variant), forward and backward Triton kernels.

    y = (s - mean(s)) * rstd * weight + bias,   rstd = 1 / sqrt(var(s) + eps),
    s = x                       (layer_norm)
    s = x + residual, rounded to x.dtype and also returned   (add_layer_norm, as a
        pre-norm transformer block computes `h = h + attn_out; out = norm(h)`)

Statistics are computed in fp32 and saved (mean, rstd: fp32, one per row), so the backward never
recomputes them. Backward, per row (xhat = (s - mean) * rstd, g = dy * weight):
    ds = rstd * (g - xhat * mean(g * xhat) - mean(g))  (+ the upstream gradient of s, add variant)
    dweight = sum_rows dy * xhat,   dbias = sum_rows dy    (two-stage partial sums, _norm_common)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonize.kernels._launch import fast_launch

from tritonize.kernels import _norm_common as nc
from tritonize.kernels._norm_common import load_sum_f32
from tritonize.kernels._common import (
    FLOAT_DTYPES,
    check_arg,
    check_same_device,
    check_tensor,
    eager_fast_path,
    fast_apply,
    use_triton,
)

# =============================================================================================
# 1. Triton kernels
# =============================================================================================


@fast_launch
@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (M, N) input, row stride stride_x
    R,  # (M, N) residual, row stride stride_r (if HAS_RESIDUAL)
    W,  # (N,) weight (if HAS_WEIGHT)
    B,  # (N,) bias (if HAS_BIAS)
    Y,  # (M, N) output, contiguous, x's dtype
    S,  # (M, N) x + residual, contiguous, x's dtype (if HAS_RESIDUAL)
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    M,
    N,
    stride_x,
    stride_r,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOOP: tl.constexpr,  # row wider than BLOCK_N: loop over chunks (ROWS == 1)
    ROWS: tl.constexpr,  # rows per program (narrow rows are batched into one 2-D tile)
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if not LOOP:
        # The whole (ROWS, N) tile sits in registers: x is read from memory exactly once.
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        m = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
            tl.store(S + rows64[:, None] * N + cols[None, :], x, mask=m)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        # two-pass variance on the register-resident row: no E[x^2] - E[x]^2 cancellation
        xc = tl.where(m, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = tl.rsqrt(var + eps)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = y * w[None, :]
        if HAS_BIAS:
            b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = y + b[None, :]
        tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    else:
        # Very wide row (> LN_FWD_FUSED_MAX): three passes over BLOCK_N chunks (sum, centred sum of
        # squares, normalise); passes 2 and 3 re-read the row, mostly from L2. s is recomputed
        # from x and residual rather than read back from S (no intra-program RAW through memory).
        # persistent, few programs (LOOP_PROGRAMS_PER_SM): re-reads of a row then hit L2
        for row in range(pid.to(tl.int64), M, tl.num_programs(0)):
            ox = row * stride_x
            orr = row * stride_r
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                s = load_sum_f32(X, R, ox, orr, cols, cm, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    tl.store(S + row * N + cols, s.to(S.dtype.element_ty), mask=cm)
                acc += s
            mean = tl.sum(acc, axis=0) / N
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                s = load_sum_f32(X, R, ox, orr, cols, cm, HAS_RESIDUAL)
                d = tl.where(cm, s - mean, 0.0)
                acc += d * d
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
            tl.store(MEAN + row, mean)
            tl.store(RSTD + row, rstd)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                s = load_sum_f32(X, R, ox, orr, cols, cm, HAS_RESIDUAL)
                y = (s - mean) * rstd
                if HAS_WEIGHT:
                    y = y * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y = y + tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)
                tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=cm)


@fast_launch
@triton.jit
def _layer_norm_bwd_kernel(
    X,  # (M, N) the normalised input s (x, or x + residual), row stride stride_x
    W,  # (N,) weight (if HAS_WEIGHT)
    DY,  # (M, N) gradient of y, row stride stride_dy
    DS,  # (M, N) gradient of the returned s, row stride stride_ds (if HAS_DS)
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    DX,  # (M, N) gradient of s (= of x and of residual), contiguous, x's dtype
    PART,  # (G, COMPUTE_DW + COMPUTE_DB, N) fp32 per-program partials: dweight, then dbias
    M,
    N,
    stride_x,
    stride_dy,
    stride_ds,
    HAS_WEIGHT: tl.constexpr,
    HAS_DS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,  # only without LOOP: the accumulator must fit in registers
    COMPUTE_DB: tl.constexpr,
    LOOP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Persistent: G programs stride over row blocks, each keeping its dweight/dbias partial in
    # registers and writing it once at the end (stage 1 of the two-stage reduction).
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    if not LOOP:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_w = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for r0 in range(pid * ROWS, M, G * ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_ok = rows < M
            rows64 = rows.to(tl.int64)
            m = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            # ds = rstd * (g - xhat * c1 - c2),  c1 = mean(g * xhat),  c2 = mean(g)
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_DS:
                dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
            if COMPUTE_DW:
                acc_w += dy * xhat
            if COMPUTE_DB:
                acc_b += dy
        part = PART + pid.to(tl.int64) * (COMPUTE_DW + COMPUTE_DB) * N
        if COMPUTE_DW:
            tl.store(part + cols, tl.sum(acc_w, axis=0), mask=col_ok)
        if COMPUTE_DB:
            tl.store(part + COMPUTE_DW * N + cols, tl.sum(acc_b, axis=0), mask=col_ok)
    else:
        # Row wider than the register budget: pass 1 accumulates c1, c2 over chunks, pass 2
        # re-reads the row (from L2) and writes dx. dweight/dbias come from _norm_dwdb_kernel.
        # int64 loop variable (compiled), so row * stride cannot overflow int32
        for row in range(pid.to(tl.int64), M, G):
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            a1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            a2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                x = tl.load(X + row * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
                g = tl.load(DY + row * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
                xhat = tl.where(cm, (x - mean) * rstd, 0.0)
                a1 += g * xhat
                a2 += g
            c1 = tl.sum(a1, axis=0) / N
            c2 = tl.sum(a2, axis=0) / N
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                x = tl.load(X + row * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
                g = tl.load(DY + row * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                dx = (g - (xhat * c1 + c2)) * rstd
                if HAS_DS:
                    dx += tl.load(DS + row * stride_ds + cols, mask=cm, other=0.0).to(tl.float32)
                tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=cm)


# =============================================================================================
# 2. Launchers (usable without autograd)
# =============================================================================================


def layer_norm_forward(x, weight=None, bias=None, eps=1e-5, residual=None):
    """Returns (y, s, mean, rstd): y like x (contiguous), s = x + residual (None if no residual),
    mean/rstd fp32 of shape (rows,) (rows = x.numel() / x.shape[-1])."""
    shape = x.shape
    n = shape[-1]
    # copies only if the last dim is not unit-stride (see rows_2d)
    x2, m, stride_x = nc.as_rows(x)
    # outputs contiguous whatever x's layout; stats flat (m,) (the custom op views them as
    # x.shape[:-1]): torch.empty with a torch.Size costs several us more than with an int
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        mean.zero_()
        rstd.zero_()
        return y, s, mean, rstd
    r2, _, stride_r = nc.as_rows(residual) if residual is not None else (x2, m, stride_x)
    weight, bias = nc.vec(weight), nc.vec(bias)
    block, rows, warps, loop = nc.row_config(n, nc.LN_FWD_FUSED_MAX, nc.FWD_LOOP, "ln_fwd")
    grid = min(m, nc.device_sms(x) * nc.LOOP_PROGRAMS_PER_SM) if loop else nc.cdiv(m, rows)
    with nc.device_ctx(x):
        _layer_norm_fwd_kernel[(grid,)](
            x2,
            r2,
            weight if weight is not None else x2,
            bias if bias is not None else x2,
            y,
            s if residual is not None else y,
            mean,
            rstd,
            m,
            n,
            stride_x,
            stride_r,
            eps,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            LOOP=loop,
            ROWS=rows,
            BLOCK_N=block,
            num_warps=warps,
        )
    return y, s, mean, rstd


def layer_norm_backward(dy, xin, weight, mean, rstd, *, ds=None, compute_dw=True, compute_db=False,
                        dw_dtype=None, db_dtype=None):
    """Gradients of layer norm. `xin` is the normalised input (x, or x + residual), `ds` the
    upstream gradient of the returned sum (add variant). Returns (dx, dw, db); dw/db are None
    when not computed."""
    n = xin.shape[-1]
    compute_dw = compute_dw and weight is not None
    need_acc = compute_dw or compute_db
    x2, m, stride_x = nc.as_rows(xin)
    # An upstream gradient can arrive expanded (stride 0) or transposed: rows_2d copies it then.
    dy2, _, stride_dy = nc.as_rows(dy)
    ds2, _, stride_ds = nc.as_rows(ds) if ds is not None else (dy2, m, stride_dy)
    dx = torch.empty_like(xin, memory_format=torch.contiguous_format)
    dw_dtype = dw_dtype or (weight.dtype if weight is not None else xin.dtype)
    db_dtype = db_dtype or xin.dtype
    if m == 0 or n == 0:
        zeros = lambda d: torch.zeros((n,), dtype=d, device=xin.device)  # noqa: E731
        return dx, (zeros(dw_dtype) if compute_dw else None), (zeros(db_dtype) if compute_db else None)
    weight = nc.vec(weight)
    fused_acc = need_acc and n <= nc.BWD_FUSED_MAX
    if need_acc and not fused_acc and nc.WIDE_BWD != "loop":
        # wide rows, "split" / "chain" (_norm_common.wide_backward): dx and the partials together
        with nc.device_ctx(xin):
            part = nc.wide_backward(x2, weight, dy2, ds2 if ds is not None else None, mean, rstd, dx, m, n, stride_x,
                                    stride_dy, stride_ds, compute_dw, compute_db, round_xhat=False)
        return (dx, *_reduce(part, compute_dw, compute_db, dw_dtype, db_dtype))
    block, rows, warps, loop = nc.row_config(n, nc.BWD_FUSED_MAX if fused_acc else nc.DX_FUSED_MAX, nc.BWD_LOOP,
                                             "ln_bwd" if fused_acc else "ln_dx")
    if fused_acc:
        grid = nc.persistent_grid(xin, nc.cdiv(m, rows), block * rows, warps, int(compute_dw) + int(compute_db))
    elif loop:
        # persistent, few programs: the second pass over each row then re-reads it from L2
        grid = min(m, nc.device_sms(xin) * nc.LOOP_PROGRAMS_PER_SM)
    else:
        grid = nc.cdiv(m, rows)  # one row block per program: nothing to carry across rows
    # one (G, K, N) buffer for the dw and db partials (K = 1 or 2): one allocation, one reduction
    part = (torch.empty((grid, int(compute_dw) + int(compute_db), n), dtype=torch.float32, device=xin.device)
            if fused_acc else mean)  # (mean: an unused pointer when the kernel computes dx only)
    with nc.device_ctx(xin):
        _layer_norm_bwd_kernel[(grid,)](
            x2,
            weight if weight is not None else x2,
            dy2,
            ds2,
            mean,
            rstd,
            dx,
            part,
            m,
            n,
            stride_x,
            stride_dy,
            stride_ds,
            HAS_WEIGHT=weight is not None,
            HAS_DS=ds is not None,
            COMPUTE_DW=fused_acc and compute_dw,
            COMPUTE_DB=fused_acc and compute_db,
            LOOP=loop,
            ROWS=rows,
            BLOCK_N=block,
            num_warps=warps,
        )
        if not need_acc:
            return dx, None, None
        if not fused_acc:
            part = nc.dwdb_split(x2, dy2, m, n, stride_x, stride_dy, mean, rstd, compute_dw, compute_db,
                                 round_xhat=False)
    return (dx, *_reduce(part, compute_dw, compute_db, dw_dtype, db_dtype))


def _reduce(part, compute_dw, compute_db, dw_dtype, db_dtype):
    """(dw, db) from the (G, K, N) partials; None for a gradient not computed."""
    if compute_dw and compute_db:
        return nc.reduce_partials(part, (dw_dtype, db_dtype))
    (g,) = nc.reduce_partials(part, (dw_dtype if compute_dw else db_dtype,))
    return (g if compute_dw else None), (g if compute_db else None)


# =============================================================================================
# 3. Custom ops: forward, backward, autograd
# =============================================================================================


def _fwd_torch(x, residual, weight, bias, eps):
    """Plain-torch twin of the forward kernel (fp32 statistics), for devices Triton does not run on."""
    s = x + residual if residual is not None else x
    h = s.float()
    mean = h.mean(-1)
    rstd = torch.rsqrt((h - mean[..., None]).pow(2).mean(-1) + eps)
    y = (h - mean[..., None]) * rstd[..., None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), (s if residual is not None else None), mean, rstd


def _bwd_torch(dy, ds, xin, weight, mean, rstd, compute_dw, compute_db, dw_dtype, db_dtype):
    n = xin.shape[-1]
    xhat = (xin.float() - mean[..., None]) * rstd[..., None]
    g = dy.float() * weight.float() if weight is not None else dy.float()
    c1 = (g * xhat).sum(-1, keepdim=True) / n
    c2 = g.sum(-1, keepdim=True) / n
    dx = (g - (xhat * c1 + c2)) * rstd[..., None]
    if ds is not None:
        dx = dx + ds.float()
    lead = tuple(range(xin.dim() - 1))
    dw = (dy.float() * xhat).sum(lead).to(dw_dtype) if compute_dw else None
    db = dy.float().sum(lead).to(db_dtype) if compute_db else None
    return dx.to(xin.dtype), dw, db


# The two impls below are what the custom ops (torch.compile, fake tensors, functorch) run; the
# eager fast path (_LayerNormFn) calls the same launchers directly. `s` is None without a residual.


def _fwd_impl(x, residual, weight, bias, eps):
    if use_triton(x):
        return layer_norm_forward(x, weight, bias, eps, residual)
    return _fwd_torch(x, residual, weight, bias, eps)


def _bwd_impl(dy, ds, xin, weight, bias, mean, rstd, compute_dw, compute_db):
    """(dx, dw, db); dw / db None when not computed."""
    compute_dw = compute_dw and weight is not None
    compute_db = compute_db and bias is not None
    dw_dtype = weight.dtype if weight is not None else None
    db_dtype = bias.dtype if bias is not None else None
    if use_triton(xin):
        return layer_norm_backward(dy, xin, weight, mean, rstd, ds=ds, compute_dw=compute_dw,
                                   compute_db=compute_db, dw_dtype=dw_dtype, db_dtype=db_dtype)
    return _bwd_torch(dy, ds, xin, weight, mean, rstd, compute_dw, compute_db, dw_dtype, db_dtype)


@torch.library.custom_op("tritonize::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, mean, rstd = _fwd_impl(x, residual, weight, bias, eps)
    # custom-op outputs cannot be None: no residual -> an empty sum; stats as x.shape[:-1]
    return y, (s if s is not None else x.new_empty(0)), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps):
    s = x.new_empty(x.shape if residual is not None else (0,))
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), s, stats, torch.empty_like(stats)


@torch.library.custom_op("tritonize::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    xin: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    compute_dw: bool,
    compute_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _bwd_impl(dy, ds, xin, weight, bias, mean, rstd, compute_dw, compute_db)
    # custom-op outputs cannot be None: an absent gradient is an empty tensor
    return dx, (dw if dw is not None else xin.new_empty(0)), (db if db is not None else xin.new_empty(0))


@_layer_norm_bwd_op.register_fake
def _(dy, ds, xin, weight, bias, mean, rstd, compute_dw, compute_db):
    dw = weight.new_empty(weight.shape) if compute_dw and weight is not None else xin.new_empty(0)
    db = bias.new_empty(bias.shape) if compute_db and bias is not None else xin.new_empty(0)
    return xin.new_empty(xin.shape), dw, db


def _grads(needs, has_residual, weight, bias, dx, dw, db):
    """Autograd's tuple for (x, residual, weight, bias, eps); d(x + residual) flows unchanged
    into both summands."""
    need_x, need_r, need_w, need_b = needs[:4]
    return (dx if need_x else None, dx if (need_r and has_residual) else None,
            dw if need_w and weight is not None else None, db if need_b and bias is not None else None, None)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    y, s, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(s if residual is not None else x, weight, bias, mean, rstd)


def _backward(ctx, dy, ds, _dmean, _drstd):
    xin, weight, bias, mean, rstd = ctx.saved_tensors
    need_w, need_b = ctx.needs_input_grad[2:4]
    if dy is None:  # only the sum output was used downstream
        dy = torch.zeros_like(xin)
    if not ctx.has_residual:
        ds = None
    dx, dw, db = _layer_norm_bwd_op(dy, ds, xin, weight, bias, mean, rstd,
                                    bool(need_w and weight is not None), bool(need_b and bias is not None))
    return _grads(ctx.needs_input_grad, ctx.has_residual, weight, bias, dx, dw, db)


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LayerNormFn(torch.autograd.Function):
    """Eager fast path (see `_common.eager_fast_path`): the launchers called directly (the public
    function has already checked that Triton runs on x), without the custom ops' dispatch layers,
    which cost several times the Python time of a plain autograd.Function per forward+backward
    and leave the GPU idle at realistic sizes. Returns y, or (y, s) with a residual; mean/rstd
    stay inside ctx (no extra outputs for autograd to track)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        y, s, mean, rstd = layer_norm_forward(x, weight, bias, eps, residual)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        ctx.has_residual = residual is not None
        ctx.save_for_backward(s if residual is not None else x, weight, bias, mean, rstd)
        return (y, s) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        xin, weight, bias, mean, rstd = ctx.saved_tensors
        _, need_r, need_w, need_b = ctx.needs_input_grad[:4]
        need_w = need_w and weight is not None
        need_b = need_b and bias is not None
        if dy is None:  # only the sum output was used downstream
            dy = torch.zeros_like(xin)
        dx, dw, db = layer_norm_backward(
            dy, xin, weight, mean, rstd, ds=ds if ctx.has_residual else None, compute_dw=need_w,
            compute_db=need_b, dw_dtype=weight.dtype if need_w else None, db_dtype=bias.dtype if need_b else None,
        )  # fmt: skip
        return (dx if ctx.needs_input_grad[0] else None, dx if need_r and ctx.has_residual else None, dw, db, None)


# the C autograd apply without torch's Python layer (see _common.fast_apply)
_layer_norm_fn = fast_apply(_LayerNormFn)


# =============================================================================================
# 4. Reference
# =============================================================================================


def layer_norm_reference(x, weight=None, bias=None, eps=1e-5, residual=None, upcast=False):
    """Plain torch. Returns normed (and x + residual when residual is given). With upcast=True
    everything (including the residual sum) is computed in fp32 and returned in fp32."""
    if upcast:
        x = x.float()
        residual = residual.float() if residual is not None else None
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    s = x + residual if residual is not None else x
    w = weight.to(s.dtype) if weight is not None else None
    b = bias.to(s.dtype) if bias is not None else None
    y = F.layer_norm(s, (s.shape[-1],), w, b, eps)
    return (y, s) if residual is not None else y


# =============================================================================================
# 5. Public functions
# =============================================================================================


def _check(op, x, residual, weight, bias, eps):
    # Fast path for the common (valid) call: attribute reads only. The detailed checks below
    # build their messages eagerly (f-strings, shape tuples: ~10 us per call, a real share of a
    # row-wise op's host time); they run only when something is off, and then raise.
    T = torch.Tensor
    if (
        isinstance(x, T)
        and x.dtype in FLOAT_DTYPES
        and x.dim() >= 1
        and (residual is None if not op.startswith("add_") else
             (isinstance(residual, T) and residual.dtype == x.dtype and residual.shape == x.shape
              and residual.device == x.device))
        and (weight is None or (isinstance(weight, T) and weight.dtype in FLOAT_DTYPES and weight.dim() == 1
                                and weight.shape[0] == x.shape[-1] and weight.device == x.device))
        and (bias is None or (isinstance(bias, T) and bias.dtype in FLOAT_DTYPES and bias.dim() == 1
                              and bias.shape[0] == x.shape[-1] and bias.device == x.device))
        and type(eps) is float
        and eps > 0
    ):
        return
    _check_detailed(op, x, residual, weight, bias, eps)


def _check_detailed(op, x, residual, weight, bias, eps):
    check_tensor(op, "x", x)
    check_arg(op, "x", x.dim() >= 1, "must have at least one dimension (the normalised one)")
    n = x.shape[-1]
    if op.startswith("add_"):
        check_tensor(op, "residual", residual, dtypes=(x.dtype,))
        check_arg(op, "residual", residual.shape == x.shape,
                  f"must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_tensor(op, "weight", weight, optional=True)
    check_tensor(op, "bias", bias, optional=True)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_arg(op, name, p.shape == (n,), f"must have shape ({n},) (x's last dim), got {tuple(p.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"tritonize.{op}: argument 'eps' must be a float, got {type(eps).__name__}")
    check_arg(op, "eps", eps > 0, f"must be > 0, got {eps}")
    check_same_device(op, x=x, residual=residual, weight=weight, bias=bias)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dim of x (any leading dims); weight/bias optional. Output: x's dtype."""
    _check("layer_norm", x, None, weight, bias, eps)
    if eager_fast_path(x):
        return _layer_norm_fn(x, None, weight, bias, float(eps))
    return _layer_norm_fwd_op(x, None, weight, bias, float(eps))[0]


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
    """(layer_norm(x + residual), x + residual), the sum rounded to x's dtype as torch rounds it.
    Gradients flow to x, residual, weight and bias (the sum's gradient into both x and residual)."""
    _check("add_layer_norm", x, residual, weight, bias, eps)
    if eager_fast_path(x):
        return _layer_norm_fn(x, residual, weight, bias, float(eps))
    y, s, _, _ = _layer_norm_fwd_op(x, residual, weight, bias, float(eps))
    return y, s
