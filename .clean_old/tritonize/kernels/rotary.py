"""rotary_embedding(q, k, cos, sin): rotary position embedding, rotate-half convention, q and k
in one launch, with a custom backward.

The convention is HF Llama's (also Mistral, Qwen2, Gemma, GPT-NeoX, Phi):

    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    out = x * cos + rotate_half(x) * sin            (cos, sin broadcast to x's shape)

With x = [x1, x2], cos = [c1, c2], sin = [s1, s2] split at D/2:

    out1 = x1 * c1 - x2 * s1
    out2 = x2 * c2 + x1 * s2

The map is linear in x, so the backward needs no saved activation (only cos and sin):

    dx1 = g1 * c1 + g2 * s2
    dx2 = g2 * c2 - g1 * s1

which is the forward's kernel with the roles of s1 and s2 exchanged (BACKWARD constexpr).

Eager torch runs 7 kernels per tensor forward (mul, two slices + neg + cat, mul, add) and ~6
backward, each a round trip through memory; Llama applies it to q and k in every layer. Here one
launch covers both q and k, each element read and written once, math in fp32 and rounded once
(torch rounds after each of its three ops, so the result is at least as accurate).

Layout: any strides. q, k are taken as up-to-4-D (B, H, T, D) with their own strides (transformers
passes transposed views (B, T, H, D) -> (B, H, T, D)), rows walked in memory order; cos and sin
broadcast by stride 0. The output is contiguous (see OUT_CONTIGUOUS: the attention that follows
runs faster on it), the gradients of q and k come back in q's and k's own layout when that is
dense (else contiguous). Inputs of more than 4 dims are reshaped to 4 (a copy only when their
leading dims cannot merge).

Gradients for cos and sin (rarely wanted: transformers computes them from a buffer without grad)
are computed with plain torch ops when requested, from the saved x.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tritonize.kernels._launch import fast_launch

from ._common import FLOAT_DTYPES, INTERPRET, check_arg, check_same_device, check_tensor, eager_fast_path, fast_apply, use_triton
from ._norm_common import cdiv, device_ctx, next_pow2

# Elements (pairs) per program: ~2048 pairs keeps 4 warps busy with 16 loads each in flight; the
# interpreter runs programs one after another, so there fewer, larger tiles are faster.
TILE = 16384 if INTERPRET else 2048

# Output layout of the forward: contiguous (B, H, T, D), not x's layout. Measured (H100, Llama's
# q B4 H16 T2048 D64, k with 8 heads, bf16): cuDNN's SDPA that follows runs fwd+bwd in 0.430 ms on
# contiguous q, k against 0.548 ms on transformers' (B, T, H, D)-strided views, 12 layers -> 1.4 ms
# per step. The gradients go back in the inputs' own layout (so the projections' backward reshapes
# them without a copy). TRITONIZE_ROTARY_OUT=input keeps x's layout (A/B switch).
OUT_CONTIGUOUS = os.environ.get("TRITONIZE_ROTARY_OUT", "contiguous") != "input"


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rotate_rows(
    pid, x_ptr, y_ptr, c_ptr, s_ptr, R, H, T,
    sxb, sxh, sxt, sxd, syb, syh, syt, syd, scb, sch, sct, scd, ssb, ssh, sst, ssd,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
):
    # rows r = ((b * H) + h) * T + t of the (B, H, T) leading dims; each row holds D = 2 * HALF
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = rows % T
    bh = rows // T
    h = bh % H
    b = bh // H
    j = tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (j < HALF)[None, :]
    jj = j[None, :]
    xo = (b * sxb + h * sxh + t * sxt)[:, None]
    co = (b * scb + h * sch + t * sct)[:, None]
    so = (b * ssb + h * ssh + t * sst)[:, None]
    yo = (b * syb + h * syh + t * syt)[:, None]
    x1 = tl.load(x_ptr + xo + jj * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + (jj + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c_ptr + co + jj * scd, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + co + (jj + HALF) * scd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + so + jj * ssd, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + so + (jj + HALF) * ssd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # dx1 = g1 c1 + g2 s2 ; dx2 = g2 c2 - g1 s1   (x holds g here)
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        # out1 = x1 c1 - x2 s1 ; out2 = x2 c2 + x1 s2
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + yo + jj * syd, y1.to(ty), mask=mask)
    tl.store(y_ptr + yo + (jj + HALF) * syd, y2.to(ty), mask=mask)


@fast_launch
@triton.jit
def _rotary_kernel(
    # first tensor (q): input, output, cos, sin and their (b, h, t, d) strides
    x_ptr, y_ptr, c_ptr, s_ptr, R, H, T,
    sxb, sxh, sxt, sxd, syb, syh, syt, syd, scb, sch, sct, scd, ssb, ssh, sst, ssd,
    # second tensor (k), same meaning; unused when HAS_K is False
    x2_ptr, y2_ptr, c2_ptr, s2_ptr, R2, H2, T2,
    sxb2, sxh2, sxt2, sxd2, syb2, syh2, syt2, syd2, scb2, sch2, sct2, scd2, ssb2, ssh2, sst2, ssd2,
    n_prog1,  # programs of the first tensor; the rest of the grid does the second
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    BACKWARD: tl.constexpr, HAS_K: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_K:
        if pid >= n_prog1:
            _rotate_rows(pid - n_prog1, x2_ptr, y2_ptr, c2_ptr, s2_ptr, R2, H2, T2,
                         sxb2, sxh2, sxt2, sxd2, syb2, syh2, syt2, syd2, scb2, sch2, sct2, scd2, ssb2, ssh2, sst2, ssd2,
                         HALF, BLOCK_R, BLOCK_H, BACKWARD)
        else:
            _rotate_rows(pid, x_ptr, y_ptr, c_ptr, s_ptr, R, H, T,
                         sxb, sxh, sxt, sxd, syb, syh, syt, syd, scb, sch, sct, scd, ssb, ssh, sst, ssd,
                         HALF, BLOCK_R, BLOCK_H, BACKWARD)
    else:
        _rotate_rows(pid, x_ptr, y_ptr, c_ptr, s_ptr, R, H, T,
                     sxb, sxh, sxt, sxd, syb, syh, syt, syd, scb, sch, sct, scd, ssb, ssh, sst, ssd,
                     HALF, BLOCK_R, BLOCK_H, BACKWARD)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _dims4(t: torch.Tensor, shape: tuple):
    """Strides of `t` broadcast to `shape` (4-D, t right-aligned to it): stride 0 where t has
    size 1 or lacks the dim. Python tuples only: a view per tensor would cost host time."""
    n, st, sz = len(shape), t.stride(), t.shape
    off = n - t.dim()
    return [0 if i < off or sz[i - off] == 1 else st[i - off] for i in range(n)]


def _group(x: torch.Tensor, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> list:
    """Kernel arguments for one tensor: pointers, rows, the two inner leading sizes and the 4-D
    (b, h, t, d) strides of x, y and of cos / sin broadcast to x (stride 0 where they broadcast).

    The three leading dims are ordered by x's strides, largest first, so that consecutive rows
    of a program are adjacent in memory (transformers' q is a (B, T, H, D) buffer seen as
    (B, H, T, D): rows then go (b, t, h)). A rank above 4 is reshaped to 4 (a view when its
    leading dims merge, else a copy)."""
    if x.dim() > 4:
        lead = x.shape[:-3]
        x, y = x.reshape(-1, *x.shape[-3:]), y.reshape(-1, *y.shape[-3:])
        cos = cos.expand(*lead, *cos.shape[-3:]).reshape(-1, *cos.shape[-3:]) if cos.dim() > 3 else cos
        sin = sin.expand(*lead, *sin.shape[-3:]).reshape(-1, *sin.shape[-3:]) if sin.dim() > 3 else sin
    shape = (1,) * (4 - x.dim()) + tuple(x.shape)
    sx, sy, sc, ss = _dims4(x, shape), _dims4(y, shape), _dims4(cos, shape), _dims4(sin, shape)
    order = sorted(range(3), key=lambda i: -sx[i] if shape[i] > 1 else -(1 << 62))
    if order != [0, 1, 2]:
        order.append(3)
        shape = [shape[i] for i in order]
        sx, sy, sc, ss = ([s[i] for i in order] for s in (sx, sy, sc, ss))
    return [x, y, cos, sin, shape[0] * shape[1] * shape[2], shape[1], shape[2], *sx, *sy, *sc, *ss]


def _dense_strides(x: torch.Tensor):
    """x's strides when x is non-overlapping and dense (a permutation of a contiguous layout, as
    transformers' transposed q, k and their gradients are), else None."""
    if x.is_contiguous():
        return x.stride()
    # dense and non-overlapping: the dims of size > 1, sorted by stride, have the strides of a
    # contiguous tensor of those sizes (1, n0, n0 * n1, ...)
    expected = 1
    for st, n in sorted((st, n) for n, st in zip(x.shape, x.stride()) if n != 1):
        if st != expected:
            return None
        expected *= n
    return x.stride()


def rotary_launch(xs: list, cos: torch.Tensor, sin: torch.Tensor, out_dtypes: list, backward: bool,
                  layouts=None) -> list:
    """Rotate each tensor of `xs` (one or two, same last dim D) in one launch; returns new tensors
    of `out_dtypes`, contiguous, or with the strides `layouts[i]` where given (a dense layout of
    x's shape). backward=True applies the transposed map (xs are gradients)."""
    ys = [torch.empty(x.shape, dtype=dt, device=x.device) if layouts is None or layouts[i] is None or x.dim() > 4
          else torch.empty_strided(x.shape, layouts[i], dtype=dt, device=x.device)
          for i, (x, dt) in enumerate(zip(xs, out_dtypes))]
    d = xs[0].shape[-1]
    half = d // 2
    block_h = next_pow2(half)
    block_r = max(TILE // block_h, 1)
    groups = [_group(x, y, cos, sin) for x, y in zip(xs, ys) if x.numel()]
    if not groups:
        return ys
    progs = [cdiv(g[4], block_r) for g in groups]
    has_k = len(groups) == 2
    second = groups[1] if has_k else groups[0]
    with device_ctx(xs[0]):
        _rotary_kernel[(sum(progs),)](
            *groups[0], *second, progs[0],
            HALF=half, BLOCK_R=block_r, BLOCK_H=block_h, BACKWARD=backward, HAS_K=has_k, num_warps=4,
        )
    return ys


def _cos_sin_grads(dys, xs, cos, sin, need_cos: bool, need_sin: bool):
    """dcos = sum(dy * x), dsin = sum(dy * rotate_half(x)) over what cos / sin broadcast over."""
    dcos = dsin = None
    for dy, x in zip(dys, xs):
        if dy is None:
            continue
        dyf = dy.float()
        if need_cos:
            g = (dyf * x.float()).sum_to_size(cos.shape)
            dcos = g if dcos is None else dcos + g
        if need_sin:
            g = (dyf * rotate_half(x.float())).sum_to_size(sin.shape)
            dsin = g if dsin is None else dsin + g
    return (dcos.to(cos.dtype) if dcos is not None else None, dsin.to(sin.dtype) if dsin is not None else None)


# ---------------------------------------------------------------------------------------------
# Custom op + autograd (graphs: torch.compile, export, AOTAutograd with cudagraphs=True)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tritonize::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    out_dtype = x.dtype if backward else _out_dtype(x, cos, sin)
    if use_triton(x):
        return rotary_launch([x], cos, sin, [out_dtype], backward)[0]  # contiguous (the fake's layout)
    if backward:  # the transposed map: dx = g cos + rotate_half^T(g sin)
        gs = (x.float() * sin.float())
        h = x.shape[-1] // 2
        return (x.float() * cos.float() + torch.cat((gs[..., h:], -gs[..., :h]), -1)).to(out_dtype)
    return rotary_reference(x, cos, sin).to(out_dtype).contiguous()


@_rotary_op.register_fake
def _(x, cos, sin, backward):
    return torch.empty(x.shape, dtype=x.dtype if backward else _out_dtype(x, cos, sin), device=x.device)


def _setup_context(ctx, inputs, output):
    x, cos, sin, _ = inputs
    ctx.need_cs = (cos.requires_grad, sin.requires_grad)
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(cos, sin, x if any(ctx.need_cs) else None)


def _backward(ctx, dy):
    cos, sin, x = ctx.saved_tensors
    dx = _rotary_op(dy, cos, sin, True).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    dcos, dsin = _cos_sin_grads([dy], [x], cos, sin, *ctx.need_cs) if any(ctx.need_cs) else (None, None)
    return dx, dcos, dsin, None


_rotary_op.register_autograd(_backward, setup_context=_setup_context)


class _RotaryFn(torch.autograd.Function):
    """Eager fast path (see `_common.eager_fast_path`): q and k in one launch each way, one
    autograd node; cos / sin are saved (no activation), x only when cos / sin need gradients."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        xs = [q] if k is None else [q, k]
        out_dtypes = [_out_dtype(x, cos, sin) for x in xs]
        # forward output contiguous, gradients back in the inputs' layout: see the module doc
        ctx.layouts = [_dense_strides(x) for x in xs]
        ys = rotary_launch(xs, cos, sin, out_dtypes, False, None if OUT_CONTIGUOUS else ctx.layouts)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no launch for it
        ctx.need_cs = (cos.requires_grad, sin.requires_grad)
        ctx.x_dtypes = [x.dtype for x in xs]
        if any(ctx.need_cs):
            ctx.save_for_backward(cos, sin, q, k)
        else:
            ctx.save_for_backward(cos, sin)
        return ys[0], (ys[1] if k is not None else None)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors[:2]
        gs = [dq, dk][: len(ctx.x_dtypes)]
        live = [i for i, g in enumerate(gs) if g is not None]
        dxs = [None, None]
        if live:
            outs = rotary_launch([gs[i] for i in live], cos, sin, [ctx.x_dtypes[i] for i in live], True,
                                 [ctx.layouts[i] for i in live])
            for i, o in zip(live, outs):
                dxs[i] = o
        dcos = dsin = None
        if any(ctx.need_cs):
            q, k = ctx.saved_tensors[2:]
            dcos, dsin = _cos_sin_grads(gs, [q, k], cos, sin, *ctx.need_cs)
        return dxs[0], dxs[1], dcos, dsin


_rotary_fn = fast_apply(_RotaryFn)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for one tensor, in fp32."""
    xf = x.float()
    return xf * cos.float() + rotate_half(xf) * sin.float()


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def _out_dtype(x, cos, sin):
    # what `x * cos + rotate_half(x) * sin` gives in torch (result_type: a 0-d cos does not
    # promote a tensor of the same category)
    if cos.dtype == x.dtype and sin.dtype == x.dtype:
        return x.dtype
    return torch.promote_types(torch.result_type(x, cos), torch.result_type(x, sin))


def _fits(t, x) -> bool:
    # t broadcasts to x with the same number of dims (the common call): each size 1 or equal
    return t.dim() == x.dim() and all(a == 1 or a == b for a, b in zip(t.shape, x.shape))


def _plain_call(q, k, cos, sin) -> bool:
    """The valid common call, checked cheaply (no message is formatted unless a check fails)."""
    return (type(q) is torch.Tensor and type(cos) is torch.Tensor and type(sin) is torch.Tensor
            and q.dtype in FLOAT_DTYPES and cos.dtype in FLOAT_DTYPES and sin.dtype in FLOAT_DTYPES
            and q.dim() >= 1 and q.shape[-1] % 2 == 0 and q.shape[-1] > 0
            and cos.device == q.device and sin.device == q.device
            and _fits(cos, q) and _fits(sin, q)
            and (k is None or (type(k) is torch.Tensor and k.dtype in FLOAT_DTYPES and k.device == q.device
                               and k.shape[-1] == q.shape[-1] and _fits(cos, k) and _fits(sin, k))))


def _check(q, k, cos, sin):
    op = "rotary_embedding"
    check_tensor(op, "q", q)
    check_tensor(op, "k", k, optional=True)
    check_tensor(op, "cos", cos)
    check_tensor(op, "sin", sin)
    check_same_device(op, q=q, k=k, cos=cos, sin=sin)
    d = q.shape[-1] if q.dim() else 0
    check_arg(op, "q", q.dim() >= 1 and d % 2 == 0 and d > 0, f"must have an even, non-zero last dim, got shape {tuple(q.shape)}")
    if k is not None:
        check_arg(op, "k", k.dim() >= 1 and k.shape[-1] == d,
                  f"must have q's last dim {d}, got shape {tuple(k.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        for xname, x in (("q", q), ("k", k)):
            if x is None:
                continue
            try:
                ok = torch.broadcast_shapes(t.shape, x.shape) == x.shape
            except RuntimeError:
                ok = False
            check_arg(op, name, ok, f"of shape {tuple(t.shape)} must broadcast to {xname}'s shape {tuple(x.shape)}")


def rotary_embedding(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
    """(q * cos + rotate_half(q) * sin, same for k): HF's `apply_rotary_pos_emb` with cos and sin
    already broadcastable to q and k (transformers unsqueezes them to (B, 1, T, D)). Returns a
    tuple (q_embed, k_embed); k may be None (then k_embed is None). Any strides; the outputs
    have the inputs' layout and torch's promoted dtype. Gradients for q, k, and for cos / sin when
    they require grad."""
    if not _plain_call(q, k, cos, sin):
        _check(q, k, cos, sin)
    if eager_fast_path(q):
        return _rotary_fn(q, k, cos, sin)
    return _rotary_op(q, cos, sin, False), (_rotary_op(k, cos, sin, False) if k is not None else None)


__all__ = ["rotary_embedding", "rotary_reference", "rotate_half", "rotary_launch"]
