"""Fused linear -> activation, and the gated MLP (SwiGLU / GeGLU), each with a custom backward.

    linear_act(x, weight, bias=None, activation="gelu")  = act(x @ weight^T + bias)
    gated_linear(x, w_gate, w_up, activation="silu")     = act(x @ w_gate^T) * (x @ w_up^T)
    gated_mlp(x, w_gate, w_up, w_down, activation="silu") = gated_linear(x, w_gate, w_up) @ w_down^T

gated_mlp saves x, G, U but not the product P = act(G) * U (the down projection's input, which a
separate linear would save for its weight gradient): its backward recomputes P in the element-wise
pass that forms dG and dU (one M x N store more), dW_down = dY^T P. Measured on the H100, Llama
12L d1024 ffn 3584 B4 T2048: 0.70 GB less peak memory per train step. Its time cost was not
isolated (the hosts of two runs differed by more); by traffic it is ~20 us per layer (58.7 MB
stored at ~3 TB/s), ~0.5% of that step.

x is (..., K) with any strides; weights are (N, K) as `nn.Linear` stores them and are read
transposed through their strides (never copied). Activations come from `_activations.ACTIVATIONS`.

Forward, four implementations (`FORWARD_IMPL`, default "auto", chosen per call by size):
  - fused Triton: one tiled GEMM (grouped program order, fp16/bf16 `tl.dot` into fp32
    accumulators) whose epilogue adds the bias and applies the activation in registers, so the
    pre-activation makes no round trip through memory; the gated kernel keeps two accumulators
    and reads each x tile once for both products. A TMA-descriptor variant ("tma") of the same
    kernel is kept as an option.
  - cuBLAS + element-wise: F.linear writes Z (G and U), one Triton pass applies the activation.
  "auto" takes cuBLAS from CUBLAS_FWD_MIN_WORK (M*N*K summed over products; 2^36 in session 1,
  2^30 since direct launches: see the constant) up, the fused kernel below it. Why (H100, bf16, M=8192, benchmarks/sweep_linear_act.py and bench_linear_act.py;
  numbers in docs/notes/linear_act.md): the round trip the fusion saves is 3-10% of the forward,
  but cuBLAS's main loop is 15-25% faster than this Triton GEMM on triton 3.6 (pointer loads,
  non-persistent, no warp specialisation): forward kernel times with Z / G, U stored, cuBLAS+ew vs
  best fused: GPT-2 0.098 vs 0.132 ms, Llama-1B 0.94 vs 1.08, Llama-8B 2.96 vs 3.60 (TMA variant:
  0.124 / 0.95 / 2.92). So large, compute-bound calls take cuBLAS (fwd+bwd Llama-1B 2.69 ms vs
  2.82 fused, Llama-8B 8.45 vs 9.46). Small calls are bound by host overhead instead (GPT-2 MLP at
  8192 tokens: ~0.3 ms of GPU work, 0.76 ms measured per fwd+bwd), where one fused launch beats
  F.linear + a second launch (0.76 vs 0.97 ms): they keep the fused forward, and with it the
  issue's "no round trip of the pre-activation". Honest summary: at the two Llama shapes the
  default forward DOES round-trip G and U through memory, because that is measurably faster.
  - persistent fused (session 10, "persistent", linear_act only): the same epilogue in a
    persistent kernel (TMA loads and stores, a flattened tile loop so the next tile's loads are
    in flight during the epilogue, device-built descriptors whose scratch comes from triton's
    allocator). GPT-2's MLP forward: 93.3 us against cuBLAS + pass 96.5 (cuBLAS's GEMM alone:
    60.8), and one launch instead of two. "auto" takes it for one product from
    CUBLAS_FWD_MIN_WORK to PERSISTENT_FWD_MAX_WORK when x and W suit TMA (fp16/bf16, 16-byte
    aligned rows), so at GPT-2's shape Z again makes no round trip. Sweeps:
    docs/results/linear_act.md, session 10.
  - cuBLASLt epilogue (session 11, "cublaslt", one gelu_tanh or relu product): cuBLASLt's GEMM
    with the bias + activation epilogue, GELU's writing Z as its aux output (kernels/_cublaslt.py,
    called through ctypes). GPT-2's forward 82.0-82.9 us against the persistent kernel's 92.7-93.3;
    the fastest forward at every shape measured (docs/results/linear_act.md, session 11), so
    "auto" takes it from CUBLAS_FWD_MIN_WORK up; where it cannot take the call (layout, library,
    no algorithm) the forward "auto" would otherwise choose runs. Z again makes no round trip.

GEMM algorithms (session 15): GEMMs of at least TUNED_MM_MIN_WORK (2^35 M*N*K: the gated
forward's x Wg^T / x Wu^T, the weight gradients, gated_mlp's down projection, not GPT-2-sized
ones) and the cuBLASLt epilogue run the algorithm timed once per problem among cuBLASLt's
heuristic candidates (_cublaslt.matmul / _tune) instead of the heuristic's first pick that
torch.mm runs. H100, bf16: x W^T 1.05-1.12x at every bench shape, dW at Llama-8B 1.08-1.12x
(per GEMM, interleaved rounds); gated_linear fwd+bwd 1.02x (Llama-8B) / 1.03x (Llama-1B) in one
process; docs/notes/linear_act.md. The fusion's own gain is the tritonize_torch_mm bench row.

Backward:  dZ = dY * act'(Z)                  (one Triton element-wise kernel, db fused in: the
                                               last program of each column strip adds the partials;
                                               its ticket counters are kept across calls on the
                                               default stream: _db_scratch)
           dX = dZ @ W,   dW = dZ^T @ X,   db = sum_rows dZ      (dX, dW on cuBLAS)
  gated:   dG = dY * U * act'(G),  dU = dY * act(G)          (one Triton element-wise kernel)
           dX = dG @ Wg + dU @ Wu (one GEMM + one accumulating GEMM), dWg = dG^T X, dWu = dU^T X

Save vs recompute (the issue asks to choose): we SAVE the pre-activation Z (gated: G and U).
  - Recomputing Z in backward costs a whole extra GEMM: 2MNK FLOPs on top of the 6MNK of
    fwd+bwd, i.e. +33% work (gated: +2 GEMMs, also +33%), on ops that are compute-bound. Saving
    costs one extra M*N store in forward (the epilogue writes Z next to Y: ~2-3% of the step at
    the benchmark shapes) and M*N of memory — which torch eager also holds (it saves Z for the
    activation's backward; for the gated form eager holds G, U and act(G): one tensor more).
  - The saved tensor is private to this op, so the backward writes dZ over it in place (the
    element-wise kernel reads Z and writes dZ at the same address; the custom op declares the
    mutation). So backward allocates no M*N tensor at all, and peak memory stays below eager,
    which holds Z and dZ at once.
  - For none/relu/sigmoid/tanh the derivative is a function of the output, so nothing extra
    is saved at all: Y (which the caller holds anyway) is used, as torch does.
  The recompute path is kept (`SAVE_PRE = False`, linear_act only) for the ablation in
  benchmarks/bench_linear_act.py. Measured on the H100 (GPT-2 MLP, bf16, 8192 tokens): saving
  0.764 ms and 116 MB peak per fwd+bwd, recomputing 0.857 ms and 228 MB (the recompute writes dZ
  to a fresh buffer): saving wins on both counts, so SAVE_PRE = True.

Eager fast path: a plain eager call on a real tensor goes through `torch.autograd.Function`s
(_LinearActFn, _GatedLinearFn) that run the same impls; the custom-op dispatch layers cost ~4x
the Python time of a plain autograd.Function per fwd+bwd (measured on CPU: ~180 us vs ~45 us),
which shows at small shapes. Under torch.compile / fake tensors / functorch the registered custom
ops are used, so graphs see one opaque op.

Backward host path (session 12): autograd runs a CUDA backward on its device thread, where our
Python ran ~2x slower than on the caller's thread (H100 hosts: tritonize's fwd+bwd 305-386 us of
host time under the usual multithreaded autograd, 226-247 single-threaded; eager 245-293 /
189-216; benchmarks/host_linear_act.py). So _LinearActFn's forward looks up a per-problem
_BwdPlan (on the caller's thread) and the backward's common case (contiguous, aligned dY) is one
bound launch (kernels/_launch.py BoundLaunch) and two torch.mm. GPT-2's fwd+bwd host time, in
processes alternating on one host: 1.05-1.20x eager's, against 1.34-1.61x for session 11's path.
What is left is in the forward (session 13, one process, interleaved): a bare autograd.Function
with these kernels issues a fwd+bwd in eager's host time, linear_act in 1.16x of it — ~10 points
in the public wrapper's checks and dispatch, ~6 in _LinearActFn.forward; the backward is as lean
as the bare one (docs/benchmarks.md, session 13). Session 14 measured that Python on a CPU with
the launches stubbed (benchmarks/host_python_linear_act.py): 11.7-13.0 us per fwd+bwd above the
bare Function before, 5.5-7.2 after the trims here (the C apply straight after eager_fast_path; a
one-weight check reading each attribute once; three saved tensors and the plan's flags in the
common backward; use_triton without building t.device, a CPU-only ~3.5 us); and on the H100 the
cuBLASLt epilogue's call 46.5 -> 40.7 us (one-key plan, pointer writes only on change).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonize.kernels import _cublaslt
from tritonize.kernels._launch import fast_launch

from triton.runtime import _allocation as _triton_allocation  # the persistent forward's scratch allocator

try:  # host-side TMA descriptors (triton >= 3.3); absent: the "tma" forward falls back to pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - old triton
    TensorDescriptor = None

from tritonize.kernels._activations import (
    ACTIVATIONS,
    GRAD_FROM_OUTPUT,
    activation_fwd,
    activation_grad,
    activation_grad_from_output,
    check_activation,
)
# cdiv / next_pow2: triton's without their constexpr_function wrapper (~4 us a call on the host);
# device_ctx: a torch.cuda.device context only when x is not on the current device (~10 us otherwise)
from tritonize.kernels._norm_common import cdiv, device_ctx, next_pow2
from tritonize.kernels._common import (
    _FUNCTION_BASE_APPLY, FLOAT_DTYPES, INTERPRET, check_arg, device_sms, eager_fast_path, fast_apply, tuning_candidates,
    check_same_device, check_tensor, use_triton,
)  # fmt: skip

# Design switches (read at every call, so the benchmark can flip them for its ablation). The
# defaults are chosen from H100 measurements: see the module docstring and docs/notes/linear_act.md.
SAVE_PRE = True  # save the pre-activation for backward (True) or recompute it there (False)
FORWARD_IMPL = os.environ.get("TRITONIZE_LINEAR_ACT_FWD", "auto")  # "auto" | "triton" | "tma" | "cublas" | "persistent" | "cublaslt"
# "auto": cuBLAS + element-wise epilogue from this much forward work (M*N*K per product, summed
# over the products) up, the fused Triton forward below it. Session 1 put the line at 2^36, above
# GPT-2's MLP at 8192 tokens (1.9e10), when a Triton launch cost 30-80 us of host time and one
# fused launch won. With direct launches (kernels/_launch.py) cuBLAS + the activation kernel was
# faster at every measured shape (H100, bench_linear_act fwd+bwd: GPT-2 0.459 vs 0.556 ms,
# Llama-1B 2.76 vs 2.92, Llama-8B 8.59 vs 9.55; GPT-2 train step 40.0 vs 45.0 ms in one run,
# a 12-layer Llama 54.3 vs 52.6 ms, within that host's noise). 2^30 keeps tiny GEMMs (decode,
# small models) on the single fused launch, which no measurement has ranked yet.
CUBLAS_FWD_MIN_WORK = 2**30
# Session 10: one product (linear_act) from CUBLAS_FWD_MIN_WORK up to this much work takes the
# persistent fused forward ("persistent": TMA loads and stores, the next tile's loads issued during
# the epilogue), when its inputs suit TMA. H100, GPT-2's MLP at 8192 tokens (1.9e10): 93.3 us
# against cuBLAS + the activation pass 96.5 (run 5), one launch instead of two; it is the only
# single-product shape measured, so larger calls stay on cuBLAS.
PERSISTENT_FWD_MAX_WORK = 2**35
# Session 11: gelu_tanh and relu (one product, from CUBLAS_FWD_MIN_WORK up) take cuBLASLt's GEMM
# with the bias + activation epilogue, which stores Z too (kernels/_cublaslt.py): GPT-2's MLP
# forward 82.3 us against 92.7 for the persistent kernel (H100). Where cuBLASLt cannot take the
# call (layout, library), the forward "auto" would otherwise choose runs.
CUBLASLT_ACTIVATIONS = ("gelu_tanh", "relu")
# Session 15: GEMMs of at least this much work (M*N*K) go through cuBLASLt with the algorithm timed
# once per problem (_cublaslt.matmul) instead of torch.mm, which runs the heuristic's first pick.
# H100, bf16 (benchmarks/probe_cublaslt_algos.py, 7 interleaved rounds, two runs): x W^T at
# Llama-8B 1.05-1.08x, Llama-1B 1.11-1.12x; dW = dG^T X at Llama-8B 1.08-1.12x; the others tie.
# Those are single calls; at the power limit (--sustained) only Llama-1B's x W^T gain holds (1.08x),
# and _cublaslt keeps the first pick unless another is 5% faster.
# The line keeps GPT-2's backward GEMMs (1.9e10, no gain measured) on torch.mm, whose host path is
# shorter: that shape is host-bound. Set TRITONIZE_CUBLASLT_TUNE=0 to keep torch's pick everywhere.
TUNED_MM_MIN_WORK = 2**35


def _mm(a, b):
    """a @ b (2-D): the tuned cuBLASLt GEMM for large problems where it takes them, else torch.mm."""
    if a.shape[0] * a.shape[1] * b.shape[1] >= TUNED_MM_MIN_WORK:
        c = _cublaslt.matmul(a, b)
        if c is not None:
            return c
    return torch.mm(a, b)


def _forward_impl(M: int, N: int, K: int, n_products: int, activation: str | None = None) -> str:
    if FORWARD_IMPL != "auto":
        return FORWARD_IMPL
    work = M * N * K * n_products
    if work < CUBLAS_FWD_MIN_WORK:
        return "triton"
    if n_products == 1 and activation in CUBLASLT_ACTIVATIONS:
        return "cublaslt"
    return "persistent" if n_products == 1 and work <= PERSISTENT_FWD_MAX_WORK else "cublas"


# ---------------------------------------------------------------------------------------------
# Autotune configs (module level). Hopper: 228 KB of shared memory per SM, wgmma wants
# BLOCK_M a multiple of 64 and 4-8 warps. Keyed on (M bucket, N, K): M is bucketed to a power
# of two so new sequence lengths reuse the tuned config instead of re-tuning.
# ---------------------------------------------------------------------------------------------

_SMEM_LIMIT = 227 * 1024


def _cfg(bm, bn, bk, stages, warps):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)


if INTERPRET:
    # The interpreter runs every program in numpy: one small config, no tuning. 16x32x16 makes
    # the test shapes (K=17, N=33) take several K steps and several column tiles, with tails.
    _LINEAR_CONFIGS = [_cfg(16, 32, 16, 1, 4)]
    _GATED_CONFIGS = [_cfg(16, 32, 16, 1, 4)]
else:
    # Pruned after the H100 sweep (benchmarks/sweep_linear_act.py, bf16, GPT-2 MLP 8192x768->3072,
    # gelu_tanh, Z stored): 128x128x64 s4 w8 0.132 ms, 128x128x128 s3 w8 0.139, 128x256x64 s3 w8
    # 0.145; 256x128 tiles (0.164-0.167) and 4-warp 128x128 tiles (0.156) were dropped. The first
    # entry is what TRITONIZE_AUTOTUNE=0 (the GPU tests) runs: kept as the one the tests passed with.
    # 128x64 is the fp32 fallback (the bigger fp32 tiles exceed shared memory), 64-row tiles serve
    # small M.
    _LINEAR_CONFIGS = [
        _cfg(bm, bn, bk, s, w)
        for (bm, bn, bk, s, w) in [
            (128, 256, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 128, 128, 3, 8),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
        ]
    ]
    # The gated tile holds two BLOCK_N-wide accumulators (gate and up): 128x128 here is a
    # 128x256 tile's worth of registers and shared memory. H100 sweep (bf16, SwiGLU, G and U
    # stored; Llama-1B 2048->8192 / Llama-8B 4096->14336): 128x128x64 w8 s3/s4 1.09 / 3.60 ms
    # (best); 128x64 w4 1.19 / 3.87; 64x128 w4 1.25 / 4.00; dropped: 64x256 s3 (1.32 / 4.26; s4
    # exceeds shared memory), 128x128x64 w4 (3.97 / 12.7: register spills), 128x64 w8; 64x256 s3
    # stays: it is the first small-M survivor, the config the GPU tests passed with at small M.
    _GATED_CONFIGS = [
        _cfg(bm, bn, bk, s, w)
        for (bm, bn, bk, s, w) in [
            (128, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (64, 256, 64, 3, 8),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
        ]
    ]


def _tma_block_hook(nargs):
    # TMA descriptors carry their box (block) shape: set it from the config being launched.
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    for name in ("w_desc", "wg_desc", "wu_desc"):
        if name in nargs:
            nargs[name].block_shape = [bn, bk]


def _tma_cfg(bm, bn, bk, stages, warps):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps,
        pre_hook=_tma_block_hook,
    )  # fmt: skip


if INTERPRET:
    _LINEAR_TMA_CONFIGS = [_tma_cfg(16, 32, 16, 1, 4)]
    _GATED_TMA_CONFIGS = [_tma_cfg(16, 32, 16, 1, 4)]
else:
    # H100 sweep, Z / G, U stored: GPT-2 128x128x64 s4 w8 0.124 ms, 128x256x64 s4 w8 0.128;
    # Llama-1B / 8B gated 128x128x64 s4 w8 0.952 / 2.92 ms, s3 0.975 / 3.20, 128x64 w4 1.09 / 3.52.
    _LINEAR_TMA_CONFIGS = [
        _tma_cfg(*c) for c in [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 4, 8), (64, 128, 64, 4, 4)]
    ]
    _GATED_TMA_CONFIGS = [
        _tma_cfg(*c) for c in [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (64, 256, 64, 3, 8), (128, 64, 64, 4, 4)]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit shared memory for this dtype, or are oversized for tiny M."""
    x = named_args["x_ptr"] if "x_ptr" in named_args else named_args["x_desc"].base
    elsize = x.element_size()
    n_b = 2 if ("wu_ptr" in named_args or "wu_desc" in named_args) else 1  # gated: two weight tiles per K step
    small_m = named_args["M_BUCKET"] <= 64
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (bm * bk + n_b * bk * bn) * elsize * c.num_stages > _SMEM_LIMIT:
            continue
        if small_m and bm > 64:
            continue
        if elsize == 4 and bm * bn * n_b > 128 * 128:  # fp32 tiles: registers, not smem, bind
            continue
        kept.append(c)
    return tuning_candidates(kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])])


def _m_bucket(m: int) -> int:
    return min(max(next_pow2(m), 64), 8192)


# ---------------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ("swizzled") order: GROUP_M row-tiles walk the columns together, so a band of W
    # stays in L2 while GROUP_M tiles of x reuse it.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _tile_offsets(tile, num_pid_m, in_group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # _tile_ids's grouped order for a persistent kernel's tile index: (row, column) offsets of
    # `tile`; in_group = GROUP_M * (column tiles)
    first_m = (tile // in_group) * GROUP_M
    rows = min(num_pid_m - first_m, GROUP_M)
    return (first_m + tile % rows) * BLOCK_M, ((tile % in_group) // rows) * BLOCK_N


@fast_launch
@triton.autotune(
    configs=_LINEAR_CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _linear_act_fwd_kernel(
    x_ptr,  # (M, K) any strides
    w_ptr,  # (N, K) any strides; read as W^T tiles
    b_ptr,  # (N,) bias (HAS_BIAS)
    y_ptr,  # (M, N) out: act(Z), or dZ = dY * act'(Z) when GRAD_OUT
    pre_ptr,  # (M, N) out: Z = x W^T + b, same strides as y (STORE_PRE)
    dy_ptr,  # (M, N) upstream gradient, any strides (GRAD_OUT: the recompute backward)
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    stride_dym,
    stride_dyn,
    stride_b,  # the bias's element stride (a strided or expanded bias is read as it is)
    M_BUCKET,  # autotune key only
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    GRAD_OUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Loads wrap out-of-range rows/cols onto valid ones (no mask in the main loop); the
    # epilogue masks the stores, so the wrapped values are never written.
    rm_ld = (rm % M).to(tl.int64)
    rn_ld = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn_ld[None, :] * stride_wn + rk[:, None] * stride_wk  # (BLOCK_K, BLOCK_N) of W^T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue, in fp32 registers: Z = acc + b; Y = act(Z).
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn * stride_b, mask=rn < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)
    out_offs = rm64[:, None] * stride_ym + rn[None, :] * stride_yn
    if GRAD_OUT:
        # recompute backward: dZ = dY * act'(Z), Z never stored
        dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=mask, other=0.0)
        dz = dy.to(tl.float32) * activation_grad(acc, ACTIVATION)
        tl.store(y_ptr + out_offs, dz.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if STORE_PRE:
            tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        y = activation_fwd(acc, ACTIVATION)
        tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.autotune(
    configs=_GATED_CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _gated_linear_fwd_kernel(
    x_ptr,  # (M, K) any strides
    wg_ptr,  # (N, K) gate weight, any strides
    wu_ptr,  # (N, K) up weight, any strides
    out_ptr,  # (M, N) out: act(G) * U
    g_ptr,  # (M, N) out: G = x Wg^T (STORE_GU), same strides as out
    u_ptr,  # (M, N) out: U = x Wu^T (STORE_GU), same strides as out
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wgn,
    stride_wgk,
    stride_wun,
    stride_wuk,
    stride_om,
    stride_on,
    M_BUCKET,  # autotune key only
    ACTIVATION: tl.constexpr,
    STORE_GU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_ld = (rm % M).to(tl.int64)
    rn_ld = (rn % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :] * stride_xk
    wg_ptrs = wg_ptr + rn_ld[None, :] * stride_wgn + rk[:, None] * stride_wgk
    wu_ptrs = wu_ptr + rn_ld[None, :] * stride_wun + rk[:, None] * stride_wuk

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # one x tile feeds both products: x is read once for G and U
        if EVEN_K:
            a = tl.load(x_ptrs)
            bg = tl.load(wg_ptrs)
            bu = tl.load(wu_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            bg = tl.load(wg_ptrs, mask=rk[:, None] < k_left, other=0.0)
            bu = tl.load(wu_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=INPUT_PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wu_ptrs += BLOCK_K * stride_wuk

    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_offs = rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    if STORE_GU:
        tl.store(g_ptr + out_offs, acc_g.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(u_ptr + out_offs, acc_u.to(u_ptr.dtype.element_ty), mask=mask)
    out = activation_fwd(acc_g, ACTIVATION) * acc_u
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.autotune(
    configs=_LINEAR_TMA_CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _linear_act_fwd_tma_kernel(
    x_desc,  # TMA descriptor of x (M, K), unit inner stride; box (BLOCK_M, BLOCK_K)
    w_desc,  # TMA descriptor of W (N, K), unit inner stride; box (BLOCK_N, BLOCK_K)
    b_ptr,  # (N,) bias (HAS_BIAS)
    y_ptr,  # (M, N) out: act(Z)
    pre_ptr,  # (M, N) out: Z = x W^T + b, same strides as y (STORE_PRE)
    M,
    N,
    K,
    stride_ym,
    stride_yn,
    stride_b,  # the bias's element stride
    M_BUCKET,  # autotune key only
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # FORWARD_IMPL="tma": the same GEMM + epilogue with x and W tiles fetched by the Hopper TMA
    # engine (asynchronous bulk copies into shared memory, out-of-range rows/cols/K zero-filled
    # by the hardware: no wrap, no masks, no address arithmetic in the main loop).
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, k * BLOCK_K])
        b = w_desc.load([off_n, k * BLOCK_K])  # (BLOCK_N, BLOCK_K): W's rows; the dot takes W^T
        acc = tl.dot(a, b.T, acc)

    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn * stride_b, mask=rn < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_offs = rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    if STORE_PRE:
        tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    y = activation_fwd(acc, ACTIVATION)
    tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _linear_act_fwd_persistent_kernel(
    x_ptr,  # (M, K), unit inner stride, row stride stride_xm (TMA: 16-byte aligned rows)
    w_ptr,  # (N, K), unit inner stride, row stride stride_wn
    b_ptr,  # (N,) bias (HAS_BIAS)
    y_ptr,  # (M, N) contiguous out: act(Z)
    pre_ptr,  # (M, N) contiguous out: Z = x W^T + b (STORE_PRE)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_b,  # the bias's element stride
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGS: tl.constexpr,
):
    # FORWARD_IMPL="persistent": NUM_PROGS programs walk the tiles (grouped order, stride
    # NUM_PROGS). `flatten=True` fuses the tile loop and the K loop into one software pipeline,
    # so the next tile's x / W loads are in flight while this tile's epilogue runs; the epilogue
    # stores Z and act(Z) through TMA in two half-width subtiles (half the shared memory, and the
    # activation of one half overlaps the store of the other). Descriptors are built on the
    # device (their scratch comes from triton's allocator: _ensure_triton_allocator).
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    HALF: tl.constexpr = BLOCK_N // 2
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, HALF])
    z_desc = tl.make_tensor_descriptor(pre_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, HALF])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    in_group = GROUP_M * num_pid_n
    k_steps = tl.cdiv(K, BLOCK_K)
    tile_e = tl.program_id(0) - NUM_PROGS  # the epilogue's tile, tracked apart from the loads'
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=True):
        off_m, off_n = _tile_offsets(tile, num_pid_m, in_group, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_steps):
            a = x_desc.load([off_m, k * BLOCK_K])
            b = w_desc.load([off_n, k * BLOCK_K])  # (BLOCK_N, BLOCK_K): W's rows; the dot takes W^T
            acc = tl.dot(a, b.T, acc)
        tile_e += NUM_PROGS
        off_m, off_n = _tile_offsets(tile_e, num_pid_m, in_group, BLOCK_M, BLOCK_N, GROUP_M)
        # (BLOCK_M, BLOCK_N) -> two (BLOCK_M, HALF) halves: columns [0, HALF) and [HALF, BLOCK_N)
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        if HAS_BIAS:
            rn = off_n + tl.arange(0, HALF)
            lo = lo + tl.load(b_ptr + rn * stride_b, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            hi = hi + tl.load(b_ptr + (rn + HALF) * stride_b, mask=rn + HALF < N, other=0.0).to(tl.float32)[None, :]
        if STORE_PRE:
            z_desc.store([off_m, off_n], lo.to(pre_ptr.dtype.element_ty))
        y_desc.store([off_m, off_n], activation_fwd(lo, ACTIVATION).to(y_ptr.dtype.element_ty))
        if STORE_PRE:
            z_desc.store([off_m, off_n + HALF], hi.to(pre_ptr.dtype.element_ty))
        y_desc.store([off_m, off_n + HALF], activation_fwd(hi, ACTIVATION).to(y_ptr.dtype.element_ty))


@fast_launch
@triton.autotune(
    configs=_GATED_TMA_CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _gated_linear_fwd_tma_kernel(
    x_desc,  # TMA descriptor of x (M, K), unit inner stride; box (BLOCK_M, BLOCK_K)
    wg_desc,  # TMA descriptor of the gate weight (N, K); box (BLOCK_N, BLOCK_K)
    wu_desc,  # TMA descriptor of the up weight (N, K); box (BLOCK_N, BLOCK_K)
    out_ptr,  # (M, N) out: act(G) * U
    g_ptr,  # (M, N) out: G (STORE_GU), same strides as out
    u_ptr,  # (M, N) out: U (STORE_GU), same strides as out
    M,
    N,
    K,
    stride_om,
    stride_on,
    M_BUCKET,  # autotune key only
    ACTIVATION: tl.constexpr,
    STORE_GU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, k * BLOCK_K])  # one x tile feeds both products
        bg = wg_desc.load([off_n, k * BLOCK_K])
        bu = wu_desc.load([off_n, k * BLOCK_K])
        acc_g = tl.dot(a, bg.T, acc_g)
        acc_u = tl.dot(a, bu.T, acc_u)

    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_offs = rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    if STORE_GU:
        tl.store(g_ptr + out_offs, acc_g.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(u_ptr + out_offs, acc_u.to(u_ptr.dtype.element_ty), mask=mask)
    out = activation_fwd(acc_g, ACTIVATION) * acc_u
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _act_fwd_kernel(
    a_ptr,  # (n,) contiguous: Z (or G when GATED)
    b_ptr,  # (n,) contiguous: U (GATED)
    out_ptr,  # (n,) contiguous: act(Z), or act(G) * U
    n,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Epilogue as its own pass: the cuBLAS-forward alternative (FORWARD_IMPL="cublas").
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = activation_fwd(z, ACTIVATION)
    if GATED:
        y = y * tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _linear_act_bwd_kernel(
    dy_ptr,  # (M, N) upstream gradient, any strides (stride 0 included)
    s_ptr,  # (M, N) saved: Z (pre-activation) or Y (GRAD_FROM_OUT); row stride stride_sm, unit col
    dz_ptr,  # (M, N) out: dZ = dY * act'(Z); may be s_ptr itself (in place), same strides as s
    db_ptr,  # (N,) out (HAS_BIAS): db = column sums of dZ, in dZ's dtype
    dbp_ptr,  # (G * N,) fp32 scratch (HAS_BIAS): per-program column sums (G = the grid's 2nd dim)
    cnt_ptr,  # (cdiv(N, BLOCK_N),) int32 (HAS_BIAS): a ticket counter per column strip, zero on entry;
    # the strip's finishing program sets it back to zero, so a buffer kept across calls needs no memset
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_sm,
    ACTIVATION: tl.constexpr,
    GRAD_FROM_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RED_ROWS: tl.constexpr,  # partial rows of db the finishing program adds per step
):
    # grid = (cdiv(N, BLOCK_N), G): program (c, g) owns columns [c*BLOCK_N, ...) and the row
    # blocks g, g + G, ... It adds its dZ tiles into an fp32 register accumulator and reduces it
    # over rows once, at the end: one partial row of db per program; the strip's last program
    # to finish adds the G partial rows (below). A per-tile column sum with one partial row per
    # row block cost 13-90 us on top of the 57 us element-wise pass at 8192x3072 on the H100
    # (cross-warp reductions per tile, and up to 12 MB of partials read back).
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    G = tl.num_programs(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(pid_g * BLOCK_M, M, G * BLOCK_M):
        rm = r0 + tl.arange(0, BLOCK_M)
        mask = (rm < M)[:, None] & col_ok[None, :]
        rm64 = rm.to(tl.int64)
        dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=mask, other=0.0)
        s_offs = rm64[:, None] * stride_sm + rn[None, :]
        s = tl.load(s_ptr + s_offs, mask=mask, other=0.0).to(tl.float32)
        if GRAD_FROM_OUT:
            dz = dy.to(tl.float32) * activation_grad_from_output(s, ACTIVATION)
        else:
            dz = dy.to(tl.float32) * activation_grad(s, ACTIVATION)
        tl.store(dz_ptr + s_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc += tl.where(mask, dz, 0.0)
    if HAS_BIAS:
        # db = sum over rows of dZ (of the fp32 values, before dZ's rounding to its dtype)
        tl.store(dbp_ptr + pid_g.to(tl.int64) * N + rn, tl.sum(acc, axis=0), mask=col_ok)
        # Finish db here instead of a torch.sum + cast after (two launches, ~25 us of host time
        # on the H100 host, 6 us of GPU time): the strip's programs take tickets; the atomic is
        # acq_rel, so the one holding the last ticket sees every partial row stored before the
        # others' tickets. It adds them in a fixed order (reruns are bit-identical) and writes db.
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1)
        if ticket == G - 1:
            # every other program of the strip has taken its ticket: no one else touches this
            # counter again in this launch, and the next launch (stream-ordered) finds it zero
            tl.store(cnt_ptr + pid_n, 0)
            # RED_ROWS partial rows per load (one row per load would be G dependent round trips
            # at the kernel's tail): a fixed tree per config, so still bit-identical on reruns
            db = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for g0 in range(0, G, RED_ROWS):
                g = g0 + tl.arange(0, RED_ROWS)
                part = tl.load(dbp_ptr + g.to(tl.int64)[:, None] * N + rn[None, :],
                               mask=(g < G)[:, None] & col_ok[None, :], other=0.0, cache_modifier=".cg")
                db += tl.sum(part, axis=0)
            tl.store(db_ptr + rn, db.to(db_ptr.dtype.element_ty), mask=col_ok)


@fast_launch
@triton.jit
def _gated_linear_bwd_kernel(
    dy_ptr,  # (M, N) upstream gradient, any strides (stride 0 included)
    g_ptr,  # (M, N) saved G, row stride stride_sm, unit col; dG written here (in place)
    u_ptr,  # (M, N) saved U, same strides as G; dU written here (in place)
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_sm,
    ACTIVATION: tl.constexpr,
    P_INTO_DY: tl.constexpr,  # gated_mlp: write P = act(G) * U over dY (a buffer the caller owns)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # out = act(G) * U   =>   dG = dY * U * act'(G),   dU = dY * act(G)
    # gated_mlp does not save out (= P, the down projection's input): P is recomputed here from
    # the G, U this kernel reads anyway, for dW_down = dY_down^T @ P (one M x N store more)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)
    dy = tl.load(dy_ptr + rm64[:, None] * stride_dym + rn[None, :] * stride_dyn, mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    offs = rm64[:, None] * stride_sm + rn[None, :]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = activation_fwd(g, ACTIVATION)
    dg = dy * u * activation_grad(g, ACTIVATION)
    du = dy * a
    tl.store(g_ptr + offs, dg.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + offs, du.to(u_ptr.dtype.element_ty), mask=mask)
    if P_INTO_DY:
        p = a * u
        tl.store(dy_ptr + rm64[:, None] * stride_dym + rn[None, :] * stride_dyn, p.to(dy_ptr.dtype.element_ty),
                 mask=mask)


# ---------------------------------------------------------------------------------------------
# 2. Launchers (no autograd): 2-D x (M, K) with any strides, weights (N, K)
# ---------------------------------------------------------------------------------------------

_EW_BLOCK_M, _EW_BLOCK_N, _EW_WARPS = 32, 256, 8  # element-wise backward tiles: 8192 elements
# linear_act's element-wise backward (dZ, and db's partials with a bias): (BLOCK_M, BLOCK_N,
# warps, programs per SM) of its column-strip grid, without and with a bias. H100, 8192x3072 bf16
# gelu_tanh (queued GPU time): no bias 56.4 us with (32, 128, 4, 8) (57.2 at (32, 256, 8, 4), 71
# at 2 programs per SM); bias, db finished in the kernel (session 10): 60.0 us with (32, 128, 4, 4),
# 62.6 at (32, 128, 4, 8) and (64, 128, 8, 4), 66 at (32, 256, 8, 2), 94 at (16, 256, 4, 8) (its
# finishing programs add 1.5x more partial rows); session 9, with a torch.sum after: 69.0 + 6.4.
_EW_BWD = {False: (32, 128, 4, 8), True: (32, 128, 4, 4)}
_EW_RED_ROWS = 16  # db's partial rows added per load by the strip's finishing program

def _ew_bwd_grid(x2, M: int, N: int, cfg) -> tuple[int, int]:
    """(column strips, row groups) of the element-wise backward's grid for tiles cfg = _EW_BWD[...]:
    ~per_sm programs per SM over all column strips, never more row groups than row blocks."""
    bm, bn, _, per_sm = cfg
    col_blocks = cdiv(N, bn)
    return col_blocks, max(1, min(cdiv(M, bm), cdiv(device_sms(x2) * per_sm, col_blocks)))


_raw_stream = _cublaslt._raw_stream  # the current stream as an int; None on CPU-only builds
_DB_SCRATCH: dict = {}  # device index -> (fp32 partial sums, int32 ticket counters, all zero)


def _db_scratch(x2, n_partial: int, n_counters: int):
    """(partials, counters) for the element-wise backward's db: fp32 scratch (every element written
    before it is read) and int32 ticket counters, zero on entry (the kernel leaves them zero).

    On the legacy default stream (and on CPU, the interpreter) one pair per device is kept across
    calls: launches there are serialized, so the counters a launch left at zero are the next one's,
    and no memset is needed (H100, GPT-2's MLP: 3.5 us of GPU time and a launch less per backward).
    On any other stream, a fresh zeroed pair per call: calls on two streams may overlap, and a
    buffer first made on CUDA-graph trees' stream would sit in their private pool, whose checks
    reject allocations that outlive a recorded function."""
    dev = x2.get_device()
    if dev >= 0 and (_raw_stream is None or _raw_stream(dev) != 0):
        return (torch.empty((n_partial,), dtype=torch.float32, device=x2.device),
                torch.zeros((n_counters,), dtype=torch.int32, device=x2.device))
    have = _DB_SCRATCH.get(dev)
    if have is None or have[0].numel() < n_partial or have[1].numel() < n_counters:
        n_partial = max(n_partial, have[0].numel() if have else 0)
        n_counters = max(n_counters, have[1].numel() if have else 0)
        have = (torch.empty((n_partial,), dtype=torch.float32, device=x2.device),
                torch.zeros((n_counters,), dtype=torch.int32, device=x2.device))
        _DB_SCRATCH[dev] = have
    return have


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's matmul setting: TF32 tensor cores if allowed, else exact fp32 ("ieee").
    # For fp16/bf16 inputs the setting has no effect; "tf32" is Triton's default, i.e. the plain
    # tensor-core path every Triton matmul takes.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (rows, C) keeping strides (a view) where possible; kernels take both strides.

    A stride-0 (expanded) or row-padded tensor stays a view. Only when the leading dims cannot be
    merged into one stride (e.g. a permuted 3-D view) does this copy.
    """
    if t.dim() == 2:
        return t  # already (rows, C): no view op (~2-3 us of host time each)
    c = t.shape[-1]
    try:
        return t.view(-1, c)
    except RuntimeError:
        return t.reshape(-1, c)  # explicit copy: no single row stride exists


def _tma_ok(*ts: torch.Tensor) -> bool:
    """TMA descriptors need fp16/bf16 here (fp32 keeps the exact "ieee" pointer path), a unit
    inner stride, 16-byte aligned base and row stride."""
    if TensorDescriptor is None or ts[0].dtype not in (torch.float16, torch.bfloat16):
        return False
    es = ts[0].element_size()
    return all(t.stride(-1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0 for t in ts)


def _desc(t: torch.Tensor):
    # box shape [1, 1] is a placeholder: the config's pre_hook (_tma_block_hook) sets the real one
    return TensorDescriptor.from_tensor(t, [1, 1])


# The persistent forward's one config: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, stages, warps,
# programs per SM). H100 sweep, GPT-2's MLP (bf16, 8192x768->3072, Z stored; runs 4, 5, 11 of
# session 10, 156 configs): (128, 128, 64, 8, 3, 8, 2) best, 90.4 us with host-built descriptors,
# 93.3 with device-built ones; the next: 4 warps 93.0, 64x128 tiles 99.1, 128x256 tiles 100.6,
# one program per SM 107-122. The interpreter: small tiles, several tiles per program.
_PERSISTENT = (16, 32, 16, 2, 1, 4, 1) if INTERPRET else (128, 128, 64, 8, 3, 8, 2)


def _persistent_ok(x2, weight) -> bool:
    """TMA's rules for x, W and the (M, N) outputs: fp16/bf16 (fp32 keeps the exact pointer
    path), unit inner strides, 16-byte aligned bases and row strides."""
    if x2.dtype not in (torch.float16, torch.bfloat16) or x2.stride(1) != 1 or weight.stride(1) != 1:
        return False
    es = x2.element_size()
    return ((x2.stride(0) * es) % 16 == 0 and (weight.stride(0) * es) % 16 == 0 and (weight.shape[0] * es) % 16 == 0
            and x2.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def _scratch_alloc(size: int, alignment: int, stream):
    # torch's caching allocator, on the launch's stream (the current one): a temporary, freed
    # stream-ordered after the launch, so CUDA-graph capture keeps working
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_triton_allocator():
    """Device-built TMA descriptors need global scratch, which triton requests from its allocator
    at launch. Set ours where none is set (triton's default raises); a user's stays. Per call:
    triton keeps the allocator in a ContextVar, so each thread starts without one."""
    if isinstance(_triton_allocation._allocator.get(), _triton_allocation.NullAllocator):
        triton.set_allocator(_scratch_alloc)


def linear_act_forward(x2, weight, bias, activation: str, store_pre: bool):
    """(y, pre) for 2-D x; pre is None unless store_pre. y and pre are contiguous (M, N)."""
    M, K = x2.shape
    N = weight.shape[0]
    impl = _forward_impl(M, N, K, 1, activation)
    with device_ctx(x2):
        if impl == "cublaslt":
            out = _cublaslt.linear_act_epilogue(x2, weight, bias, activation, store_pre)
            if out is not None:
                return out
            # a layout, dtype or activation cuBLASLt's epilogue does not take (or no library)
            impl = "persistent" if M * N * K <= PERSISTENT_FWD_MAX_WORK else "cublas"
    y = x2.new_empty((M, N))  # new_empty: ~1-2 us less host time than torch.empty(device=, dtype=)
    sb = bias.stride(0) if bias is not None else 0
    if impl == "persistent" and not _persistent_ok(x2, weight):
        impl = "cublas"  # strides, alignment or dtype TMA cannot take
    with device_ctx(x2):
        if impl == "cublas":
            z = F.linear(x2, weight, bias)  # cuBLAS writes Z; a second pass applies act
            _launch_act_fwd(z, None, y, activation)
            return y, (z if store_pre else None)
        pre = x2.new_empty((M, N)) if store_pre else None
        if impl == "persistent":
            bm, bn, bk, gm, stages, warps, per_sm = _PERSISTENT
            progs = min(device_sms(x2) * per_sm, cdiv(M, bm) * cdiv(N, bn))
            if not INTERPRET:
                _ensure_triton_allocator()
            _linear_act_fwd_persistent_kernel[(progs,)](
                x2, weight, bias if bias is not None else y, y, pre if store_pre else y,
                M, N, K, x2.stride(0), weight.stride(0), sb,
                ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_PRE=store_pre,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, NUM_PROGS=progs,
                num_stages=stages, num_warps=warps,
            )  # fmt: skip
            return y, pre
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        if impl == "tma" and _tma_ok(x2, weight):
            _linear_act_fwd_tma_kernel[grid](
                _desc(x2), _desc(weight), bias if bias is not None else y, y, pre if store_pre else y,
                M, N, K, y.stride(0), y.stride(1), sb, _m_bucket(M),
                ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_PRE=store_pre,
            )  # fmt: skip
            return y, pre
        _linear_act_fwd_kernel[grid](
            x2, weight, bias if bias is not None else y, y, pre if store_pre else y, y,
            M, N, K,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1), 0, 0, sb,
            _m_bucket(M),
            ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_PRE=store_pre, GRAD_OUT=False,
            INPUT_PRECISION=_input_precision(x2.dtype),
        )  # fmt: skip
    return y, pre


def _launch_act_fwd(a, b, out, activation):
    n = out.numel()
    BLOCK = 4096
    _act_fwd_kernel[(cdiv(n, BLOCK),)](
        a, b if b is not None else a, out, n, ACTIVATION=activation, GATED=b is not None, BLOCK=BLOCK, num_warps=8
    )


def linear_act_recompute_dz(dy2, x2, weight, bias, activation: str):
    """dZ = dY * act'(x W^T + b) with Z recomputed by the forward GEMM (the SAVE_PRE=False path)."""
    M, K = x2.shape
    N = weight.shape[0]
    dz = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _linear_act_fwd_kernel[grid](
        x2, weight, bias if bias is not None else dz, dz, dz, dy2,
        M, N, K,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), dz.stride(0), dz.stride(1),
        dy2.stride(0), dy2.stride(1), bias.stride(0) if bias is not None else 0,
        _m_bucket(M),
        ACTIVATION=activation, HAS_BIAS=bias is not None, STORE_PRE=False, GRAD_OUT=True,
        INPUT_PRECISION=_input_precision(x2.dtype),
    )  # fmt: skip
    return dz


def linear_act_backward(dy2, x2, weight, bias, saved2, activation: str, need_dx: bool, need_dw: bool, need_db: bool):
    """(dx (M, K) | None, dw (N, K) | None, db (N,) | None) for 2-D inputs.

    saved2: Z (dZ is then written over it, in place), or Y for GRAD_FROM_OUTPUT activations,
    or None to recompute Z (SAVE_PRE=False ablation).
    """
    M, K = x2.shape
    N = weight.shape[0]
    db = None
    with device_ctx(x2):
        if activation == "none":
            dz = dy2  # identity: dZ = dY, no pass over memory at all
            if need_db:
                db = dy2.sum(0, dtype=torch.float32).to(dy2.dtype)
        elif saved2 is None:
            dz = linear_act_recompute_dz(dy2, x2, weight, bias, activation)
            if need_db:
                db = dz.sum(0, dtype=torch.float32).to(dz.dtype)
        else:
            from_out = GRAD_FROM_OUTPUT[activation]
            # Z is ours alone: overwrite it with dZ. Y belongs to the caller: new buffer.
            dz = torch.empty_like(saved2) if from_out else saved2
            cfg = _EW_BWD[need_db]
            bm, bn, warps, _ = cfg
            col_blocks, groups = _ew_bwd_grid(x2, M, N, cfg)
            if need_db:
                db = x2.new_empty((N,))
                dbp, cnt = _db_scratch(x2, groups * N, col_blocks)
            else:
                dbp = cnt = db = dz  # unused
            _linear_act_bwd_kernel[(col_blocks, groups)](
                dy2, saved2, dz, db, dbp, cnt, M, N, dy2.stride(0), dy2.stride(1), saved2.stride(0),
                ACTIVATION=activation, GRAD_FROM_OUT=from_out, HAS_BIAS=need_db,
                BLOCK_M=bm, BLOCK_N=bn, RED_ROWS=_EW_RED_ROWS, num_warps=warps,
            )  # fmt: skip
            if not need_db:
                db = None
        # dX and dW on cuBLAS (at the matmul ceiling; a Triton GEMM here would only tie it)
        dx = torch.mm(dz, weight) if need_dx else None
        dw = _mm(dz.t(), x2) if need_dw else None
    return dx, dw, db


def gated_linear_forward(x2, w_gate, w_up, activation: str, store_gu: bool = True):
    """(out, g, u) for 2-D x, all (M, N) contiguous; g, u are None unless store_gu."""
    M, K = x2.shape
    N = w_gate.shape[0]
    impl = _forward_impl(M, N, K, 2)
    with device_ctx(x2):
        if impl == "cublas":
            g = _mm(x2, w_gate.t())
            u = _mm(x2, w_up.t())
            out = torch.empty_like(g)
            _launch_act_fwd(g, u, out, activation)
            return out, (g if store_gu else None), (u if store_gu else None)
        out = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
        g = torch.empty_like(out) if store_gu else None
        u = torch.empty_like(out) if store_gu else None
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        if impl == "tma" and _tma_ok(x2, w_gate, w_up):
            _gated_linear_fwd_tma_kernel[grid](
                _desc(x2), _desc(w_gate), _desc(w_up), out, g if store_gu else out, u if store_gu else out,
                M, N, K, out.stride(0), out.stride(1), _m_bucket(M),
                ACTIVATION=activation, STORE_GU=store_gu,
            )  # fmt: skip
            return out, g, u
        _gated_linear_fwd_kernel[grid](
            x2, w_gate, w_up, out, g if store_gu else out, u if store_gu else out,
            M, N, K,
            x2.stride(0), x2.stride(1), w_gate.stride(0), w_gate.stride(1), w_up.stride(0), w_up.stride(1),
            out.stride(0), out.stride(1),
            _m_bucket(M),
            ACTIVATION=activation, STORE_GU=store_gu, INPUT_PRECISION=_input_precision(x2.dtype),
        )  # fmt: skip
    return out, g, u


def _gated_bwd_elementwise(dy2, g2, u2, activation: str, p_into_dy: bool):
    M, N = g2.shape
    _gated_linear_bwd_kernel[(cdiv(M, _EW_BLOCK_M), cdiv(N, _EW_BLOCK_N))](
        dy2, g2, u2, M, N, dy2.stride(0), dy2.stride(1), g2.stride(0),
        ACTIVATION=activation, P_INTO_DY=p_into_dy, BLOCK_M=_EW_BLOCK_M, BLOCK_N=_EW_BLOCK_N, num_warps=_EW_WARPS,
    )  # fmt: skip


def _gated_input_grads(dg, du, x2, w_gate, w_up, need_dx: bool, need_dw: bool):
    """dX = dG @ Wg + dU @ Wu, dWg = dG^T X, dWu = dU^T X (cuBLAS)."""
    dx = None
    if need_dx:
        dx = torch.mm(dg, w_gate)
        dx.addmm_(du, w_up)  # dX += dU @ Wu, accumulated by cuBLAS (beta=1), no temporary
    dwg = _mm(dg.t(), x2) if need_dw else None
    dwu = _mm(du.t(), x2) if need_dw else None
    return dx, dwg, dwu


def gated_linear_backward(dy2, x2, w_gate, w_up, g2, u2, activation: str, need_dx: bool, need_dw: bool):
    """(dx | None, dwg | None, dwu | None). Writes dG over g2 and dU over u2 (in place)."""
    with device_ctx(x2):
        _gated_bwd_elementwise(dy2, g2, u2, activation, False)
        return _gated_input_grads(g2, u2, x2, w_gate, w_up, need_dx, need_dw)


def gated_mlp_forward(x2, w_gate, w_up, w_down, activation: str, store_gu: bool = True):
    """(y, g, u) for 2-D x: y = (act(x Wg^T) * (x Wu^T)) Wd^T, (M, D) contiguous. The product P
    is freed here (not saved): gated_mlp_backward recomputes it from g, u."""
    p, g, u = gated_linear_forward(x2, w_gate, w_up, activation, store_gu)
    with device_ctx(x2):
        y = _mm(p, w_down.t())
    return y, g, u


def gated_mlp_backward(dy2, x2, w_gate, w_up, w_down, g2, u2, activation: str, need_dx: bool, need_dw: bool,
                       need_dwd: bool):
    """(dx | None, dwg | None, dwu | None, dwd | None). Writes dG over g2 and dU over u2.

        dP = dY Wd;  [dG, dU, P] from (dP, G, U) in one element-wise pass (P written over dP);
        dWd = dY^T P;  then dX, dWg, dWu as gated_linear."""
    with device_ctx(x2):
        dp = _mm(dy2, w_down)  # (M, N) contiguous and ours: P may overwrite it
        _gated_bwd_elementwise(dp, g2, u2, activation, need_dwd)
        dwd = _mm(dy2.t(), dp) if need_dwd else None
        return (*_gated_input_grads(g2, u2, x2, w_gate, w_up, need_dx, need_dw), dwd)


# ---------------------------------------------------------------------------------------------
# 3. Custom ops (opaque to Dynamo/AOTAutograd/Inductor) with register_fake and register_autograd
# ---------------------------------------------------------------------------------------------

_EMPTY = (0,)


def _linear_act_fwd_impl(x, weight, bias, activation: str, save_pre: bool):
    """(y, pre): pre is the saved pre-activation, or an empty tensor when nothing is saved."""
    N = weight.shape[0]
    out_shape = (*x.shape[:-1], N)
    store_pre = save_pre and not GRAD_FROM_OUTPUT[activation]
    if use_triton(x):
        y, pre = linear_act_forward(_as_2d(x), weight, bias, activation, store_pre)
        return y.view(out_shape), (pre.view(out_shape) if store_pre else x.new_empty(_EMPTY))
    pre = F.linear(x, weight, bias)
    y = ACTIVATIONS[activation].torch_fn(pre)
    if y is pre:  # "none": outputs may not alias each other
        y = pre.clone()
    return y, (pre if store_pre else x.new_empty(_EMPTY))


@torch.library.custom_op("tritonize::linear_act_fwd", mutates_args=())
def _linear_act_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str, save_pre: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_act_fwd_impl(x, weight, bias, activation, save_pre)


@_linear_act_fwd_op.register_fake
def _(x, weight, bias, activation, save_pre):
    out_shape = (*x.shape[:-1], weight.shape[0])
    store_pre = save_pre and not GRAD_FROM_OUTPUT[activation]
    return x.new_empty(out_shape), (x.new_empty(out_shape) if store_pre else x.new_empty(_EMPTY))


def _linear_act_bwd_triton(dy, x, weight, bias, pre, out, activation, need_dx, need_dw, need_db):
    """(dx | None, dw | None, db | None) by the launchers. pre: saved Z (overwritten with dZ), or
    None / empty to recompute it; out: Y for GRAD_FROM_OUTPUT activations."""
    if activation == "none":
        saved2 = None
    elif GRAD_FROM_OUTPUT[activation]:
        saved2 = _as_2d(out)
    else:
        saved2 = _as_2d(pre) if pre is not None and pre.numel() > 0 else None  # none: recompute (SAVE_PRE=False)
    dx, dw, db = linear_act_backward(_as_2d(dy), _as_2d(x), weight, bias, saved2, activation, need_dx, need_dw, need_db)
    if dx is not None and x.dim() != 2:
        dx = dx.view(x.shape)
    return dx, dw, db


def _linear_act_bwd_impl(dy, x, weight, bias, pre, out, activation: str, need_dx: bool, need_dw: bool, need_db: bool):
    """(dx, dw, db), each empty when not needed. `pre` (saved Z, or empty) is overwritten with dZ;
    `out` is Y for GRAD_FROM_OUTPUT activations (else empty)."""
    N, K = weight.shape
    from_out = GRAD_FROM_OUTPUT[activation]
    if use_triton(x):
        dx, dw, db = _linear_act_bwd_triton(dy, x, weight, bias, pre, out, activation, need_dx, need_dw, need_db)
        if dx is None:
            dx = x.new_empty(_EMPTY)
    else:
        # reference path: same math in plain torch (fp32 for the element-wise step)
        act = ACTIVATIONS[activation]
        if from_out:
            d = act.torch_grad_out(out.float()) if out.numel() > 0 else torch.ones((), device=dy.device)
        else:
            z = pre if pre.numel() > 0 else F.linear(x, weight, bias)
            d = act.torch_grad(z.float())
        dz = (dy.float() * d).to(x.dtype)
        dz2, x2 = dz.reshape(-1, N), x.reshape(-1, K)
        dx = (dz2 @ weight).view(x.shape) if need_dx else x.new_empty(_EMPTY)
        dw = dz2.t() @ x2 if need_dw else None
        db = dz2.float().sum(0).to(x.dtype) if need_db else None
    return dx, (dw if dw is not None else x.new_empty(_EMPTY)), (db if db is not None else x.new_empty(_EMPTY))


@torch.library.custom_op("tritonize::linear_act_bwd", mutates_args=("pre",))
def _linear_act_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pre: torch.Tensor,
    out: torch.Tensor,
    activation: str,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_act_bwd_impl(dy, x, weight, bias, pre, out, activation, need_dx, need_dw, need_db)


@_linear_act_bwd_op.register_fake
def _(dy, x, weight, bias, pre, out, activation, need_dx, need_dw, need_db):
    e = x.new_empty(_EMPTY)
    return (
        x.new_empty(x.shape) if need_dx else e,
        weight.new_empty(weight.shape) if need_dw else x.new_empty(_EMPTY),
        weight.new_empty((weight.shape[0],)) if need_db else x.new_empty(_EMPTY),
    )


def _linear_act_save(ctx, x, weight, bias, activation, y, pre):
    ctx.activation = activation
    ctx.has_bias = bias is not None
    # GRAD_FROM_OUTPUT: keep Y (the caller holds it anyway); "none" needs neither
    out = y if GRAD_FROM_OUTPUT[activation] and activation != "none" else None
    ctx.save_for_backward(x, weight, bias, pre, out)


def _linear_act_grads(ctx, dy, bwd):
    x, weight, bias, pre, out = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    if out is None:
        out = x.new_empty(_EMPTY)
    dx, dw, db = bwd(dy, x, weight, bias, pre, out, ctx.activation, need_dx, need_dw, need_db)
    return (dx if need_dx else None), (dw if need_dw else None), (db if need_db else None), None, None


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    _linear_act_save(ctx, x, weight, bias, activation, output[0], output[1])


def _linear_act_backward(ctx, dy, dpre):
    return _linear_act_grads(ctx, dy, torch.ops.tritonize.linear_act_bwd)


_linear_act_fwd_op.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)


# The eager backward's common case, planned per problem: key (device, dtype, M, N, activation,
# need_dx, need_dw, need_db) -> _BwdPlan (a BoundLaunch of the element-wise kernel and its grid).
# Why: autograd runs a CUDA backward on its own device thread, where Python runs ~2x slower than
# on the caller's (H100 host, GPT-2's MLP: the general launcher 59-81 us called directly; a
# hand-bound Function's whole fwd+bwd 97-111 us below ours, session 12 run 3). The forward looks
# the plan up (on the caller's thread); the key pins every property the kernel is specialised on,
# so the backward launches without FastKernel.launch's per-call key and without the general
# launcher's bookkeeping (device switch, configs, views).
_BWD_PLANS: dict = {}
_cuda_device = getattr(torch._C, "_cuda_getDevice", None)


class _BwdPlan:
    __slots__ = ("launch", "dev", "dtype", "M", "N", "col_blocks", "groups", "need_dx", "need_dw", "need_db",
                 "from_out", "cfg", "red_rows", "activation")  # fmt: skip


def _bwd_plan(x2, M: int, N: int, activation: str, need_dx: bool, need_dw: bool, need_db: bool) -> _BwdPlan:
    dev, dtype = x2.get_device(), x2.dtype
    key = (dev, dtype, M, N, activation, need_dx, need_dw, need_db)
    cfg = _EW_BWD[need_db]
    plan = _BWD_PLANS.get(key)
    if plan is not None and plan.cfg is cfg and plan.red_rows == _EW_RED_ROWS:  # (tests switch the tiles)
        return plan
    bm, bn, warps, _ = cfg
    plan = _BwdPlan()
    plan.dev, plan.dtype, plan.M, plan.N = dev, dtype, M, N
    plan.need_dx, plan.need_dw, plan.need_db = need_dx, need_dw, need_db
    plan.from_out, plan.cfg, plan.red_rows = GRAD_FROM_OUTPUT[activation], cfg, _EW_RED_ROWS
    plan.activation = activation
    plan.col_blocks, plan.groups = _ew_bwd_grid(x2, M, N, cfg)
    plan.launch = _linear_act_bwd_kernel.bind(
        (plan.col_blocks, plan.groups),
        dict(ACTIVATION=activation, GRAD_FROM_OUT=plan.from_out, HAS_BIAS=need_db, BLOCK_M=bm, BLOCK_N=bn,
             RED_ROWS=_EW_RED_ROWS, num_warps=warps),
    )  # fmt: skip
    if len(_BWD_PLANS) >= 1024:  # many shapes (varying M): start over rather than grow without bound
        _BWD_PLANS.clear()
    _BWD_PLANS[key] = plan
    return plan


def _linear_act_bwd_fast(plan: _BwdPlan, dy, x2, weight, saved):
    """(dx (M, K) | None, dw | None, db | None) for the common backward: contiguous, 16-byte aligned
    dY of x's dtype, x2 the forward's 2-D x, Z (or Y) saved by the forward (contiguous (M, N), dZ
    written over Z), x's device current. The general launcher (linear_act_backward) does the same
    math for every other case."""
    M, N = plan.M, plan.N
    dz = dy.new_empty((M, N)) if plan.from_out else saved  # Y is the caller's; Z is ours (2-D)
    if plan.need_db:
        db = dy.new_empty((N,))
        dbp, cnt = _db_scratch(x2, plan.groups * N, plan.col_blocks)
        plan.launch(dy, saved, dz, db, dbp, cnt, M, N, N, 1, N)
    else:
        plan.launch(dy, saved, dz, dz, dz, dz, M, N, N, 1, N)
        db = None
    dx = torch.mm(dz, weight) if plan.need_dx else None
    return dx, (_mm(dz.t(), x2) if plan.need_dw else None), db


class _LinearActFn(torch.autograd.Function):
    """Eager fast path: the same launchers and backward without the custom-op dispatch layers
    (which cost several times the Python time of a plain autograd.Function per fwd+bwd). Saved
    Z stays 2-D and absent tensors are None (the custom ops need (..., N) views and empty
    placeholders; each is a torch call of a few us on the host). Non-tensor arguments come packed
    in `opts` (see _common.fast_apply). The forward also looks up the backward's plan (ctx.fast),
    on the caller's thread, so the backward's common case is _linear_act_bwd_fast."""

    @staticmethod
    def forward(ctx, x, weight, bias, opts):
        activation, save_pre = opts
        from_out = GRAD_FROM_OUTPUT[activation]
        store_pre = save_pre and not from_out
        nd = x.dim()
        x2 = x if nd == 2 else _as_2d(x)
        y, pre = linear_act_forward(x2, weight, bias, activation, store_pre)
        ctx.x_shape = None
        if nd != 2:
            y = y.view(*x.shape[:-1], weight.shape[0])
            ctx.x_shape = x.shape
        # x2, not x: the backward needs the 2-D form (a view, or the copy made here when x's leading
        # dims do not merge), so it is not made a second time on autograd's thread.
        if (store_pre or from_out) and activation != "none":
            # The common case: the kernel reads a saved Z (or Y). Three saved tensors and the
            # backward's plan (each saved tensor is packed here and unpacked on autograd's thread).
            need = ctx.needs_input_grad
            ctx.fast = _bwd_plan(x2, x2.shape[0], weight.shape[0], activation, need[0], need[1],
                                 bias is not None and need[2])  # fmt: skip
            ctx.save_for_backward(x2, weight, y if from_out else pre)
            return y
        # Z recomputed (SAVE_PRE off) or no activation: the bias only where the backward reads it
        ctx.fast = None
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, weight, bias if pre is None else None, pre)
        return y

    @staticmethod
    def backward(ctx, dy):
        plan = ctx.fast
        if plan is not None:
            x2, weight, saved = ctx.saved_tensors
            if (dy.dtype == plan.dtype and dy.is_contiguous() and not dy.data_ptr() & 15
                    and (plan.dev < 0 or _cuda_device() == plan.dev)):
                dx, dw, db = _linear_act_bwd_fast(plan, dy, x2, weight, saved)
            else:  # strided / misaligned dY (or another device current): the general launcher
                pre, out = (None, saved) if plan.from_out else (saved, None)
                dx, dw, db = _linear_act_bwd_triton(dy, x2, weight, None, pre, out, plan.activation,
                                                    plan.need_dx, plan.need_dw, plan.need_db)  # fmt: skip
            if not plan.from_out:
                # dZ was written over the saved Z: bump its version as the custom op's declared
                # mutation does, so a second backward through this graph (retain_graph) errors
                # instead of reusing dZ.
                torch.autograd.graph.increment_version(saved)
        else:
            x2, weight, bias, pre = ctx.saved_tensors
            need = ctx.needs_input_grad
            need_dx, need_dw, need_db = need[0], need[1], ctx.has_bias and need[2]
            # (None for each gradient not asked for)
            dx, dw, db = _linear_act_bwd_triton(dy, x2, weight, bias, pre, None, ctx.activation, need_dx, need_dw, need_db)
            if pre is not None:
                torch.autograd.graph.increment_version(pre)
        if dx is not None and ctx.x_shape is not None:
            dx = dx.view(ctx.x_shape)
        return dx, dw, db, None


_linear_act_c_apply = _FUNCTION_BASE_APPLY.__get__(None, _LinearActFn)  # callers have checked eager_fast_path


def _gated_linear_fwd_impl(x, w_gate, w_up, activation: str, save: bool):
    """(out, g, u): out = act(g) * u, with g = x Wg^T and u = x Wu^T saved for backward
    (empty tensors when `save` is False: inference)."""
    out_shape = (*x.shape[:-1], w_gate.shape[0])
    if use_triton(x):
        out, g, u = gated_linear_forward(_as_2d(x), w_gate, w_up, activation, store_gu=save)
        if not save:
            return out.view(out_shape), x.new_empty(_EMPTY), x.new_empty(_EMPTY)
        return out.view(out_shape), g.view(out_shape), u.view(out_shape)
    g = F.linear(x, w_gate)
    u = F.linear(x, w_up)
    out = (ACTIVATIONS[activation].torch_fn(g.float()) * u.float()).to(x.dtype)
    if not save:
        return out, x.new_empty(_EMPTY), x.new_empty(_EMPTY)
    return out, g, u


@torch.library.custom_op("tritonize::gated_linear_fwd", mutates_args=())
def _gated_linear_fwd_op(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, activation: str, save: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_linear_fwd_impl(x, w_gate, w_up, activation, save)


@_gated_linear_fwd_op.register_fake
def _(x, w_gate, w_up, activation, save):
    out_shape = (*x.shape[:-1], w_gate.shape[0])
    gu_shape = out_shape if save else _EMPTY
    return x.new_empty(out_shape), x.new_empty(gu_shape), x.new_empty(gu_shape)


def _gated_linear_bwd_impl(dy, x, w_gate, w_up, g, u, activation: str, need_dx: bool, need_dw: bool):
    """(dx, dw_gate, dw_up), each empty when not needed; g and u are overwritten with dG and dU."""
    N, K = w_gate.shape
    if use_triton(x):
        dx, dwg, dwu = gated_linear_backward(
            _as_2d(dy), _as_2d(x), w_gate, w_up, _as_2d(g), _as_2d(u), activation, need_dx, need_dw
        )
        dx = dx.view(x.shape) if dx is not None else None
    else:
        act = ACTIVATIONS[activation]
        gf, uf, dyf = g.float(), u.float(), dy.float()
        dg = (dyf * uf * act.torch_grad(gf)).to(x.dtype).reshape(-1, N)
        du = (dyf * act.torch_fn(gf)).to(x.dtype).reshape(-1, N)
        x2 = x.reshape(-1, K)
        dx = (dg @ w_gate + du @ w_up).view(x.shape) if need_dx else None
        dwg = dg.t() @ x2 if need_dw else None
        dwu = du.t() @ x2 if need_dw else None
    e = lambda t: t if t is not None else x.new_empty(_EMPTY)  # noqa: E731
    return e(dx), e(dwg), e(dwu)


@torch.library.custom_op("tritonize::gated_linear_bwd", mutates_args=("g", "u"))
def _gated_linear_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    activation: str,
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_linear_bwd_impl(dy, x, w_gate, w_up, g, u, activation, need_dx, need_dw)


@_gated_linear_bwd_op.register_fake
def _(dy, x, w_gate, w_up, g, u, activation, need_dx, need_dw):
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(_EMPTY),
        w_gate.new_empty(w_gate.shape) if need_dw else x.new_empty(_EMPTY),
        w_up.new_empty(w_up.shape) if need_dw else x.new_empty(_EMPTY),
    )


def _gated_linear_save(ctx, x, w_gate, w_up, activation, g, u):
    ctx.activation = activation
    ctx.save_for_backward(x, w_gate, w_up, g, u)


def _gated_linear_grads(ctx, dy, bwd):
    x, w_gate, w_up, g, u = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, dwg, dwu = bwd(dy, x, w_gate, w_up, g, u, ctx.activation, need_dx, need_dw)
    return (
        dx if need_dx else None,
        dwg if ctx.needs_input_grad[1] else None,
        dwu if ctx.needs_input_grad[2] else None,
        None,
        None,
    )


def _gated_linear_setup(ctx, inputs, output):
    x, w_gate, w_up, activation, _ = inputs
    _gated_linear_save(ctx, x, w_gate, w_up, activation, output[1], output[2])


def _gated_linear_backward(ctx, dy, dg_unused, du_unused):
    return _gated_linear_grads(ctx, dy, torch.ops.tritonize.gated_linear_bwd)


_gated_linear_fwd_op.register_autograd(_gated_linear_backward, setup_context=_gated_linear_setup)


class _GatedLinearFn(torch.autograd.Function):
    """Eager fast path (see _LinearActFn): G and U saved 2-D; used only when a gradient is needed."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, activation):
        out, g, u = gated_linear_forward(_as_2d(x), w_gate, w_up, activation, store_gu=True)
        if x.dim() != 2:
            out = out.view(*x.shape[:-1], w_gate.shape[0])
        _gated_linear_save(ctx, x, w_gate, w_up, activation, g, u)
        return out

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, g, u = ctx.saved_tensors
        need_dx, need_dwg, need_dwu = ctx.needs_input_grad[:3]
        dx, dwg, dwu = gated_linear_backward(
            _as_2d(dy), _as_2d(x), w_gate, w_up, g, u, ctx.activation, need_dx, need_dwg or need_dwu
        )
        if dx is not None and x.dim() != 2:
            dx = dx.view(x.shape)
        torch.autograd.graph.increment_version(g)  # dG, dU were written over G, U
        torch.autograd.graph.increment_version(u)
        return (dx if need_dx else None), (dwg if need_dwg else None), (dwu if need_dwu else None), None


_gated_linear_fn = fast_apply(_GatedLinearFn)


# gated_mlp: gated_linear followed by the down projection, saving x, G, U but not the product P
# (the down projection's input, which a separate linear would save: M x N, as large as G or U;
# 704 MB over a 12-layer Llama at B4 T2048). P is recomputed in the backward's element-wise pass.


def _gated_mlp_fwd_impl(x, w_gate, w_up, w_down, activation: str, save: bool):
    """(y, g, u): g, u saved for backward (empty tensors when `save` is False: inference)."""
    out_shape = (*x.shape[:-1], w_down.shape[0])
    gu_shape = (*x.shape[:-1], w_gate.shape[0])
    if use_triton(x):
        y, g, u = gated_mlp_forward(_as_2d(x), w_gate, w_up, w_down, activation, store_gu=save)
        if not save:
            return y.view(out_shape), x.new_empty(_EMPTY), x.new_empty(_EMPTY)
        return y.view(out_shape), g.view(gu_shape), u.view(gu_shape)
    g = F.linear(x, w_gate)
    u = F.linear(x, w_up)
    y = F.linear((ACTIVATIONS[activation].torch_fn(g.float()) * u.float()).to(x.dtype), w_down)
    if not save:
        return y, x.new_empty(_EMPTY), x.new_empty(_EMPTY)
    return y, g, u


@torch.library.custom_op("tritonize::gated_mlp_fwd", mutates_args=())
def _gated_mlp_fwd_op(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str, save: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_mlp_fwd_impl(x, w_gate, w_up, w_down, activation, save)


@_gated_mlp_fwd_op.register_fake
def _(x, w_gate, w_up, w_down, activation, save):
    gu_shape = (*x.shape[:-1], w_gate.shape[0]) if save else _EMPTY
    return x.new_empty((*x.shape[:-1], w_down.shape[0])), x.new_empty(gu_shape), x.new_empty(gu_shape)


def _gated_mlp_bwd_impl(dy, x, w_gate, w_up, w_down, g, u, activation: str, need_dx: bool, need_dw: bool,
                        need_dwd: bool):
    """(dx, dw_gate, dw_up, dw_down), each empty when not needed; g, u are overwritten."""
    N, K = w_gate.shape
    if use_triton(x):
        dx, dwg, dwu, dwd = gated_mlp_backward(
            _as_2d(dy), _as_2d(x), w_gate, w_up, w_down, _as_2d(g), _as_2d(u), activation, need_dx, need_dw, need_dwd
        )
        dx = dx.view(x.shape) if dx is not None else None
    else:
        act = ACTIVATIONS[activation]
        dy2 = dy.reshape(-1, w_down.shape[0])
        gf, uf, dpf = g.reshape(-1, N).float(), u.reshape(-1, N).float(), (dy2 @ w_down).float()
        dg = (dpf * uf * act.torch_grad(gf)).to(x.dtype)
        du = (dpf * act.torch_fn(gf)).to(x.dtype)
        x2 = x.reshape(-1, K)
        dx = (dg @ w_gate + du @ w_up).view(x.shape) if need_dx else None
        dwg = dg.t() @ x2 if need_dw else None
        dwu = du.t() @ x2 if need_dw else None
        dwd = dy2.t() @ (act.torch_fn(gf) * uf).to(x.dtype) if need_dwd else None
    e = lambda t: t if t is not None else x.new_empty(_EMPTY)  # noqa: E731
    return e(dx), e(dwg), e(dwu), e(dwd)


@torch.library.custom_op("tritonize::gated_mlp_bwd", mutates_args=("g", "u"))
def _gated_mlp_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    g: torch.Tensor,
    u: torch.Tensor,
    activation: str,
    need_dx: bool,
    need_dw: bool,
    need_dwd: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_mlp_bwd_impl(dy, x, w_gate, w_up, w_down, g, u, activation, need_dx, need_dw, need_dwd)


@_gated_mlp_bwd_op.register_fake
def _(dy, x, w_gate, w_up, w_down, g, u, activation, need_dx, need_dw, need_dwd):
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(_EMPTY),
        w_gate.new_empty(w_gate.shape) if need_dw else x.new_empty(_EMPTY),
        w_up.new_empty(w_up.shape) if need_dw else x.new_empty(_EMPTY),
        w_down.new_empty(w_down.shape) if need_dwd else x.new_empty(_EMPTY),
    )


def _gated_mlp_grads(ctx, dy, bwd):
    x, w_gate, w_up, w_down, g, u = ctx.saved_tensors
    need_dx, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
    dx, dwg, dwu, dwd = bwd(dy, x, w_gate, w_up, w_down, g, u, ctx.activation, need_dx, need_wg or need_wu, need_wd)
    return (dx if need_dx else None, dwg if need_wg else None, dwu if need_wu else None, dwd if need_wd else None,
            None, None)


def _gated_mlp_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, activation, _ = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, w_gate, w_up, w_down, output[1], output[2])


def _gated_mlp_backward(ctx, dy, dg_unused, du_unused):
    return _gated_mlp_grads(ctx, dy, torch.ops.tritonize.gated_mlp_bwd)


_gated_mlp_fwd_op.register_autograd(_gated_mlp_backward, setup_context=_gated_mlp_setup)


class _GatedMLPFn(torch.autograd.Function):
    """Eager fast path (see _LinearActFn): G and U saved 2-D, P freed after the down projection."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, activation):
        y, g, u = gated_mlp_forward(_as_2d(x), w_gate, w_up, w_down, activation, store_gu=True)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], w_down.shape[0])
        ctx.activation = activation
        ctx.save_for_backward(x, w_gate, w_up, w_down, g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gate, w_up, w_down, g, u = ctx.saved_tensors
        need_dx, need_wg, need_wu, need_wd = ctx.needs_input_grad[:4]
        dx, dwg, dwu, dwd = gated_mlp_backward(
            _as_2d(dy), _as_2d(x), w_gate, w_up, w_down, g, u, ctx.activation, need_dx, need_wg or need_wu, need_wd
        )
        if dx is not None and x.dim() != 2:
            dx = dx.view(x.shape)
        torch.autograd.graph.increment_version(g)  # dG, dU were written over G, U
        torch.autograd.graph.increment_version(u)
        return (dx if need_dx else None), (dwg if need_wg else None), (dwu if need_wu else None), \
            (dwd if need_wd else None), None


_gated_mlp_fn = fast_apply(_GatedMLPFn)


# ---------------------------------------------------------------------------------------------
# 4. References (plain torch; `upcast` computes in fp32)
# ---------------------------------------------------------------------------------------------


def linear_act_reference(x, weight, bias=None, activation="gelu", upcast: bool = False):
    if upcast:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
    return ACTIVATIONS[activation].torch_fn(F.linear(x, weight, bias))


def gated_linear_reference(x, w_gate, w_up, activation="silu", upcast: bool = False):
    if upcast:
        x, w_gate, w_up = x.float(), w_gate.float(), w_up.float()
    return ACTIVATIONS[activation].torch_fn(F.linear(x, w_gate)) * F.linear(x, w_up)


def gated_mlp_reference(x, w_gate, w_up, w_down, activation="silu", upcast: bool = False):
    if upcast:
        x, w_down = x.float(), w_down.float()
    return F.linear(gated_linear_reference(x, w_gate, w_up, activation, upcast), w_down)


# ---------------------------------------------------------------------------------------------
# 5. Public functions
# ---------------------------------------------------------------------------------------------


def _check_linear(op: str, x, weights: dict, bias=None):
    # Fast path for the common (valid) call: attribute reads and int compares in a plain loop
    # (generator expressions and torch.device objects cost microseconds each on the launch path,
    # which binds at small shapes). The detailed checks below format their messages eagerly;
    # they run only when something is off, and then raise.
    T = torch.Tensor
    if isinstance(x, T) and x.dtype in FLOAT_DTYPES and x.dim() >= 1:
        dt, dev, cuda, k = x.dtype, x.get_device(), x.is_cuda, x.shape[-1]
        shape0 = None
        for w in weights.values():
            if not (isinstance(w, T) and w.dtype == dt and w.get_device() == dev and w.is_cuda == cuda
                    and w.dim() == 2 and w.shape[1] == k and (shape0 is None or w.shape == shape0)):
                break
            shape0 = w.shape
        else:
            if (dev >= 0 or all(w.device == x.device for w in weights.values())) and (
                bias is None
                or (isinstance(bias, T) and bias.dtype == dt and bias.get_device() == dev and bias.is_cuda == cuda
                    and (dev >= 0 or bias.device == x.device) and bias.dim() == 1 and bias.shape[0] == shape0[0])
            ):
                return
    _check_linear_detailed(op, x, weights, bias)


def _check_linear1(op: str, x, weight, bias):
    """_check_linear for one weight, without building a dict (linear_act's every call). Reads each
    attribute once: dtypes compared by identity (they are singletons), devices by index and the
    is_cuda / is_cpu flags; device objects (~0.3 us each) are built only off CUDA and CPU, where
    the index does not name the device."""
    try:
        dt = x.dtype
        if dt in FLOAT_DTYPES and weight.dtype is dt and weight.dim() == 2 and x.dim() >= 1:
            dev, ws = x.get_device(), weight.shape
            if ws[1] == x.shape[-1] and weight.get_device() == dev and (
                    bias is None or (bias.dtype is dt and bias.get_device() == dev and bias.dim() == 1
                                     and bias.shape[0] == ws[0])):  # fmt: skip
                if dev >= 0:
                    if x.is_cuda and weight.is_cuda and (bias is None or bias.is_cuda):
                        return
                elif (x.is_cpu and weight.is_cpu and (bias is None or bias.is_cpu)) or (
                        weight.device == x.device and (bias is None or bias.device == x.device)):
                    return
    except AttributeError:  # not a tensor: the detailed checks say which argument
        pass
    _check_linear_detailed(op, x, {"weight": weight}, bias)


def _check_linear_detailed(op: str, x, weights: dict, bias=None):
    check_tensor(op, "x", x)
    for name, w in weights.items():
        check_tensor(op, name, w)
    check_tensor(op, "bias", bias, optional=True)
    for name, t in [*weights.items(), ("bias", bias)]:
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"tritonize.{op}: argument '{name}' has dtype {t.dtype} but x has {x.dtype}; they must match")
    check_same_device(op, x=x, **weights, bias=bias)
    check_arg(op, "x", x.dim() >= 1, f"must have at least 1 dimension (..., K), got shape {tuple(x.shape)}")
    first = None
    for name, w in weights.items():
        check_arg(op, name, w.dim() == 2, f"must be 2-D (N, K) as nn.Linear stores it, got shape {tuple(w.shape)}")
        check_arg(
            op, name, w.shape[1] == x.shape[-1],
            f"has shape {tuple(w.shape)}: its K={w.shape[1]} does not match x's last dim {x.shape[-1]} (x is {tuple(x.shape)})",
        )  # fmt: skip
        if first is not None:
            check_arg(op, name, w.shape == first[1].shape, f"has shape {tuple(w.shape)} but {first[0]} has {tuple(first[1].shape)}")
        first = first or (name, w)
    if bias is not None:
        n = first[1].shape[0]
        check_arg(op, "bias", bias.dim() == 1 and bias.shape[0] == n, f"must have shape ({n},), got {tuple(bias.shape)}")


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "gelu"):
    """act(x @ weight^T + bias): x (..., K), weight (N, K), bias (N,) or None -> (..., N)."""
    # The valid call's checks in a few attribute reads (this runs every step; on the H100 hosts
    # each Python call costs ~1 us: session 13 measured this wrapper at ~0.1x of a whole fwd+bwd's
    # host time); anything off goes to the detailed checks, which raise.
    if activation.__class__ is not str or activation not in ACTIVATIONS:
        check_activation("linear_act", activation)
    _check_linear1("linear_act", x, weight, bias)
    if x.numel() == 0 or weight.numel() == 0:
        return linear_act_reference(x, weight, bias, activation)  # nothing to launch
    # Inference (no grad needed): the epilogue skips storing Z, one M*N write less.
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if eager_fast_path(x):
        if not needs_grad:  # no autograd node to build
            y, _ = linear_act_forward(_as_2d(x), weight, bias, activation, False)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
        # eager_fast_path has checked for functorch transforms: the C apply directly
        return _linear_act_c_apply(x, weight, bias, (activation, SAVE_PRE))
    y, _ = torch.ops.tritonize.linear_act_fwd(x, weight, bias, activation, SAVE_PRE and needs_grad)
    return y


def gated_linear(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, activation: str = "silu"):
    """act(x @ w_gate^T) * (x @ w_up^T): SwiGLU (silu), GeGLU (gelu / gelu_tanh). -> (..., N)."""
    check_activation("gated_linear", activation)
    _check_linear("gated_linear", x, {"w_gate": w_gate, "w_up": w_up})
    if x.numel() == 0 or w_gate.numel() == 0:
        return gated_linear_reference(x, w_gate, w_up, activation)  # nothing to launch
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or w_gate.requires_grad or w_up.requires_grad)
    if eager_fast_path(x):
        if not needs_grad:  # no autograd node to build; nothing to save
            out, _, _ = gated_linear_forward(_as_2d(x), w_gate, w_up, activation, store_gu=False)
            return out if x.dim() == 2 else out.view(*x.shape[:-1], w_gate.shape[0])
        return _gated_linear_fn(x, w_gate, w_up, activation)
    out, _, _ = torch.ops.tritonize.gated_linear_fwd(x, w_gate, w_up, activation, needs_grad)
    return out


def _check_w_down(x, w_gate, w_down):
    # attribute reads for the valid call (this runs every step); the detailed checks, which build
    # their messages eagerly, only when something is off
    if (isinstance(w_down, torch.Tensor) and w_down.dtype == x.dtype and w_down.device == x.device
            and w_down.dim() == 2 and w_down.shape[1] == w_gate.shape[0]):
        return
    check_tensor("gated_mlp", "w_down", w_down)
    if w_down.dtype != x.dtype:
        raise TypeError(f"tritonize.gated_mlp: argument 'w_down' has dtype {w_down.dtype} but x has {x.dtype}; "
                        "they must match")
    check_same_device("gated_mlp", x=x, w_down=w_down)
    check_arg("gated_mlp", "w_down", w_down.dim() == 2 and w_down.shape[1] == w_gate.shape[0],
              f"must be 2-D (D, N) with N = w_gate.shape[0] = {w_gate.shape[0]}, got shape {tuple(w_down.shape)}")


def gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              activation: str = "silu"):
    """(act(x @ w_gate^T) * (x @ w_up^T)) @ w_down^T: a whole SwiGLU / GeGLU MLP (Llama's
    down_proj(act_fn(gate_proj(x)) * up_proj(x))). x (..., K), w_gate / w_up (N, K), w_down
    (D, N) -> (..., D). Same numbers as gated_linear followed by F.linear, but the product (the
    down projection's input) is recomputed in backward instead of saved: M x N less memory."""
    check_activation("gated_mlp", activation)
    _check_linear("gated_mlp", x, {"w_gate": w_gate, "w_up": w_up})
    _check_w_down(x, w_gate, w_down)
    if x.numel() == 0 or w_gate.numel() == 0 or w_down.numel() == 0:
        return gated_mlp_reference(x, w_gate, w_up, w_down, activation)  # nothing to launch
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or w_gate.requires_grad or w_up.requires_grad or w_down.requires_grad
    )
    if eager_fast_path(x):
        if not needs_grad:  # no autograd node to build; nothing to save
            y, _, _ = gated_mlp_forward(_as_2d(x), w_gate, w_up, w_down, activation, store_gu=False)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], w_down.shape[0])
        return _gated_mlp_fn(x, w_gate, w_up, w_down, activation)
    y, _, _ = torch.ops.tritonize.gated_mlp_fwd(x, w_gate, w_up, w_down, activation, needs_grad)
    return y


__all__ = [
    "linear_act",
    "gated_linear",
    "gated_mlp",
    "gated_mlp_forward",
    "gated_mlp_backward",
    "gated_mlp_reference",
    "linear_act_forward",
    "linear_act_backward",
    "gated_linear_forward",
    "gated_linear_backward",
    "linear_act_reference",
    "gated_linear_reference",
]
