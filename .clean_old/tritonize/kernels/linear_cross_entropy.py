"""linear_cross_entropy(hidden, weight, target, ...): the LM head and the loss, never the (N, V) logits.

The tokens are walked in chunks of C rows. Per chunk, all in the forward (as Liger's FLCE):
    logits_c = h_c @ W^T (+ b)                       cuBLAS (torch.mm / addmm): at the matmul ceiling
    loss_c, dlogits_c = CE kernel, in place           tritonize.kernels.cross_entropy's Triton kernel:
                                                      the gradient overwrites the chunk's logits
    dh_c  = dlogits_c @ W                             written straight into dh[c] (mm out=)
    dW   += dlogits_c^T @ h_c                         addmm into dW
    db   += sum_rows dlogits_c                        fp32
so the backward only scales dh, dW, db by the upstream gradient (in place, skipped when it is 1,
which is the usual case). Peak memory above the inputs: dh + dW (+ db) — the gradients every
implementation returns — plus one chunk of logits.

The chunk size. The chunk's logits are C x V; dW's accumulation reads and writes all of dW once
per chunk, so small chunks make the dW update memory-bound. Default: C x V ~ N x H elements (the
same transient budget as Liger, so peak memory is never above Liger's), at least 256 rows and
at most 2048; `chunk_size=` overrides (tests use it to make chunks that do not divide N).

dW's accumulator has the weight's dtype (addmm with beta=1: fp32 inside each matmul, one
rounding per chunk). An fp32 accumulator would double dW's memory (+2 GB at 128256 x 4096),
which would break the memory target; with the default chunking there are N / C <= ~32 roundings.
db accumulates in fp32 (V floats).

chunk_size="lean" keeps the transient at Liger's budget but walks dW half as often: chunks of
twice the rows over half the vocabulary at a time, the row normaliser merged across the slices
(`_ce_slices`, one half of the logits recomputed; see `lean_plan` for the figures).

reduction="none": the per-row upstream gradient must be applied before the rows are summed into
dW, and it is not known in the forward; so the forward computes only the loss, and the backward
re-runs the chunk loop with the per-row gradient as the CE kernel's row scale (one extra logits
matmul, no extra memory).
"""

from __future__ import annotations

import torch

from ._common import (
    FLOAT_DTYPES, check_arg, check_same_device, check_tensor, eager_fast_path, fast_apply, linear_backward, rows_2d,
    use_triton,
)  # fmt: skip
from ._norm_common import cdiv, next_pow2
from .cross_entropy import (
    REDUCTIONS,
    TARGET_DTYPES,
    check_common,
    check_targets,
    cross_entropy_forward,
    divisor_for,
    prepare_normalizer,
    scale_rows_,
)

MIN_CHUNK = 256
MAX_CHUNK = 2048


def liger_rows(n: int, h: int, v: int) -> int:
    """Liger's chunk rule: a power of two with rows x V ~ N x H (the chunk's logits no larger than
    the hidden states)."""
    return next_pow2(cdiv(n, cdiv(max(v, 1), h)))


def default_chunk_size(n: int, h: int, v: int) -> int:
    """Rows per chunk, a power of two in [MIN_CHUNK, MAX_CHUNK] (or N when N is smaller).

    Two costs pull apart. Memory: the chunk's (C, V) logits are the only temporary beyond dh and
    dW, so a small C is lean (Liger's rule, C x V ~ N x H). Time: every chunk adds its
    dlogits^T @ h into dW with a GEMM whose depth is only C, so it reads and writes all of dW
    (V x H) per chunk — at C = 256 that traffic made N8192 H2048 V128256 take 32.7 ms against
    eager's 23.7 on the H100. C >= H / 4 (the chunk's logits at most a quarter of dW's size) keeps
    that part near a third of the chunk's matmul time: 512 rows gave 23.5 ms (0.99x eager) at
    H2048, 1024 rows 39.0 ms (0.97x eager) at H4096, for 10-17% more memory than Liger's chunks.
    """
    # int arithmetic: triton.cdiv / next_power_of_2 cost ~4 us a call on the host (constexpr_function)
    liger = liger_rows(n, h, v)
    c = max(liger, next_pow2(max(h // 4, 1)))
    return max(1, min(n, max(MIN_CHUNK, min(MAX_CHUNK, c))))


def logits_chunk_size(n: int, h: int, v: int) -> int:
    """Chunk rows when the (N, V) logits are returned anyway: the chunk buffer may then be up to
    a quarter of them (fewer, fuller matmuls, fewer passes over dW; H100 LCE N8192 H2048:
    512 rows 24.1 ms, 1024 rows 20.9, 2048 rows 19.6), never below the lean default."""
    return max(default_chunk_size(n, h, v), min(MAX_CHUNK, next_pow2(max(n // 4, 1))))


# chunk_size="wide" (public) is passed down as this int: the logits_chunk_size rule without logits
WIDE = -1
# chunk_size="lean" (public): `lean_plan`, vocabulary slices within Liger's transient budget
LEAN = -2


def lean_plan(n: int, h: int, v: int) -> tuple[int, int]:
    """(rows per chunk, vocabulary slices) of chunk_size="lean": a buffer of Liger's size (its
    rows x V: C x V ~ N x H) holding twice the rows over half the vocabulary (`_ce_slices`: the
    loss normaliser needs a second walk over the slices, one of which is still in the buffer).

    Measured on the H100 (bf16, N 8192, V 128256, fwd+bwd, session 8 run 8): H 2048 27.8 ms
    against 32.8 for 256-row chunks over the whole vocabulary (same buffer) and Liger's 34.7;
    H 4096 52.4 vs 62.1 and 64.1. Half the dW passes (each a 0.53 / 1.08 ms memory-bound addmm)
    for one recomputed half of the logits. 4 and 8 slices timed the same or slower (run 7).
    """
    liger = max(1, liger_rows(n, h, v))
    if 2 * liger > n or _padded(v) < 32:
        return min(n, liger), 1  # everything fits in one Liger chunk: nothing to gain
    return 2 * liger, 2


def _padded(v: int) -> int:
    return (v + 15) // 16 * 16


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    scale: float = 1.0,
    normalizer: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    need_dh: bool = True,
    need_dw: bool = True,
    need_db: bool = True,
    row_scale: torch.Tensor | None = None,
    chunk_size: int | None = None,
    logits_out: torch.Tensor | None = None,
):
    """hidden (N, H), weight (V, H), target (N,), bias (V,). Returns (loss rows fp32 (N,), dh, dW,
    db) with the gradients of sum(loss rows) (None where not needed). With `row_scale` (N,) each
    row's loss and gradient are multiplied by it (the backward of reduction='none'). With
    `logits_out` (N, V) contiguous, the logits are also written there (the LM head's output when
    the model returns it: one matmul serves both)."""
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    need_db = need_db and bias is not None
    compute_grad = need_dh or need_dw or need_db
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
    # Every matmul dimension over the vocabulary padded to a multiple of 16 (vp): with an odd V
    # (GPT-2's 50257) the logits' rows, the K of dlogits @ W and the M of dlogits^T @ h are
    # misaligned and cuBLAS falls back to pre-Hopper kernels (H100: ~12 ms of a GPT-2 step
    # instead of ~3). The weight (and bias) get vp - V zero rows in a padded copy, so the padded
    # logit columns are exactly 0, the loss kernel reads and writes only the first V, and the
    # padded gradient columns stay 0: they add nothing to dh, and dW's padded rows are cut off.
    vp = _padded(v)
    if vp != v:
        w_k = weight.new_zeros((vp, h))
        w_k[:v] = weight
        b_k = None
        if bias is not None:
            b_k = bias.new_zeros(vp)
            b_k[:v] = bias
    else:
        w_k, b_k = weight, bias
    # dW is written by the first chunk's matmul (beta = 0), so no zero fill of V x H. Its first V
    # rows of a (vp, H) buffer are a contiguous tensor.
    dw_k = torch.empty((vp, h), dtype=weight.dtype, device=dev) if need_dw else None
    dw = None if dw_k is None else (dw_k if vp == v else dw_k[:v])
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    if n == 0:
        if need_dw:
            dw.zero_()
        return loss, dh, dw, (db.to(bias.dtype) if need_db else None)
    div = divisor_for(target, ignore_index, reduction, normalizer)
    if chunk_size == LEAN and logits_out is None:
        c, k = lean_plan(n, h, v)
        if k > 1:
            _sliced_chunks(hidden, w_k, b_k, target, loss, dh, dw_k, db, div, c, k, v, ignore_index=ignore_index,
                           scale=scale, label_smoothing=label_smoothing, softcap=softcap, compute_grad=compute_grad,
                           row_scale=row_scale)  # fmt: skip
            return loss, dh, dw, (db.to(bias.dtype) if need_db else None)
    elif chunk_size == LEAN:
        c = default_chunk_size(n, h, v)  # the logits are materialised anyway: no slicing
    else:
        c = logits_chunk_size(n, h, v) if chunk_size == WIDE else (chunk_size or default_chunk_size(n, h, v))
    buf = torch.empty((min(c, n), vp), dtype=hidden.dtype, device=dev)
    wt = w_k.t()
    b = None if b_k is None else b_k.to(buf.dtype)
    one_chunk = c >= n  # then no slicing: each slice is a view op of a few us of host time
    # Returned logits with aligned rows: the matmul writes them, the loss kernel reads them and
    # writes the gradient into buf. Unaligned rows (odd V): the matmul writes buf (fast kernels),
    # a copy fills the logits, the gradient overwrites buf in place.
    direct = logits_out is not None and vp == v
    for s in range(0, n, c):
        e = min(n, s + c)
        h_c = hidden if one_chunk else hidden[s:e]
        lg_p = buf if one_chunk else buf[: e - s]  # (rows, vp): what the matmuls see
        lg = lg_p if vp == v else lg_p[:, :v]  # (rows, V): what the loss kernel sees
        out_c = None if logits_out is None else (logits_out if one_chunk else logits_out[s:e])
        z = out_c if direct else lg_p
        if b is not None:
            torch.addmm(b, h_c, wt, out=z)
        else:
            torch.mm(h_c, wt, out=z)
        if out_c is not None and not direct:
            out_c.copy_(lg)
        cross_entropy_forward(
            out_c if direct else lg, target if one_chunk else target[s:e], ignore_index=ignore_index, divisor=div,
            scale=scale, label_smoothing=label_smoothing, softcap=softcap, compute_grad=compute_grad, grad=lg,
            loss=loss if one_chunk else loss[s:e],
            row_scale=None if row_scale is None else (row_scale if one_chunk else row_scale[s:e]),
        )  # fmt: skip
        if need_dh:
            torch.mm(lg_p, w_k, out=dh if one_chunk else dh[s:e])
        if need_dw:
            if s == 0:
                torch.mm(lg_p.t(), h_c, out=dw_k)
            else:
                dw_k.addmm_(lg_p.t(), h_c)  # fp32 inside the matmul, one rounding per chunk
        if need_db:
            db.add_(lg.sum(0, dtype=torch.float32))
    return loss, dh, dw, (db.to(bias.dtype) if need_db else None)


def _sliced_chunks(hidden, w_k, b_k, target, loss, dh, dw_k, db, div, c, k, v, *, ignore_index, scale,
                   label_smoothing, softcap, compute_grad, row_scale):  # fmt: skip
    """chunk_size="lean": C-row chunks, the (padded) vocabulary in k slices (`_ce_slices`).
    Fills loss, dh, dW (its padded rows too: 0) and db like the plain chunk loop."""
    from ._ce_slices import slice_grad, slice_stats, state_buffers

    n, h = hidden.shape
    vp = w_k.shape[0]
    step = (cdiv(vp, k) + 15) // 16 * 16  # slice starts 16-aligned (cuBLAS's fast kernels)
    slices = [(a, min(vp, a + step)) for a in range(0, vp, step)]
    flat = torch.empty(min(c, n) * step, dtype=hidden.dtype, device=hidden.device)
    state, x_t = state_buffers(min(c, n), hidden.device)
    wt = w_k.t()
    b = None if b_k is None else b_k.to(flat.dtype)
    kw = dict(ignore_index=ignore_index, smoothing=label_smoothing, softcap=softcap)
    for s in range(0, n, c):
        e = min(n, s + c)
        r = e - s
        h_c, t_c = hidden[s:e], target[s:e]
        loss_c = loss[s:e]
        rs_c = None if row_scale is None else row_scale[s:e]

        def logits_of(a, bnd):
            # contiguous (r, bnd - a) view at the buffer's start: every GEMM output is dense
            z = flat[: r * (bnd - a)].view(r, bnd - a)
            if b is not None:
                torch.addmm(b[a:bnd], h_c, wt[:, a:bnd], out=z)
            else:
                torch.mm(h_c, wt[:, a:bnd], out=z)
            return z

        for i, (a, bnd) in enumerate(slices):  # pass 1: the row normaliser over every slice
            z = logits_of(a, bnd)
            slice_stats(z[:, : max(0, min(bnd, v) - a)], t_c, state, x_t, a, first=i == 0, **kw)
        # pass 2: the last slice is still in the buffer; the others are recomputed
        order = [len(slices) - 1] + list(range(len(slices) - 1))
        for i, j in enumerate(order):
            a, bnd = slices[j]
            if i > 0:
                if not compute_grad:
                    break
                z = logits_of(a, bnd)
            zv = z[:, : max(0, min(bnd, v) - a)]  # the padded columns stay 0 from the matmul
            slice_grad(zv, t_c, state, x_t, loss_c, a, v, divisor=div, scale=scale, row_scale=rs_c,
                       compute_grad=compute_grad, write_loss=i == 0, **kw)  # fmt: skip
            if dh is not None:
                if i == 0:
                    torch.mm(z, w_k[a:bnd], out=dh[s:e])
                else:
                    dh[s:e].addmm_(z, w_k[a:bnd])  # fp32 inside the matmul, one rounding per slice
            if dw_k is not None:
                if s == 0:
                    torch.mm(z.t(), h_c, out=dw_k[a:bnd])
                else:
                    dw_k[a:bnd].addmm_(z.t(), h_c)
            if db is not None:
                db[a : a + zv.shape[1]].add_(zv.sum(0, dtype=torch.float32))


def _forward_reference(hidden, weight, target, bias, ignore_index, reduction, scale, normalizer,
                       label_smoothing, softcap, need_dh, need_dw, need_db, row_scale):  # fmt: skip
    """CPU fallback of the op: plain torch in fp32, closed form (the op body runs below the
    autograd key, so no autograd here): dlogits from the CE reference, then the three matmuls."""
    from .cross_entropy import cross_entropy_rows_reference

    hf, wf = hidden.float(), weight.float()
    logits = torch.nn.functional.linear(hf, wf, None if bias is None else bias.float())
    need_db = need_db and bias is not None
    loss, g = cross_entropy_rows_reference(
        logits, target, ignore_index=ignore_index, reduction=reduction, scale=scale, normalizer=normalizer,
        label_smoothing=label_smoothing, softcap=softcap, compute_grad=need_dh or need_dw or need_db,
    )  # fmt: skip
    if row_scale is not None:
        loss = loss * row_scale.float()
        g = None if g is None else g * row_scale.float().unsqueeze(-1)
    return (
        loss,
        (g @ wf).to(hidden.dtype) if need_dh else None,
        (g.t() @ hf).to(weight.dtype) if need_dw else None,
        g.sum(0).to(bias.dtype) if need_db else None,
    )


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to Dynamo/AOTAutograd/Inductor) + autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tritonize::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    row_scale: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    scale: float,
    label_smoothing: float,
    softcap: float | None,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h2 = rows_2d(hidden)
    t1 = target.reshape(-1)
    rs = None if row_scale is None else row_scale.reshape(-1)
    args = (ignore_index, reduction, scale, normalizer, label_smoothing, softcap, need_dh, need_dw, need_db, rs)
    if use_triton(hidden):
        loss, dh, dw, db = linear_cross_entropy_forward(
            h2, weight, t1, bias, ignore_index=ignore_index, reduction=reduction, scale=scale,
            normalizer=normalizer, label_smoothing=label_smoothing, softcap=softcap, need_dh=need_dh,
            need_dw=need_dw, need_db=need_db, row_scale=rs, chunk_size=chunk_size or None,
        )  # fmt: skip
    else:
        loss, dh, dw, db = _forward_reference(h2, weight, t1, bias, *args)
    # mean/sum reduce inside the op, so its autograd formula (a scalar times the saved
    # gradients) is exact for the op's own output. Absent gradients: distinct empty tensors
    # (custom-op outputs may not alias one another).
    return (
        loss.view(target.shape) if reduction == "none" else loss.sum(),
        hidden.new_empty(0) if dh is None else dh.view(hidden.shape),
        hidden.new_empty(0) if dw is None else dw,
        hidden.new_empty(0) if db is None else db,
    )


@_lce_fwd_op.register_fake
def _(hidden, weight, target, bias, normalizer, row_scale, ignore_index, reduction, scale, label_smoothing,
      softcap, need_dh, need_dw, need_db, chunk_size):  # fmt: skip
    return (
        hidden.new_empty(target.shape if reduction == "none" else (), dtype=torch.float32),
        hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_dw else hidden.new_empty(0),
        bias.new_empty(bias.shape) if need_db and bias is not None else hidden.new_empty(0),
    )


@torch.library.custom_op("tritonize::linear_cross_entropy_bwd", mutates_args=("dh", "dw", "db"))
def _lce_bwd_op(dh: torch.Tensor, dw: torch.Tensor, db: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """dh, dW, db *= grad_loss (a scalar) in place; a no-op pass where it is 1 (the usual case)."""
    for g in (dh, dw, db):
        if g.numel():
            g2 = g if g.dim() > 1 else g.view(1, -1)
            scale_rows_(g2, grad_loss.reshape(()))  # a 0-d factor: every row reads it with stride 0


@_lce_bwd_op.register_fake
def _(dh, dw, db, grad_loss):
    return None


_N_ARGS = 15


def _setup_context(ctx, inputs, output):
    (hidden, weight, target, bias, normalizer, _rs, ignore_index, reduction, scale, label_smoothing,
     softcap, need_dh, need_dw, need_db, chunk_size) = inputs  # fmt: skip
    _loss, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    # no zero-filled "gradients" for dh, dW, db in the backward (dW alone is 0.5-1 GB)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.need = (need_dh, need_dw, need_db)
    if reduction == "none":
        # Recompute in the backward, with the per-row upstream gradient folded in before the sum.
        ctx.args = (ignore_index, reduction, scale, label_smoothing, softcap)
        ctx.chunk_size = chunk_size
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, target, bias if bias is not None else hidden.new_empty(0))
    else:
        ctx.save_for_backward(dh, dw, db)


def _ran_twice(op: str) -> RuntimeError:
    return RuntimeError(
        f"tritonize.{op}: backward ran twice through the same graph; the gradients are computed "
        "in the forward and scaled in place (no retain_graph)"
    )


def _first_backward(ctx, op: str) -> None:
    """The custom ops' backward scales gradients formed in the forward, in place: a second
    backward through the same graph would scale them twice, so it raises instead."""
    if getattr(ctx, "_used", False):
        raise _ran_twice(op)
    ctx._used = True


def _take_grads(ctx, op: str):
    """The eager Functions' (dh, dW, db), formed in the forward: handed out once (the backward
    scales them in place), then dropped; a second backward raises."""
    grads = getattr(ctx, "grads", None)
    if grads is None:
        raise _ran_twice(op)
    ctx.grads = None
    return grads


def _backward(ctx, grad_loss, *_unused):
    need_dh, need_dw, need_db = ctx.need
    if ctx.reduction == "none":
        need_dh, need_dw, need_db = (ctx.needs_input_grad[i] for i in (0, 1, 3))
        hidden, weight, target, bias = ctx.saved_tensors
        ignore_index, reduction, scale, label_smoothing, softcap = ctx.args
        _, dh, dw, db = _lce_fwd_op(
            hidden, weight, target, bias if ctx.has_bias else None, None, grad_loss, ignore_index, reduction,
            scale, label_smoothing, softcap, need_dh, need_dw, need_db, ctx.chunk_size,
        )  # fmt: skip
    else:
        dh, dw, db = ctx.saved_tensors
        _first_backward(ctx, "linear_cross_entropy")
        _lce_bwd_op(dh, dw, db, grad_loss)
    return (
        dh if need_dh else None,
        dw if need_dw else None,
        None,
        db if need_db else None,
    ) + (None,) * (_N_ARGS - 4)


_lce_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LinearCrossEntropyFn(torch.autograd.Function):
    """Eager fast path (see _common.eager_fast_path): the chunk loop called directly, without
    the custom-op dispatch layers; same launchers and numerics as the custom ops."""

    # The non-tensor arguments come packed in one tuple `opts` (see _common.fast_apply).
    @staticmethod
    def forward(ctx, hidden, weight, target, bias, normalizer, opts):
        ignore_index, reduction, scale, label_smoothing, softcap, chunk_size = opts
        need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
        h2 = rows_2d(hidden)
        t1 = target if target.dim() == 1 else target.reshape(-1)
        ctx.reduction = reduction
        if reduction == "none":
            # gradients in the backward, with the per-row upstream gradient (see the module doc)
            loss, _, _, _ = linear_cross_entropy_forward(
                h2, weight, t1, bias, ignore_index=ignore_index, reduction=reduction, scale=scale,
                normalizer=normalizer, label_smoothing=label_smoothing, softcap=softcap,
                need_dh=False, need_dw=False, need_db=False, chunk_size=chunk_size,
            )  # fmt: skip
            ctx.args = (ignore_index, scale, label_smoothing, softcap, chunk_size)
            ctx.save_for_backward(hidden, weight, target, bias)
            return loss.view(target.shape)
        loss, dh, dw, db = linear_cross_entropy_forward(
            h2, weight, t1, bias, ignore_index=ignore_index, reduction=reduction, scale=scale,
            normalizer=normalizer, label_smoothing=label_smoothing, softcap=softcap,
            need_dh=need_dh, need_dw=need_dw, need_db=need_db, chunk_size=chunk_size,
        )  # fmt: skip
        # attributes, dropped in backward: used once, then owned by the caller (no clone)
        ctx.grads = (dh if dh is None or hidden.dim() == 2 else dh.view(hidden.shape), dw, db)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == "none":
            need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
            hidden, weight, target, bias = ctx.saved_tensors
            ignore_index, scale, label_smoothing, softcap, chunk_size = ctx.args
            _, dh, dw, db = linear_cross_entropy_forward(
                rows_2d(hidden), weight, target.reshape(-1), bias, ignore_index=ignore_index, reduction="none",
                scale=scale, label_smoothing=label_smoothing, softcap=softcap, need_dh=need_dh, need_dw=need_dw,
                need_db=need_db, row_scale=grad_loss.reshape(-1), chunk_size=chunk_size,
            )  # fmt: skip
            dh = None if dh is None else dh.view(hidden.shape)
        else:
            dh, dw, db = _take_grads(ctx, "linear_cross_entropy")
            for g in (dh, dw, db):
                if g is not None and g.numel():
                    g2 = g if g.dim() > 1 else g.view(1, -1)
                    scale_rows_(g2, grad_loss)  # grad_loss is 0-d: every row reads it with stride 0
        return dh, dw, None, db, None, None


_linear_cross_entropy_fn = fast_apply(_LinearCrossEntropyFn)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_TF = (torch.Tensor.__torch_function__, torch.nn.Parameter.__torch_function__)
SLOW_PATH: dict = {}  # why a CUDA call took the custom op instead of the eager fast path (diagnostics)


def _plain_weight(w) -> bool:
    """A tensor without its own dispatch or torch_function: Parameter, Buffer, or a subclass of
    them that only tags (tied LM-head weights); DTensor & co. take the custom op."""
    t = type(w)
    if t in _PLAIN:
        return True
    ok = isinstance(w, torch.Tensor) and t.__torch_dispatch__ is torch.Tensor.__torch_dispatch__ \
        and t.__torch_function__ in _PLAIN_TF
    if not ok and w.is_cuda:
        SLOW_PATH[t.__name__] = SLOW_PATH.get(t.__name__, 0) + 1
    return ok


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(
    hidden, weight, target, bias=None, ignore_index=-100, reduction="mean", *, label_smoothing=0.0,
    logit_softcap=None, normalizer=None, upcast=True,
):  # fmt: skip
    """F.linear + cross_entropy_reference (our semantics), with autograd; fp32 when `upcast`."""
    from .cross_entropy import cross_entropy_reference

    if upcast:
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy_reference(
        logits, target, ignore_index, reduction, label_smoothing, logit_softcap=logit_softcap,
        normalizer=normalizer, upcast=upcast,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def _check_detailed(op, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, logit_softcap,
                    normalizer, chunk_size):
    check_tensor(op, "hidden", hidden)
    check_tensor(op, "weight", weight)
    check_tensor(op, "bias", bias, optional=True)
    check_tensor(op, "target", target, dtypes=TARGET_DTYPES)
    check_same_device(op, hidden=hidden, weight=weight, target=target, bias=bias)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"tritonize.{op}: argument 'weight' has dtype {weight.dtype}, but hidden has {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"tritonize.{op}: argument 'bias' has dtype {bias.dtype}, but hidden has {hidden.dtype}")
    check_arg(op, "hidden", hidden.dim() >= 1, "must have at least 1 dim (..., H)")
    check_arg(op, "weight", weight.dim() == 2, f"must be 2-d (V, H), got shape {tuple(weight.shape)}")
    check_arg(
        op, "weight", weight.shape[1] == hidden.shape[-1],
        f"must have shape (V, {hidden.shape[-1]}) to match hidden's last dim, got {tuple(weight.shape)}",
    )  # fmt: skip
    v = weight.shape[0]
    if bias is not None:
        check_arg(op, "bias", tuple(bias.shape) == (v,), f"must have shape ({v},), got {tuple(bias.shape)}")
    check_arg(
        op, "target", tuple(target.shape) == tuple(hidden.shape[:-1]),
        f"must have shape {tuple(hidden.shape[:-1])} (hidden's shape without the last dim), got {tuple(target.shape)}",
    )  # fmt: skip
    check_common(op, reduction, label_smoothing, logit_softcap, ignore_index)
    if normalizer is not None:
        check_arg(op, "normalizer", reduction != "none", "cannot be combined with reduction='none'")
    if chunk_size is not None:
        check_arg(
            op, "chunk_size",
            chunk_size in ("wide", "lean")
            or (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0),
            f"must be a positive int, 'wide', 'lean' or None, got {chunk_size!r}",
        )  # fmt: skip
    check_arg(op, "weight", v > 0 or target.numel() == 0, "has no rows (V == 0)")


def _tensors_ok(hidden, weight, target, bias) -> bool:
    """The tensor part of a valid call, as attribute reads only (both public functions' fast checks)."""
    T = torch.Tensor
    return (
        isinstance(hidden, T) and isinstance(weight, T) and isinstance(target, T)
        and hidden.dtype in FLOAT_DTYPES and weight.dtype == hidden.dtype and target.dtype in TARGET_DTYPES
        and (bias is None or (isinstance(bias, T) and bias.dtype == hidden.dtype and bias.dim() == 1
                              and bias.shape[0] == weight.shape[0] and bias.device == hidden.device))
        and weight.device == hidden.device and target.device == hidden.device
        and hidden.dim() >= 1 and weight.dim() == 2 and weight.shape[1] == hidden.shape[-1] and weight.shape[0] > 0
    )  # fmt: skip


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    logit_softcap: float | None = None,
    normalizer=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """cross_entropy(F.linear(hidden, weight, bias), target) without materialising the logits.

    hidden (..., H); weight (V, H); bias (V,) or None; target (...). Semantics of
    tritonize.kernels.cross_entropy (fp32 loss; mean over non-ignored targets, 0 when all are
    ignored; `normalizer` -> sum / normalizer, matching transformers' num_items_in_batch;
    `logit_softcap` -> Gemma-2 soft-capping). `chunk_size`: rows per chunk; None: the
    default from N, H, V (`default_chunk_size`); "wide": up to a quarter of N (at most 2048 rows,
    `logits_chunk_size`): fewer passes over dW for a larger chunk buffer (still at most a quarter
    of the (N, V) logits) — what `tritonize(drop_logits=True)` uses; "lean": a chunk buffer no
    larger than Liger's (its rows x V), holding twice the rows over half the vocabulary
    (`lean_plan`): the least memory, and faster than plain chunks of that size.
    """
    op = "linear_cross_entropy"
    # Fast path for the common (valid) call: attribute reads only; the detailed checks below
    # format their messages eagerly and run only when something is off (or for rarer arguments).
    if not (
        _tensors_ok(hidden, weight, target, bias)
        and logit_softcap is None and normalizer is None and (chunk_size is None or chunk_size == "wide" or chunk_size == "lean")
        and target.shape == hidden.shape[:-1]
        and reduction in REDUCTIONS and type(ignore_index) is int
        and type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0
    ):
        _check_detailed(op, hidden, weight, target, bias, ignore_index, reduction, label_smoothing, logit_softcap,
                        normalizer, chunk_size)
    if chunk_size == "wide":  # drop_logits passes it on every step: accepted by the fast check above
        chunk_size = WIDE
    elif chunk_size == "lean":
        chunk_size = LEAN
    v = weight.shape[0]
    check_targets(op, target, v, ignore_index)  # CPU targets only: returns at once for CUDA ones
    norm_t, scale = prepare_normalizer(op, normalizer, hidden.device)
    if normalizer is not None:
        reduction = "sum"  # loss = sum / normalizer, whatever the reduction said (transformers' rule)

    if target.numel() == 0:
        # No tokens: zero loss (rows empty), graph kept connected, nothing launched.
        z = hidden.float().sum(-1) * 0.0 + (weight.float().sum() * 0.0)
        if bias is not None:
            z = z + bias.float().sum() * 0.0
        return z if reduction == "none" else z.sum()

    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    if reduction == "none":
        need_fwd = (False, False, False)  # the backward recomputes (see the module doc)
    else:
        need_fwd = (need_dh, need_dw, need_db)
    # nn.Parameter is a plain tensor for dispatch (an LM head's weight always is one); other
    # subclasses (DTensor, ...) take the custom op.
    if eager_fast_path(hidden) and _plain_weight(weight):
        if grad_on and (need_dh or need_dw or need_db):
            return _linear_cross_entropy_fn(
                hidden, weight, target, bias, norm_t,
                (ignore_index, reduction, scale, float(label_smoothing),
                 None if logit_softcap is None else float(logit_softcap), chunk_size),
            )  # fmt: skip
        loss, _, _, _ = linear_cross_entropy_forward(
            rows_2d(hidden), weight, target.reshape(-1), bias, ignore_index=ignore_index, reduction=reduction,
            scale=scale, normalizer=norm_t, label_smoothing=float(label_smoothing),
            softcap=None if logit_softcap is None else float(logit_softcap), need_dh=False, need_dw=False,
            need_db=False, chunk_size=chunk_size,
        )  # fmt: skip
        return loss.view(target.shape) if reduction == "none" else loss.sum()
    loss, _, _, _ = _lce_fwd_op(
        hidden, weight, target, bias, norm_t, None, ignore_index, reduction, scale, float(label_smoothing),
        None if logit_softcap is None else float(logit_softcap), *need_fwd, chunk_size or 0,
    )  # fmt: skip
    return loss


# ---------------------------------------------------------------------------------------------
# The LM head whose logits are ALSO returned (every HF causal LM called with labels=)
# ---------------------------------------------------------------------------------------------


class _LinearCrossEntropyLogitsFn(torch.autograd.Function):
    """(loss, logits) from one pass of chunked matmuls: the logits are written once for the
    caller and the loss gradient is formed in the forward as in _LinearCrossEntropyFn. Backward:
    the loss part scales the saved gradients; a gradient on the returned logits (rare: a second
    loss on them) adds dlogits @ W, dlogits^T @ h and its column sum, like F.linear's backward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, bias, opts):
        ignore_index, reduction = opts
        ctx.set_materialize_grads(False)
        need_dh, need_dw, _, need_db = ctx.needs_input_grad[:4]
        h2 = rows_2d(hidden)
        n, v = h2.shape[0], weight.shape[0]
        logits = torch.empty((n, v), dtype=hidden.dtype, device=hidden.device)
        loss, dh, dw, db = linear_cross_entropy_forward(
            h2, weight, target.reshape(-1), bias, ignore_index=ignore_index, reduction=reduction,
            need_dh=need_dh, need_dw=need_dw, need_db=need_db, logits_out=logits,
            chunk_size=logits_chunk_size(n, h2.shape[1], v),
        )  # fmt: skip
        ctx.grads = (dh, dw, db)
        ctx.save_for_backward(hidden, weight)
        return loss.sum(), logits.view(*hidden.shape[:-1], v)

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        dh, dw, db = _take_grads(ctx, "linear_cross_entropy_with_logits")
        if grad_loss is None:  # only the logits carry a gradient
            dh = None if dh is None else dh.zero_()
            dw = None if dw is None else dw.zero_()
            db = None if db is None else db.zero_()
        else:
            for g in (dh, dw, db):
                if g is not None and g.numel():
                    scale_rows_(g if g.dim() > 1 else g.view(1, -1), grad_loss)
        if grad_logits is not None:
            hidden, weight = ctx.saved_tensors
            g2 = grad_logits.reshape(-1, weight.shape[0])
            if dh is not None:
                dh.addmm_(g2, weight)
            if dw is not None:
                dw.addmm_(g2.t(), rows_2d(hidden))
            if db is not None:
                db.add_(g2.sum(0, dtype=torch.float32).to(db.dtype))
        dh = None if dh is None else dh.view(ctx.saved_tensors[0].shape)
        return dh, dw, None, db, None


_linear_cross_entropy_logits_fn = fast_apply(_LinearCrossEntropyLogitsFn)


# The same one-pass form as a custom op, for graphs that AOTAutograd traces (rest="inductor",
# cudagraphs=True, torch.compile(backend="tritonize")): without it those graphs took the composed
# form, a second matmul over the vocabulary plus the lean path's small chunks (on the 12-layer
# Llama of bench_models, H100: 31 dW accumulations of 281 us per step; with this op and static
# parameters the CUDA-graphed step's GPU time went from 64.8 to 52.4 ms).


@torch.library.custom_op("tritonize::linear_cross_entropy_logits_fwd", mutates_args=())
def _lce_logits_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h2 = rows_2d(hidden)
    t1 = target.reshape(-1)
    n, v = h2.shape[0], weight.shape[0]
    need_db = need_db and bias is not None
    if use_triton(hidden):
        logits = torch.empty((n, v), dtype=hidden.dtype, device=hidden.device)
        loss, dh, dw, db = linear_cross_entropy_forward(
            h2, weight, t1, bias, ignore_index=ignore_index, reduction=reduction, need_dh=need_dh,
            need_dw=need_dw, need_db=need_db, logits_out=logits, chunk_size=logits_chunk_size(n, h2.shape[1], v),
        )  # fmt: skip
    else:
        logits = torch.nn.functional.linear(h2, weight, bias)
        loss, dh, dw, db = _forward_reference(h2, weight, t1, bias, ignore_index, reduction, 1.0, None, 0.0, None,
                                              need_dh, need_dw, need_db, None)  # fmt: skip
    return (
        loss.sum(),
        logits.view(*hidden.shape[:-1], v),
        hidden.new_empty(0) if dh is None else dh.view(hidden.shape),
        hidden.new_empty(0) if dw is None else dw,
        hidden.new_empty(0) if db is None else db,
    )


@_lce_logits_fwd_op.register_fake
def _(hidden, weight, target, bias, ignore_index, reduction, need_dh, need_dw, need_db):
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty((*hidden.shape[:-1], weight.shape[0])),
        hidden.new_empty(hidden.shape) if need_dh else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_dw else hidden.new_empty(0),
        bias.new_empty(bias.shape) if need_db and bias is not None else hidden.new_empty(0),
    )


def _logits_setup_context(ctx, inputs, output):
    hidden, weight, _target, _bias, _ii, _red, need_dh, need_dw, need_db = inputs
    _loss, _logits, dh, dw, db = output
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.set_materialize_grads(False)
    ctx.need = (need_dh, need_dw, need_db)
    ctx.save_for_backward(hidden, weight, dh, dw, db)


def _logits_backward(ctx, grad_loss, grad_logits, *_unused):
    """As _LinearCrossEntropyLogitsFn.backward: the saved gradients scaled by grad_loss (in place,
    the custom op), plus F.linear's backward for a gradient on the returned logits."""
    hidden, weight, dh, dw, db = ctx.saved_tensors
    need_dh, need_dw, need_db = ctx.need
    _first_backward(ctx, "linear_cross_entropy_with_logits")
    if grad_loss is None:  # only the logits carry a gradient
        grad_loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    _lce_bwd_op(dh, dw, db, grad_loss)
    if grad_logits is not None:
        ldh, ldw, ldb = linear_backward(grad_logits, hidden, weight, need_dh, need_dw, need_db and db.numel() > 0,
                                         db.dtype)
        dh = dh if ldh is None else dh + ldh
        dw = dw if ldw is None else dw + ldw
        db = db if ldb is None else db + ldb
    return (dh if need_dh else None, dw if need_dw else None, None,
            db if need_db and db.numel() else None, None, None, None, None, None)


_lce_logits_fwd_op.register_autograd(_logits_backward, setup_context=_logits_setup_context)


class _ReturnedLogitsGrad(torch.autograd.Function):
    """Identity on logits = F.linear(hidden, weight, bias) that were computed without autograd;
    its backward is F.linear's: dh = g @ W, dW = g^T @ h, db = sum(g). Used by the compiled
    (AOTAutograd) paths, where the returned logits leave the graph detached (see
    fuser/capture.attach_returned_logits): this node runs only when something differentiates them."""

    @staticmethod
    def forward(ctx, logits, hidden, weight, bias):
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, g):
        hidden, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (None, *linear_backward(g, hidden, weight, need[1], need[2], ctx.has_bias and need[3], g.dtype))


def attach_logits_grad(logits, hidden, weight, bias=None):
    """`logits` (detached, = F.linear(hidden, weight, bias)) with the LM head's gradient attached;
    as is when nothing requires grad. The result is a view made inside an autograd Function, so
    autograd refuses an in-place change of it (e.g. `logits /= t`; use `logits = logits / t`)."""
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return logits
    return _ReturnedLogitsGrad.apply(logits, hidden, weight, bias)


def linear_cross_entropy_with_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross_entropy(logits, target), logits) with logits = F.linear(hidden, weight, bias).

    For an LM head whose logits are returned as well as fed to the loss: one chunked matmul
    pass writes the logits and forms the loss gradient, instead of F.linear plus a separate
    linear_cross_entropy (two forward matmuls over the vocabulary). hidden (..., H); target has
    one entry per row of hidden (any shape with that many elements); logits come back shaped
    (..., V). reduction 'mean' or 'sum' (others: the composed form). Same loss semantics as
    linear_cross_entropy; gradients flow from both outputs.
    """
    T = torch.Tensor
    one_pass = (
        _tensors_ok(hidden, weight, target, bias) and torch.is_grad_enabled()
        and reduction in ("mean", "sum") and type(ignore_index) is int
        and target.numel() == hidden.numel() // max(hidden.shape[-1], 1) and target.numel() > 0
    )  # fmt: skip
    if not one_pass:  # the composed form: checks every argument, runs without grad, odd reductions
        logits = torch.nn.functional.linear(hidden, weight, bias)
        h2 = hidden.reshape(-1, hidden.shape[-1]) if isinstance(hidden, T) and hidden.dim() != 2 else hidden
        t1 = target.reshape(-1) if isinstance(target, T) else target
        return linear_cross_entropy(h2, weight, t1, bias, ignore_index, reduction), logits
    check_targets("linear_cross_entropy_with_logits", target, weight.shape[0], ignore_index)
    if eager_fast_path(hidden) and _plain_weight(weight) and (bias is None or type(bias) in _PLAIN):
        return _linear_cross_entropy_logits_fn(hidden, weight, target, bias, (ignore_index, reduction))
    # traced (AOTAutograd: fake/functional tensors) or a tensor subclass: the same pass as a custom op
    need_db = bias is not None and bias.requires_grad
    loss, logits, _, _, _ = _lce_logits_fwd_op(hidden, weight, target, bias, ignore_index, reduction,
                                               hidden.requires_grad, weight.requires_grad, need_db)
    return loss, logits
