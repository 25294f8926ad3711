"""dropout(x, p, training=True): Philox-seeded, the mask is never stored (Triton's low-memory dropout).

Mask. Element i (its row-major index in x's shape, int64) is kept when
    keep_i = rand(seed, i) >= p          (rand: Philox 4x32-10, uniform in [0, 1))
so P(keep) = 1 - p, p = 0 keeps everything and p = 1 drops everything. Kept values are scaled by
1 / (1 - p) (computed in fp32, cast back once, as torch does); dropped values are exactly 0.
The mask depends only on (seed, i), never on memory layout or block size, so the backward
regenerates it from the seed: dx = keep * dy / (1 - p), whatever the strides of dy (stride 0 too).

Seed. Drawn from torch's default CPU generator (so `torch.manual_seed` governs it) as a 0-d int64
CPU *tensor* rather than a Python int: under tracing (Dynamo, AOTAutograd) a tensor stays a graph
value drawn fresh each step, whereas an int would be baked into the graph as a constant and every
step would drop the same units. The launcher reads it on the CPU (no device sync).
"""

from __future__ import annotations

import functools
import numbers

import torch
import triton
import triton.language as tl

from tritonize.kernels._launch import fast_launch

from ._common import FLOAT_DTYPES, INTERPRET, check_arg, check_tensor, eager_fast_path, fast_apply, use_triton
from ._norm_common import cdiv, device_ctx, next_pow2

# Elements per program. The interpreter runs programs one after another (numpy underneath), so
# there fewer, larger tiles are much faster.
TILE = 65536 if INTERPRET else 2048
SEED_HIGH = 2**31 - 1  # as _common.new_seed


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@fast_launch
@triton.jit
def _dropout_fwd_kernel(
    x_ptr,  # (R, N) strided (stride 0 allowed): input (or upstream gradient, in backward)
    y_ptr,  # (R, N) strided: output, same dtype as x
    seed,  # Philox key
    p,  # drop probability
    scale,  # 1 / (1 - p), or 0 when p == 1
    R,
    N,  # (R, N) is a row-major reshape of x's shape: element (r, c) has index r * N + c
    sxr,
    sxc,
    syr,
    syc,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    pid_r = (pid // n_col_blocks).to(tl.int64)
    pid_c = (pid % n_col_blocks).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < R)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxr + cols[None, :] * sxc, mask=mask, other=0.0)
    # The mask is a function of (seed, row-major index) only; int64 offsets feed Philox's high
    # counter word, so tensors past 2**32 elements do not repeat the mask.
    offsets = rows[:, None] * N + cols[None, :]
    keep = tl.rand(seed, offsets) >= p
    y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + rows[:, None] * syr + cols[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=mask)


# The backward is the same map applied to dy: dx = keep(seed, i) * dy / (1 - p).
_dropout_bwd_kernel = _dropout_fwd_kernel


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _merge_dims(x):
    """(R, N, sr, sc): x as a row-major (R, N) reshape with strides, or None if no such view.

    Adjacent dims merge when stride[i] == stride[i+1] * size[i+1]; size-1 dims drop out. A
    contiguous (or stride-0 expanded) tensor becomes one dim: (1, numel).
    """
    merged = []
    for size, stride in zip(x.shape, x.stride()):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        return None
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (r, sr), (n, sc) = merged
    return r, n, sr, sc


@functools.lru_cache(maxsize=1024)
def _launch_config(rows_p2: int, n: int):
    block_n = min(triton.next_power_of_2(max(n, 1)), TILE)
    block_r = min(max(TILE // block_n, 1), rows_p2)
    return block_r, block_n, 4


def _scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_forward(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """y = keep(seed) * x / (1 - p), contiguous, x's dtype. Also the backward (on dy)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    # contiguous: one row of numel elements, without _merge_dims' per-dim loop (hot path)
    md = (1, x.numel(), 0, 1) if x.is_contiguous() else _merge_dims(x)
    if md is None:
        # Dims that no (R, N) view can express (e.g. a permuted 3-D slice): one explicit copy.
        x = x.contiguous()
        md = _merge_dims(x)
    r, n, sxr, sxc = md
    # y is contiguous: (r, n) strides are (n, 1).
    block_r, block_n, warps = _launch_config(next_pow2(r), n)
    grid = (cdiv(r, block_r) * cdiv(n, block_n),)
    with device_ctx(x):
        _dropout_fwd_kernel[grid](
            x, y, seed, p, _scale(p), r, n, sxr, sxc, n, 1,
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
    return y


def dropout_backward(dy: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dx = keep(seed) * dy / (1 - p): the forward's map regenerated from the seed."""
    return dropout_forward(dy, p, seed)


# ---------------------------------------------------------------------------------------------
# Custom ops + autograd
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tritonize::dropout_fwd", mutates_args=())
def _dropout_fwd_op(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return dropout_forward(x, p, int(seed))  # seed is a CPU tensor: no device sync
    return dropout_reference(x, p, int(seed), upcast=True)


@_dropout_fwd_op.register_fake
def _(x, p, seed):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("tritonize::dropout_bwd", mutates_args=())
def _dropout_bwd_op(dy: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    if use_triton(dy):
        return dropout_backward(dy, p, int(seed))
    return dropout_reference(dy, p, int(seed), upcast=True)


@_dropout_bwd_op.register_fake
def _(dy, p, seed):
    return torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)


def _setup_context(ctx, inputs, output):
    _, ctx.p, seed = inputs
    ctx.save_for_backward(seed)


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return _dropout_bwd_op(dy, ctx.p, seed), None, None


_dropout_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _DropoutFn(torch.autograd.Function):
    """Eager fast path (see `_common.eager_fast_path`): the launchers without the custom-op
    dispatch layers; the seed is a plain int here (nothing traces this path)."""

    @staticmethod
    def forward(ctx, x, p, seed):
        # the launchers directly: the public function has checked that Triton runs on x
        ctx.p, ctx.seed = p, seed
        return dropout_forward(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        return dropout_backward(dy, ctx.p, ctx.seed), None, None


# the C autograd apply without torch's Python layer (see _common.fast_apply)
_dropout_fn = fast_apply(_DropoutFn)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def dropout_keep_reference(shape, p: float, seed: int) -> torch.Tensor:
    """The reference path's mask: uniform [0, 1) from a CPU generator seeded with `seed`.

    Deterministic in (shape, seed), so the reference backward regenerates the forward mask; it
    is not the Triton kernel's Philox stream (tests compare statistics, not masks, across paths).
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=g) >= p


def dropout_reference(x: torch.Tensor, p: float, seed: int, upcast: bool = True) -> torch.Tensor:
    keep = dropout_keep_reference(x.shape, p, seed).to(x.device)
    xc = x.float() if upcast else x
    return torch.where(keep, xc * _scale(p), torch.zeros((), dtype=xc.dtype, device=x.device)).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, *, seed=None) -> torch.Tensor:
    """Dropout with a Philox mask regenerated in backward (no mask tensor is kept).

    p == 0 or training=False returns `x` itself (as torch does); p == 1 gives zeros and zero
    gradients. `seed` fixes the mask: an int, or a 0-d int64 CPU tensor (what a captured graph
    passes, so the seed stays a graph value under tracing and is read on the CPU, without a device
    sync, when run). By default it is drawn from torch's default generator, so
    `torch.manual_seed` makes runs reproducible.
    """
    # fast path for the common (valid) call: no message is formatted unless a check fails
    if not (isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES and type(p) is float and 0.0 <= p <= 1.0):
        check_tensor("dropout", "x", x)
        if not isinstance(p, numbers.Real) or isinstance(p, bool):
            raise TypeError(f"tritonize.dropout: argument 'p' must be a float, got {type(p).__name__}")
        check_arg("dropout", "p", 0.0 <= p <= 1.0, f"must be in [0, 1], got {p}")
    seed_is_tensor = isinstance(seed, torch.Tensor)
    if seed_is_tensor:
        check_arg("dropout", "seed", seed.dim() == 0 and seed.dtype == torch.int64 and seed.device.type == "cpu",
                  f"as a tensor must be 0-d int64 on the CPU, got {tuple(seed.shape)} {seed.dtype} on {seed.device}")
    elif seed is not None:
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"tritonize.dropout: argument 'seed' must be an int or a 0-d int64 CPU tensor, "
                            f"got {type(seed).__name__}")
        check_arg("dropout", "seed", 0 <= seed < 2**63, f"must be in [0, 2**63), got {seed}")
    if not training or p == 0.0:
        return x
    if eager_fast_path(x):
        # the same draw from the default generator as below (torch.manual_seed governs both)
        seed_i = int(torch.randint(0, SEED_HIGH, (), dtype=torch.int64)) if seed is None else int(seed)
        return _dropout_fn(x, float(p), seed_i)
    if seed is None:
        # new_seed() without its .item(): the same draw from the default generator, kept a tensor.
        seed_t = torch.randint(0, SEED_HIGH, (), dtype=torch.int64)
    else:
        seed_t = seed if seed_is_tensor else torch.tensor(int(seed), dtype=torch.int64)
    return _dropout_fwd_op(x, float(p), seed_t)
