"""RMSNorm with the exact numerics of Hugging Face's Llama/T5 RMSNorm, forward and backward.

HF (LlamaRMSNorm.forward):
    h = x.float();  h = h * rsqrt(mean(h^2) + eps);  out = weight * h.to(x.dtype)
i.e. statistics in fp32, the normalised value rounded back to x's dtype BEFORE the weight
multiply, and the result in torch's promotion of (weight.dtype, x.dtype): bf16 x with an fp32
weight gives fp32, as HF does. The kernels do exactly that (one rounding of h, then an fp32
product rounded once to the output dtype, which is what torch's bf16 multiply does).

add_rms_norm(x, residual) normalises s = x + residual (rounded to x's dtype, as torch adds) and
returns s too. Backward, per row (h = s * rstd unrounded, g = dy * weight):
    ds = rstd * (g - h * mean(g * h))   (+ the upstream gradient of s, add variant)
    dweight = sum_rows dy * h.to(x.dtype)   (the value the forward multiplied the weight by)
"""

from __future__ import annotations

import torch
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
def _rms_norm_fwd_kernel(
    X,  # (M, N) input, row stride stride_x
    R,  # (M, N) residual, row stride stride_r (if HAS_RESIDUAL)
    W,  # (N,) weight (if HAS_WEIGHT)
    Y,  # (M, N) output, contiguous, promote(weight.dtype, x.dtype)
    S,  # (M, N) x + residual, contiguous, x's dtype (if HAS_RESIDUAL)
    RSTD,  # (M,) fp32
    M,
    N,
    stride_x,
    stride_r,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    LOOP: tl.constexpr,  # row wider than BLOCK_N: loop over chunks (ROWS == 1)
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if not LOOP:
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
        h = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        # HF: the normalised value is rounded to x's dtype before the weight multiply
        y = (h * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            y = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :] * y
        tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    else:
        # Very wide row: pass 1 sums squares (writing s), pass 2 re-reads (mostly from L2) and
        # normalises; s is recomputed from x and residual, not read back from S.
        # persistent, few programs (LOOP_PROGRAMS_PER_SM): re-reads of a row then hit L2
        for row in range(pid.to(tl.int64), M, tl.num_programs(0)):
            ox = row * stride_x
            orr = row * stride_r
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                h = load_sum_f32(X, R, ox, orr, cols, cm, HAS_RESIDUAL)
                if HAS_RESIDUAL:
                    tl.store(S + row * N + cols, h.to(S.dtype.element_ty), mask=cm)
                acc += h * h
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
            tl.store(RSTD + row, rstd)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                h = load_sum_f32(X, R, ox, orr, cols, cm, HAS_RESIDUAL)
                y = (h * rstd).to(X.dtype.element_ty).to(tl.float32)
                if HAS_WEIGHT:
                    y = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32) * y
                tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=cm)


@fast_launch
@triton.jit
def _rms_norm_bwd_kernel(
    X,  # (M, N) the normalised input s (x, or x + residual), row stride stride_x
    W,  # (N,) weight (if HAS_WEIGHT)
    DY,  # (M, N) gradient of the output, row stride stride_dy
    DS,  # (M, N) gradient of the returned s, row stride stride_ds (if HAS_DS)
    RSTD,  # (M,) fp32
    DX,  # (M, N) gradient of s (= of x and of residual), contiguous, x's dtype
    DW_PART,  # (G, 1, N) fp32 per-program partial dweight (if COMPUTE_DW)
    M,
    N,
    stride_x,
    stride_dy,
    stride_ds,
    HAS_WEIGHT: tl.constexpr,
    HAS_DS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,  # only without LOOP: the accumulator must fit in registers
    LOOP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Persistent: G programs stride over row blocks; the dweight partial stays in registers and
    # is written once per program (stage 1 of the two-stage reduction in _norm_common).
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    if not LOOP:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_w = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for r0 in range(pid * ROWS, M, G * ROWS):
            rows = r0 + tl.arange(0, ROWS)
            row_ok = rows < M
            rows64 = rows.to(tl.int64)
            m = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            h = x * rstd[:, None]
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            # ds = rstd * (g - h * mean(g * h))   (the rounding of h to x's dtype has derivative 1)
            c = tl.sum(g * h, axis=1) / N
            dx = (g - h * c[:, None]) * rstd[:, None]
            if HAS_DS:
                dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
            if COMPUTE_DW:
                acc_w += dy * h.to(X.dtype.element_ty).to(tl.float32)
        if COMPUTE_DW:
            tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(acc_w, axis=0), mask=col_ok)
    else:
        # Row wider than the register budget: pass 1 accumulates mean(g * h), pass 2 re-reads the
        # row (from L2) and writes dx. dweight comes from _norm_dwdb_kernel.
        # int64 loop variable (compiled), so row * stride cannot overflow int32
        for row in range(pid.to(tl.int64), M, G):
            rstd = tl.load(RSTD + row)
            a = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                x = tl.load(X + row * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
                g = tl.load(DY + row * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
                a += g * x * rstd
            c = tl.sum(a, axis=0) / N
            for c0 in range(0, N, BLOCK_N):
                cols = c0 + tl.arange(0, BLOCK_N)
                cm = cols < N
                x = tl.load(X + row * stride_x + cols, mask=cm, other=0.0).to(tl.float32)
                g = tl.load(DY + row * stride_dy + cols, mask=cm, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
                dx = (g - x * rstd * c) * rstd
                if HAS_DS:
                    dx += tl.load(DS + row * stride_ds + cols, mask=cm, other=0.0).to(tl.float32)
                tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=cm)


# =============================================================================================
# 2. Launchers (usable without autograd)
# =============================================================================================


def _out_dtype(x, weight):
    return torch.promote_types(weight.dtype, x.dtype) if weight is not None else x.dtype


def rms_norm_forward(x, weight=None, eps=1e-6, residual=None):
    """Returns (y, s, rstd): y of shape x.shape in promote(weight.dtype, x.dtype) (contiguous),
    s = x + residual (None if no residual), rstd fp32 of shape (rows,)."""
    shape = x.shape
    n = shape[-1]
    # copies only if the last dim is not unit-stride (see rows_2d)
    x2, m, stride_x = nc.as_rows(x)
    # outputs contiguous whatever x's layout; rstd flat (m,) (the custom op views it as
    # x.shape[:-1]): torch.empty with a torch.Size costs several us more than with an int
    y = torch.empty_like(x, dtype=_out_dtype(x, weight), memory_format=torch.contiguous_format)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        rstd.zero_()
        return y, s, rstd
    r2, _, stride_r = nc.as_rows(residual) if residual is not None else (x2, m, stride_x)
    weight = nc.vec(weight)
    block, rows, warps, loop = nc.row_config(n, nc.RMS_FWD_FUSED_MAX, nc.FWD_LOOP, "rms_fwd")
    grid = min(m, nc.device_sms(x) * nc.LOOP_PROGRAMS_PER_SM) if loop else nc.cdiv(m, rows)
    with nc.device_ctx(x):
        _rms_norm_fwd_kernel[(grid,)](
            x2,
            r2,
            weight if weight is not None else x2,
            y,
            s if residual is not None else y,
            rstd,
            m,
            n,
            stride_x,
            stride_r,
            eps,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            LOOP=loop,
            ROWS=rows,
            BLOCK_N=block,
            num_warps=warps,
        )
    return y, s, rstd


def rms_norm_backward(dy, xin, weight, rstd, *, ds=None, compute_dw=True):
    """Gradients of rms norm. `xin` is the normalised input (x, or x + residual), `ds` the
    upstream gradient of the returned sum (add variant). Returns (dx, dw); dw None if not computed."""
    shape = xin.shape
    n = shape[-1]
    compute_dw = compute_dw and weight is not None
    x2, m, stride_x = nc.as_rows(xin)
    # An upstream gradient can arrive expanded (stride 0) or transposed: rows_2d copies it then.
    dy2, _, stride_dy = nc.as_rows(dy)
    ds2, _, stride_ds = nc.as_rows(ds) if ds is not None else (dy2, m, stride_dy)
    dx = torch.empty_like(xin, memory_format=torch.contiguous_format)
    if m == 0 or n == 0:
        return dx, (torch.zeros((n,), dtype=weight.dtype, device=xin.device) if compute_dw else None)
    weight = nc.vec(weight)
    fused_acc = compute_dw and n <= nc.BWD_FUSED_MAX
    if compute_dw and not fused_acc and nc.WIDE_BWD != "loop":
        # wide rows, "split" / "chain" (_norm_common.wide_backward): dx and the partials together
        with nc.device_ctx(xin):
            dw_part = nc.wide_backward(x2, weight, dy2, ds2 if ds is not None else None, None, rstd, dx, m, n,
                                       stride_x, stride_dy, stride_ds, True, False, round_xhat=True)
        (dw,) = nc.reduce_partials(dw_part, (weight.dtype,))
        return dx, dw
    block, rows, warps, loop = nc.row_config(n, nc.BWD_FUSED_MAX if fused_acc else nc.DX_FUSED_MAX, nc.BWD_LOOP,
                                             "rms_bwd" if fused_acc else "rms_dx")
    if fused_acc:
        grid = nc.persistent_grid(xin, nc.cdiv(m, rows), block * rows, warps, 1)
    elif loop:
        # persistent, few programs: the second pass over each row then re-reads it from L2
        grid = min(m, nc.device_sms(xin) * nc.LOOP_PROGRAMS_PER_SM)
    else:
        grid = nc.cdiv(m, rows)  # one row block per program: nothing to carry across rows
    # (G, 1, N): the (G, K, N) layout of nc.reduce_partials with K = 1
    dw_part = torch.empty((grid, 1, n), dtype=torch.float32, device=xin.device) if fused_acc else None
    with nc.device_ctx(xin):
        _rms_norm_bwd_kernel[(grid,)](
            x2,
            weight if weight is not None else x2,
            dy2,
            ds2,
            rstd,
            dx,
            dw_part if dw_part is not None else rstd,
            m,
            n,
            stride_x,
            stride_dy,
            stride_ds,
            HAS_WEIGHT=weight is not None,
            HAS_DS=ds is not None,
            COMPUTE_DW=fused_acc,
            LOOP=loop,
            ROWS=rows,
            BLOCK_N=block,
            num_warps=warps,
        )
        if not compute_dw:
            return dx, None
        if not fused_acc:
            dw_part = nc.dwdb_split(x2, dy2, m, n, stride_x, stride_dy, None, rstd, True, False, round_xhat=True)
    (dw,) = nc.reduce_partials(dw_part, (weight.dtype,))
    return dx, dw


# =============================================================================================
# 3. Custom ops: forward, backward, autograd
# =============================================================================================


def _fwd_torch(x, residual, weight, eps):
    """Plain-torch twin of the forward kernel (HF numerics), for devices Triton does not run on."""
    s = x + residual if residual is not None else x
    h = s.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps)
    hb = (h * rstd[..., None]).to(x.dtype)
    y = weight * hb if weight is not None else hb
    return y, (s if residual is not None else None), rstd


def _bwd_torch(dy, ds, xin, weight, rstd, compute_dw):
    n = xin.shape[-1]
    h = xin.float() * rstd[..., None]
    g = dy.float() * weight.float() if weight is not None else dy.float()
    dx = (g - h * ((g * h).sum(-1, keepdim=True) / n)) * rstd[..., None]
    if ds is not None:
        dx = dx + ds.float()
    lead = tuple(range(xin.dim() - 1))
    dw = (dy.float() * h.to(xin.dtype).float()).sum(lead).to(weight.dtype) if compute_dw else None
    return dx.to(xin.dtype), dw


# The two impls below are what the custom ops (torch.compile, fake tensors, functorch) run; the
# eager fast path (_RMSNormFn) calls the same launchers directly. `s` is None without a residual.


def _fwd_impl(x, residual, weight, eps):
    if use_triton(x):
        return rms_norm_forward(x, weight, eps, residual)
    return _fwd_torch(x, residual, weight, eps)


def _bwd_impl(dy, ds, xin, weight, rstd, compute_dw):
    """(dx, dw); dw None when not computed."""
    compute_dw = compute_dw and weight is not None
    if use_triton(xin):
        return rms_norm_backward(dy, xin, weight, rstd, ds=ds, compute_dw=compute_dw)
    return _bwd_torch(dy, ds, xin, weight, rstd, compute_dw)


@torch.library.custom_op("tritonize::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, rstd = _fwd_impl(x, residual, weight, eps)
    # custom-op outputs cannot be None: no residual -> an empty sum; rstd as x.shape[:-1]
    return y, (s if s is not None else x.new_empty(0)), rstd.view(x.shape[:-1])


@_rms_norm_fwd_op.register_fake
def _(x, residual, weight, eps):
    s = x.new_empty(x.shape if residual is not None else (0,))
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight)), s, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tritonize::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    xin: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    compute_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _bwd_impl(dy, ds, xin, weight, rstd, compute_dw)
    # custom-op outputs cannot be None: an absent gradient is an empty tensor
    return dx, (dw if dw is not None else xin.new_empty(0))


@_rms_norm_bwd_op.register_fake
def _(dy, ds, xin, weight, rstd, compute_dw):
    dw = weight.new_empty(weight.shape) if compute_dw and weight is not None else xin.new_empty(0)
    return xin.new_empty(xin.shape), dw


def _grads(needs, has_residual, weight, dx, dw):
    """Autograd's tuple for (x, residual, weight, eps); d(x + residual) flows unchanged into
    both summands."""
    need_x, need_r, need_w = needs[:3]
    return (dx if need_x else None, dx if (need_r and has_residual) else None,
            dw if need_w and weight is not None else None, None)


def _setup_context(ctx, inputs, output):
    x, residual, weight, eps = inputs
    y, s, rstd = output
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(s if residual is not None else x, weight, rstd)


def _backward(ctx, dy, ds, _drstd):
    xin, weight, rstd = ctx.saved_tensors
    need_w = ctx.needs_input_grad[2]
    if dy is None:  # only the sum output was used downstream
        dy = torch.zeros(xin.shape, dtype=_out_dtype(xin, weight), device=xin.device)
    if not ctx.has_residual:
        ds = None
    dx, dw = _rms_norm_bwd_op(dy, ds, xin, weight, rstd, bool(need_w and weight is not None))
    return _grads(ctx.needs_input_grad, ctx.has_residual, weight, dx, dw)


_rms_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _RMSNormFn(torch.autograd.Function):
    """Eager fast path (see `_common.eager_fast_path` and layer_norm._LayerNormFn): the same
    launchers as the custom ops without their dispatch layers (the public function has already
    checked that Triton runs on x). Returns y, or (y, s) with a residual."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, s, rstd = rms_norm_forward(x, weight, eps, residual)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        ctx.has_residual = residual is not None
        ctx.save_for_backward(s if residual is not None else x, weight, rstd)
        return (y, s) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        xin, weight, rstd = ctx.saved_tensors
        if dy is None:  # only the sum output was used downstream
            dy = torch.zeros(xin.shape, dtype=_out_dtype(xin, weight), device=xin.device)
        need_x, need_r, need_w = ctx.needs_input_grad[:3]
        dx, dw = rms_norm_backward(dy, xin, weight, rstd, ds=ds if ctx.has_residual else None,
                                   compute_dw=need_w and weight is not None)
        return (dx if need_x else None), (dx if need_r and ctx.has_residual else None), dw, None


# the C autograd apply without torch's Python layer (see _common.fast_apply)
_rms_norm_fn = fast_apply(_RMSNormFn)


# =============================================================================================
# 4. Reference
# =============================================================================================


def rms_norm_reference(x, weight=None, eps=1e-6, residual=None, upcast=False):
    """Plain torch. upcast=False: HF Llama numerics exactly (fp32 statistics, cast back to x's
    dtype before the weight multiply). upcast=True: everything in fp32, no cast back, fp32 out.
    Returns normed (and x + residual when residual is given)."""
    if upcast:
        x = x.float()
        residual = residual.float() if residual is not None else None
        weight = weight.float() if weight is not None else None
    s = x + residual if residual is not None else x
    h = s.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(s.dtype)
    y = weight * h if weight is not None else h
    return (y, s) if residual is not None else y


# =============================================================================================
# 5. Public functions
# =============================================================================================


def _check(op, x, residual, weight, eps):
    # Fast path for the common (valid) call: attribute reads only (see layer_norm._check); the
    # detailed checks, which build their messages eagerly, run only when something is off.
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
        and type(eps) is float
        and eps > 0
    ):
        return
    _check_detailed(op, x, residual, weight, eps)


def _check_detailed(op, x, residual, weight, eps):
    check_tensor(op, "x", x)
    check_arg(op, "x", x.dim() >= 1, "must have at least one dimension (the normalised one)")
    n = x.shape[-1]
    if op.startswith("add_"):
        check_tensor(op, "residual", residual, dtypes=(x.dtype,))
        check_arg(op, "residual", residual.shape == x.shape,
                  f"must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_tensor(op, "weight", weight, optional=True)
    if weight is not None:
        check_arg(op, "weight", weight.shape == (n,),
                  f"must have shape ({n},) (x's last dim), got {tuple(weight.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"tritonize.{op}: argument 'eps' must be a float, got {type(eps).__name__}")
    check_arg(op, "eps", eps > 0, f"must be > 0, got {eps}")
    check_same_device(op, x=x, residual=residual, weight=weight)


def rms_norm(x, weight=None, eps=1e-6):
    """HF-Llama RMSNorm over the last dim of x (any leading dims). Output dtype: x's without a
    weight, else torch's promotion of (weight.dtype, x.dtype), as HF's module returns."""
    _check("rms_norm", x, None, weight, eps)
    if eager_fast_path(x):
        return _rms_norm_fn(x, None, weight, float(eps))
    return _rms_norm_fwd_op(x, None, weight, float(eps))[0]


def add_rms_norm(x, residual, weight=None, eps=1e-6):
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype as torch rounds it.
    Gradients flow to x, residual and weight (the sum's gradient into both x and residual)."""
    _check("add_rms_norm", x, residual, weight, eps)
    if eager_fast_path(x):
        return _rms_norm_fn(x, residual, weight, float(eps))
    y, s, _ = _rms_norm_fwd_op(x, residual, weight, float(eps))
    return y, s
