"""What every kernel file shares: where a kernel may run, argument checks, block-size choice.

Kept small on purpose: a kernel file should read top to bottom without chasing helpers.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

# Triton decides at decoration time whether `@triton.jit` builds GPU code or an interpreted
# function, so the flag is read once, at import, as Triton itself reads it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# TRITONIZE_AUTOTUNE=0 keeps only the first surviving config of each autotuned kernel. The GPU
# test suite sets it: tests check numerics over dozens of odd shapes, and tuning every one of
# them would compile every config for each (minutes); benchmarks and users keep tuning on.
AUTOTUNE = os.environ.get("TRITONIZE_AUTOTUNE", "1") != "0"


def tuning_candidates(configs: list) -> list:
    """What an `early_config_prune` hook returns: all kept configs, or the first when tuning is off."""
    return configs if AUTOTUNE else configs[:1]


def use_triton(t: torch.Tensor) -> bool:
    """True where the Triton kernel runs: CUDA tensors, or CPU tensors under the interpreter.

    Anything else (CPU without TRITON_INTERPRET=1, MPS, meta handled by register_fake) takes the
    op's plain-torch reference path, so a user's CPU tests keep working.
    """
    # is_cuda / is_cpu: flags read off the tensor; t.device builds a torch.device per call, which
    # on CPU cost 2-4 us per fwd+bwd of a small op (benchmarks/host_python_linear_act.py)
    return t.is_cuda or (INTERPRET and t.is_cpu)


def eager_fast_path(x: torch.Tensor) -> bool:
    """True for a plain eager call on a real tensor where the Triton kernel runs.

    Ops then go through a `torch.autograd.Function` that calls the launchers directly: the
    custom-op dispatch layers cost several times the Python time of a plain autograd.Function
    per forward+backward (~180 us vs ~45 us measured on CPU), which decides the speed of every
    row-wise op at realistic sizes. Under torch.compile / export, fake tensors, tensor
    subclasses and functorch transforms, the registered custom ops are used, so graphs still
    see one opaque op with a fake implementation and a registered autograd formula.
    """
    return (
        type(x) is torch.Tensor
        and use_triton(x)
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        # inside torch.func.grad the inputs are not seen as wrapped (checked: torch 2.13), and
        # an autograd.Function without setup_context raises there: the custom ops handle it
        and not torch._C._are_functorch_transforms_active()
    )


_FUNCTION_BASE_APPLY = torch._C._FunctionBase.__dict__["apply"]


def fast_apply(fn_cls):
    """`fn_cls.apply` minus the Python layer of `torch.autograd.Function.apply`, for the eager
    fast path (callers have checked `eager_fast_path` on the main input).

    That layer checks for a `setup_context` (ours have none), for active functorch transforms,
    and unwraps dead functorch wrappers with a generator over every argument: ~6 us per call on
    a CPU box, more on the GPU host. The C `apply` it ends in is called directly unless functorch
    transforms are active (then the full `apply`, which raises or handles them as usual). Pass
    few arguments (pack the non-tensor ones in a tuple): the C `apply` inspects each one.
    """
    assert not torch.autograd.function._is_setup_context_defined(fn_cls.setup_context)
    c_apply = _FUNCTION_BASE_APPLY.__get__(None, fn_cls)
    full_apply = fn_cls.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if transforms_active():
            return full_apply(*args)
        return c_apply(*args)

    return apply


# ---------------------------------------------------------------------------------------------
# Argument checks: a clear ValueError/TypeError naming the op and the argument, raised before any
# launch, never a crash deep inside Triton.
# ---------------------------------------------------------------------------------------------


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES, optional: bool = False):
    if t is None:
        if optional:
            return
        raise TypeError(f"tritonize.{op}: argument '{name}' is required, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tritonize.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"tritonize.{op}: argument '{name}' has dtype {t.dtype}; supported: {names}")


def check_same_device(op: str, **tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tritonize.{op}: all tensors must be on one device, got {desc}")


def check_arg(op: str, name: str, ok: bool, why: str):
    """`check_arg("layer_norm", "eps", eps > 0, f"must be > 0, got {eps}")`."""
    if not ok:
        raise ValueError(f"tritonize.{op}: argument '{name}' {why}")


# ---------------------------------------------------------------------------------------------
# Shapes and launch parameters
# ---------------------------------------------------------------------------------------------


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """View `x` (..., N) as (rows, N) with unit stride along N, copying only when no view exists.

    Kernels take the row stride, so row-strided inputs (slices, padded buffers) are read in place;
    only an input whose last dim is not unit-stride (e.g. a transposed view) is copied, because a
    strided inner dimension would make every load uncoalesced.
    """
    n = x.shape[-1]
    if x.dim() == 2 and x.stride(-1) == 1:
        return x  # already (rows, N): no view op (~2-3 us of host time each)
    if x.dim() > 2 and x.stride(-1) == 1:
        try:
            return x.view(-1, n)
        except RuntimeError:
            pass  # leading dims cannot be merged without a copy
    if x.dim() == 1 and x.stride(-1) == 1:
        return x.view(1, n)
    return x.reshape(-1, n).contiguous()


def row_launch_config(n_cols: int, max_block: int = 65536) -> tuple[int, int]:
    """Block size (power of two >= n_cols, capped) and warps for a one-row-per-program kernel.

    Deterministic (no autotune): the same row width always gets the same launch, so results are
    bit-reproducible across runs and nothing recompiles per sequence length.
    """
    block = min(triton.next_power_of_2(max(n_cols, 1)), max_block)
    if block <= 512:
        warps = 1 if block <= 128 else 2
    elif block <= 2048:
        warps = 4
    elif block <= 8192:
        warps = 8
    else:
        warps = 16
    return block, warps


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Number of streaming multiprocessors; used to size persistent grids and partial sums."""
    if not torch.cuda.is_available():
        return 4  # interpreter: a small grid keeps CPU tests fast
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    return num_sms(t.get_device()) if t.is_cuda else 4  # get_device: an int, no torch.device object


def new_seed() -> int:
    """A Philox seed drawn from torch's default CPU generator, so `torch.manual_seed` governs it."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())


def tl_dtype(dtype: torch.dtype):
    """The triton.language dtype for a torch float dtype (for casts inside kernels)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def linear_backward(g, hidden, weight, need_dh: bool, need_dw: bool, need_db: bool, db_dtype):
    """F.linear's backward for a gradient g (..., V) of logits = F.linear(hidden, weight, bias):
    fresh (dh | None, dW | None, db | None). db is summed in fp32 at least (fp64 stays fp64).
    Plain differentiable ops, so a double backward through them works. Any layout of g (a
    stride-0 gradient of `.sum()` included): reshape and mm take any strides. Only what a
    requested gradient reads is needed: dh reads weight, dW reads hidden (the other may be None)."""
    g2 = g.reshape(-1, g.shape[-1])
    dh = (g2 @ weight).view(*g.shape[:-1], weight.shape[1]) if need_dh else None
    dw = g2.t() @ hidden.reshape(-1, hidden.shape[-1]) if need_dw else None
    db = g2.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(db_dtype) if need_db else None
    return dh, dw, db

