"""Flash attention, forward and backward (FA2-style), with the masks real models pass.

    out = softmax(q @ k^T * scale + mask) @ v            q (B, H, Tq, D), k/v (B, Hkv, Tk, D)

- Memory O(T): each program keeps a (BLOCK_M, D) accumulator and streams k/v blocks through an
  online softmax; the (Tq, Tk) score matrix never exists. Saved for backward: the output and the
  row logsumexp in fp32, base 2 (the kernels work in exp2, s2 = s * log2(e)) and in two parts,
  m2 = max_j s2_ij and log2(l) = log2(sum_j 2^(s2_ij - m2)): (2, B, H, Tq). Two parts because with
  HF's finfo.min padding masks m2 ~ -1.4e38 absorbs log2(l) in fp32.
- Any strides for q, k, v, o, dO (HF's `.view(B,T,H,D).transpose(1,2)` is read in place, and the
  output is allocated with q's layout so HF's `transpose(1,2).reshape` after it stays a view).
- GQA/MQA: query head h reads kv head h // (H // Hkv); in backward one dk/dv program loops over the
  query heads of its group, so dk/dv are summed without atomics and without repeating k/v.
- Masks: causal (bottom-right aligned when Tq != Tk: query i sees key j iff j <= i + Tk - Tq, as
  SDPA's `causal_lower_right`), additive float masks of any shape broadcastable to (B, H, Tq, Tk)
  (loaded per tile through stride-0 broadcast strides, never expanded in memory), bool masks
  (True = keep, loaded as int8). Both can be combined with `causal`.
- Fully masked rows (every score -inf: bool/-inf masks, causal rows with Tq > Tk) give output 0 and
  zero gradients (m = -inf is guarded; m2 is stored as +inf so backward's exp2(s2 - m2) is 0).
  Rows masked with a *finite* large negative value (HF's finfo.min) behave as in eager torch: the
  row's scores are all equal, so the softmax is uniform. finfo.min * log2(e) would overflow fp32 to
  -inf, so additive values are clamped to -1e38 first (-inf itself stays -inf).
- Dropout on the probabilities, from Philox with (seed, global element index ((b*H+h)*Tq+i)*Tk+j):
  backward regenerates the same keep mask, nothing is stored.
- fp32 inputs: `tl.dot` follows `torch.backends.cuda.matmul.allow_tf32` (default off -> "ieee").
- Backward: `deterministic=True` (default) computes dq in its own kernel over q blocks (recomputing
  the scores; no atomics, bit-reproducible); `deterministic=False` accumulates dq with fp32 atomics
  inside the dk/dv kernel (two matmuls fewer, order-dependent rounding).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from tritonize.kernels._launch import fast_launch
from tritonize.kernels._norm_common import cdiv, device_ctx, next_pow2  # plain ints: triton.cdiv /
# next_power_of_2 are constexpr_functions costing ~4-10 us of host time per call

from ._common import (
    FLOAT_DTYPES, INTERPRET, check_arg, check_same_device, check_tensor, eager_fast_path, fast_apply, new_seed,
    tuning_candidates, use_triton,
)

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
# Plain eager calls on real tensors go through `_AttentionFn` (launchers called directly); False
# sends every call through the custom ops (the benchmark flips it to measure the difference).
EAGER_FAST_PATH = True
_MAX_HEAD_DIM = 256


# =============================================================================================
# 1. Triton kernels
# =============================================================================================


@triton.jit
def _score_mask(
    s,  # (BLOCK_M, BLOCK_N) fp32 scores already in log2 units, or the transpose when TRANSPOSED
    mask_ptr,  # scalar pointer: MASK + b*stride_mb + h*stride_mh
    rows,  # (BLOCK_M,) query indices
    cols,  # (BLOCK_N,) key indices
    Tq,
    Tk,
    stride_mm,
    stride_mn,
    MASK_KIND: tl.constexpr,  # 0 none, 1 additive float, 2 bool (int8, nonzero = keep)
    TRANSPOSED: tl.constexpr,  # s is (BLOCK_N, BLOCK_M): the dk/dv kernel works on S^T
):
    if TRANSPOSED:
        ptrs = mask_ptr + rows[None, :] * stride_mm + cols[:, None] * stride_mn
        inb = (rows[None, :] < Tq) & (cols[:, None] < Tk)
    else:
        ptrs = mask_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mn
        inb = (rows[:, None] < Tq) & (cols[None, :] < Tk)
    if MASK_KIND == 1:
        am = tl.load(ptrs, mask=inb, other=0.0).to(tl.float32)
        # HF's finfo.min * log2(e) overflows fp32 to -inf (which would turn HF's "uniform over a
        # fully padded row" into "row of -inf"); clamp finite values, keep a real -inf as -inf.
        am = tl.where(am == float("-inf"), am, tl.maximum(am, -1.0e38))
        s = s + am * 1.4426950408889634
    elif MASK_KIND == 2:
        keep = tl.load(ptrs, mask=inb, other=1)
        s = tl.where(keep != 0, s, float("-inf"))
    return s


@triton.jit
def _keep_mask(seed, drop_base, rows, cols, Tk, dropout_p, TRANSPOSED: tl.constexpr):
    # Philox counter = global element index ((b*H + h)*Tq + i)*Tk + j (int64): the forward and
    # both backward kernels draw the same number for the same (b, h, i, j), whatever their tiling.
    if TRANSPOSED:
        offs = drop_base + (rows[None, :] * Tk + cols[:, None])
    else:
        offs = drop_base + (rows[:, None] * Tk + cols[None, :])
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _program_ids(CAUSAL: tl.constexpr, SCHED: tl.constexpr, REVERSE: tl.constexpr):
    # (block index along the sequence, b*H + h). SCHED=0: grid (blocks, heads), blocks fastest.
    # SCHED=1: grid (heads, blocks), heads fastest, and under a causal mask the blocks with the
    # most work go first (REVERSE: the last query blocks see the most keys), so the short blocks
    # fill the tail of the grid instead of a few long ones running alone at the end. It also
    # lifts the 65535 limit of grid axis 1 off B*H.
    if SCHED == 1:
        blk = tl.program_id(1)
        bh = tl.program_id(0)
        if CAUSAL and REVERSE:
            blk = tl.num_programs(1) - 1 - blk
    else:
        blk = tl.program_id(0)
        bh = tl.program_id(1)
    return blk, bh


@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i, q,
    k_ptrs,  # (BLOCK_D, BLOCK_N) pointers to K^T of key block 0
    v_ptrs,  # (BLOCK_N, BLOCK_D) pointers to V of key block 0
    mask_ptr, rows, offs_n, offs_d, lo, hi,
    Tq, Tk, D, shift, stride_kn, stride_vn, stride_mm, stride_mn,
    qk_scale, dropout_p, seed, drop_base,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, BOUNDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # BOUNDS=False is the hot loop: key blocks wholly inside [0, Tk) and wholly visible under the
    # causal mask, so no per-element index mask at all. BOUNDS=True: the diagonal and tail blocks.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if BOUNDS:
            kT = tl.load(k_ptrs + start_n * stride_kn, mask=(cols[None, :] < Tk) & (offs_d[:, None] < D), other=0.0)
        elif EVEN_D:
            kT = tl.load(k_ptrs + start_n * stride_kn)
        else:
            kT = tl.load(k_ptrs + start_n * stride_kn, mask=offs_d[:, None] < D, other=0.0)
        # s2 = (q k^T) * scale * log2(e): scores in log2 units, so p = exp2(s2 - m2).
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale
        if MASK_KIND != 0:
            s = _score_mask(s, mask_ptr, rows, cols, Tq, Tk, stride_mm, stride_mn, MASK_KIND, False)
        if BOUNDS:
            valid = cols[None, :] < Tk
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + shift)
            s = tl.where(valid, s, float("-inf"))
        # Online softmax: m_new = max(m, rowmax(s)); rescale the running sum/acc by 2^(m - m_new).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet has m_new = -inf; exp2(-inf - -inf) would be NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            # l sums the undropped p (softmax normaliser); only p @ v sees the dropout (the
            # 1/(1-p) rescale is applied once at the end).
            p = tl.where(_keep_mask(seed, drop_base, rows, cols, Tk, dropout_p, False), p, 0.0)
        if BOUNDS:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=(cols[:, None] < Tk) & (offs_d[None, :] < D), other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs + start_n * stride_vn)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=offs_d[None, :] < D, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    MASK,  # (B, H, Tq, Tk) broadcast view (stride 0 on broadcast dims); float or int8; unused if MASK_KIND=0
    O,  # (B, H, Tq, D) out, q's dtype
    LSE,  # (2, B, H, Tq) fp32 out: row max m2 (+inf on fully masked rows) and log2(row sum)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse,  # B*H*Tq: offset of the log2(l) half of LSE
    H, GROUP, Tq, Tk, D,
    qk_scale, dropout_p, seed,
    T_BUCKET,  # autotune key only (bucketed sequence length)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCHED: tl.constexpr,
):
    pid_m, pid_bh = _program_ids(CAUSAL, SCHED, True)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP  # GQA: the group's shared kv head
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    mask_ptr = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    drop_base = pid_bh.to(tl.int64) * Tq * Tk

    q = tl.load(
        q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(rows[:, None] < Tq) & (offs_d[None, :] < D), other=0.0,
    )
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key range. Causal, bottom-right: row i sees keys j <= i + shift, shift = Tk - Tq.
    #   blocks ending at or before start_m + shift + 1 are visible to every row of this block;
    #   nothing at or after start_m + BLOCK_M + shift is visible to any.
    shift = Tk - Tq
    n_even = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        n_full = (tl.maximum(start_m + shift + 1, 0) // BLOCK_N) * BLOCK_N
        n_full = tl.minimum(n_full, n_even)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), Tk)
    else:
        n_full = n_even
        hi = Tk
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptr, rows, offs_n, offs_d, 0, n_full,
        Tq, Tk, D, shift, stride_kn, stride_vn, stride_mm, stride_mn, qk_scale, dropout_p, seed, drop_base,
        BLOCK_N, CAUSAL, MASK_KIND, HAS_DROPOUT, EVEN_D, False, INPUT_PRECISION,
    )
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptr, rows, offs_n, offs_d, n_full, hi,
        Tq, Tk, D, shift, stride_kn, stride_vn, stride_mm, stride_mn, qk_scale, dropout_p, seed, drop_base,
        BLOCK_N, CAUSAL, MASK_KIND, HAS_DROPOUT, EVEN_D, True, INPUT_PRECISION,
    )

    # Fully masked row: l = 0 -> output 0, and m2 = +inf so that backward's p = exp2(s - m2 - .) = 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv = 1.0 / l_safe
    if HAS_DROPOUT:
        inv = inv / (1.0 - dropout_p)
    acc = acc * inv[:, None]
    # The statistic is kept in two parts, m2 and log2(l): with HF's finfo.min masks a fully padded
    # row has m2 ~ -1.4e38, where m2 + log2(l) would round back to m2 and backward would get p = 1
    # instead of 1/l. Backward uses p = exp2((s2 - m2) - log2(l)).
    lse_m = tl.where(empty, float("inf"), m_i)
    lse_l = tl.where(empty, 0.0, tl.math.log2(l_safe))
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + rows, lse_m, mask=rows < Tq)
    tl.store(LSE + stride_lse + pid_bh.to(tl.int64) * Tq + rows, lse_l, mask=rows < Tq)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(
        o_base + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
        acc.to(O.dtype.element_ty),
        mask=(rows[:, None] < Tq) & (offs_d[None, :] < D),
    )


@fast_launch
@triton.jit
def _attention_bwd_preprocess_kernel(
    O,  # (B, H, Tq, D)
    DO,  # (B, H, Tq, D), any strides (stride 0 from y.sum().backward())
    DELTA,  # (B, H, Tq) fp32 out
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, Tq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax-backward row term
    # (also with dropout, since O = (P*Z/(1-p)) V).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < Tq) & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + rows[:, None] * stride_om + offs_d[None, :] * stride_od, mask=m, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=m, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + rows, delta, mask=rows < Tq)


@triton.jit
def _attention_bwd_dkdv_inner(
    dk, dv, k, v,
    q_ptrs,  # (BLOCK_D, BLOCK_M) pointers to Q^T of query block 0 (this head)
    do_ptrs,  # (BLOCK_M, BLOCK_D) pointers to dO of query block 0
    dq_ptrs,  # (BLOCK_M, BLOCK_D) pointers into the fp32 dq buffer (ATOMIC_DQ only)
    lse_ptr, delta_ptr, mask_ptr, cols, offs_m, offs_d, lo, hi,
    Tq, Tk, D, shift, stride_qm, stride_dom, stride_dqm, stride_mm, stride_mn, stride_lse,
    sm_scale, qk_scale, dropout_p, inv_keep, seed, drop_base,
    BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, BOUNDS: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Works on the transposed tile S^T (BLOCK_N, BLOCK_M), so that dv += P^T dO and dk += dS^T Q
    # are plain dots with this program's keys as rows. BOUNDS=False: whole query blocks inside
    # [0, Tq) that see every key of this block (no row bounds, no causal mask).
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        if BOUNDS:
            qT = tl.load(q_ptrs + start_m * stride_qm, mask=(rows[None, :] < Tq) & (offs_d[:, None] < D), other=0.0)
            do = tl.load(do_ptrs + start_m * stride_dom, mask=(rows[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)
            # rows past Tq: m2 = +inf makes their p exactly 0
            lse_m = tl.load(lse_ptr + rows, mask=rows < Tq, other=float("inf"))
            lse_l = tl.load(lse_ptr + stride_lse + rows, mask=rows < Tq, other=0.0)
            Di = tl.load(delta_ptr + rows, mask=rows < Tq, other=0.0)
        else:
            if EVEN_D:
                qT = tl.load(q_ptrs + start_m * stride_qm)
                do = tl.load(do_ptrs + start_m * stride_dom)
            else:
                qT = tl.load(q_ptrs + start_m * stride_qm, mask=offs_d[:, None] < D, other=0.0)
                do = tl.load(do_ptrs + start_m * stride_dom, mask=offs_d[None, :] < D, other=0.0)
            lse_m = tl.load(lse_ptr + rows)
            lse_l = tl.load(lse_ptr + stride_lse + rows)
            Di = tl.load(delta_ptr + rows)
        sT = tl.dot(k, qT, input_precision=INPUT_PRECISION) * qk_scale
        if MASK_KIND != 0:
            sT = _score_mask(sT, mask_ptr, rows, cols, Tq, Tk, stride_mm, stride_mn, MASK_KIND, True)
        if BOUNDS:
            if CAUSAL:
                sT = tl.where(cols[:, None] <= rows[None, :] + shift, sT, float("-inf"))
        if not EVEN_N:
            sT = tl.where(cols[:, None] < Tk, sT, float("-inf"))
        # P^T recomputed from the saved statistic: p = exp2((s2 - m2) - log2(l)).
        pT = tl.math.exp2((sT - lse_m[None, :]) - lse_l[None, :])
        if HAS_DROPOUT:
            keep = _keep_mask(seed, drop_base, rows, cols, Tk, dropout_p, True)
            pdT = tl.where(keep, pT * inv_keep, 0.0)
        else:
            pdT = pT
        # dV = (P * Z / (1-p))^T dO
        dv = tl.dot(pdT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        # dP = (dO V^T) * Z / (1-p);  dS = P * (dP - delta)   (softmax backward, delta = rowsum(dO*O))
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        dsT = pT * (dpT - Di[None, :])
        # dK = scale * dS^T Q  (scale applied once at the end)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=INPUT_PRECISION)
        if ATOMIC_DQ:
            # dQ = scale * dS K, summed over key blocks by fp32 atomics (order-dependent rounding)
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=INPUT_PRECISION) * sm_scale
            tl.atomic_add(dq_ptrs + start_m * stride_dqm, dq, mask=(rows[:, None] < Tq) & (offs_d[None, :] < D))
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    MASK,  # (B, H, Tq, Tk) broadcast view; float or int8; unused if MASK_KIND=0
    DO,  # (B, H, Tq, D) any strides
    LSE,  # (2, B, H, Tq) fp32: m2 and log2(l) from the forward
    DELTA,  # (B, H, Tq) fp32
    DK,  # (B, Hkv, Tk, D) out
    DV,  # (B, Hkv, Tk, D) out
    DQ,  # (B, H, Tq, D) fp32 accumulator, zeroed (ATOMIC_DQ only; else unused)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lse,
    H, Hkv, GROUP, Tq, Tk, D,
    sm_scale, qk_scale, dropout_p, seed,
    T_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_D: tl.constexpr, ATOMIC_DQ: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SCHED: tl.constexpr,
):
    # Causal: key block 0 is seen by every query, the last by few; ascending order is already
    # heaviest-first (REVERSE=False).
    pid_n, pid_bh = _program_ids(CAUSAL, SCHED, False)  # pid_bh over B * Hkv
    b = pid_bh // Hkv
    kvh = pid_bh % Hkv
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (cols[:, None] < Tk) & (offs_d[None, :] < D)
    k = tl.load(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
                + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
                + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    inv_keep = 1.0 / (1.0 - dropout_p)

    # Query range. Causal (bottom-right): key j is seen by rows i >= j - shift, shift = Tk - Tq.
    #   [lo, lo_full): diagonal blocks, masked;  [lo_full, m_even): every row sees every key of
    #   this block, no mask;  [max(lo_full, m_even), m_ceil): the partial last query block.
    shift = Tk - Tq
    m_even = (Tq // BLOCK_M) * BLOCK_M
    m_ceil = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        lo_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        lo_full = 0
    diag_hi = tl.minimum(lo_full, m_ceil)
    tail_lo = tl.maximum(lo_full, m_even)

    # GQA: this kv head's dk/dv are the sum over the GROUP query heads that read it; looping over
    # them here keeps the sum in registers (no atomics, deterministic).
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = (b * H + h).to(tl.int64)
        q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                  + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd)
        do_ptrs = (DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                   + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod)
        dq_ptrs = (DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
                   + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
        mask_ptr = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        lse_ptr = LSE + bh * Tq
        delta_ptr = DELTA + bh * Tq
        drop_base = bh * Tq * Tk
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, mask_ptr, cols, offs_m, offs_d,
            lo, diag_hi, Tq, Tk, D, shift, stride_qm, stride_dom, stride_dqm, stride_mm, stride_mn, stride_lse,
            sm_scale, qk_scale, dropout_p, inv_keep, seed, drop_base,
            BLOCK_M, CAUSAL, MASK_KIND, HAS_DROPOUT, EVEN_N, EVEN_D, True, ATOMIC_DQ, INPUT_PRECISION,
        )
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, mask_ptr, cols, offs_m, offs_d,
            lo_full, m_even, Tq, Tk, D, shift, stride_qm, stride_dom, stride_dqm, stride_mm, stride_mn, stride_lse,
            sm_scale, qk_scale, dropout_p, inv_keep, seed, drop_base,
            BLOCK_M, CAUSAL, MASK_KIND, HAS_DROPOUT, EVEN_N, EVEN_D, False, ATOMIC_DQ, INPUT_PRECISION,
        )
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, mask_ptr, cols, offs_m, offs_d,
            tail_lo, m_ceil, Tq, Tk, D, shift, stride_qm, stride_dom, stride_dqm, stride_mm, stride_mn, stride_lse,
            sm_scale, qk_scale, dropout_p, inv_keep, seed, drop_base,
            BLOCK_M, CAUSAL, MASK_KIND, HAS_DROPOUT, EVEN_N, EVEN_D, True, ATOMIC_DQ, INPUT_PRECISION,
        )

    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh
             + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh
             + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_inner(
    dq, q, do, lse_m, lse_l, Di,
    k_ptrs,  # (BLOCK_D, BLOCK_N) pointers to K^T of key block 0
    v_ptrs,  # (BLOCK_D, BLOCK_N) pointers to V^T of key block 0
    mask_ptr, rows, offs_n, offs_d, lo, hi,
    Tq, Tk, D, shift, stride_kn, stride_vn, stride_mm, stride_mn,
    qk_scale, dropout_p, inv_keep, seed, drop_base,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, BOUNDS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if BOUNDS:
            kvm = (cols[None, :] < Tk) & (offs_d[:, None] < D)
            kT = tl.load(k_ptrs + start_n * stride_kn, mask=kvm, other=0.0)
            vT = tl.load(v_ptrs + start_n * stride_vn, mask=kvm, other=0.0)
        elif EVEN_D:
            kT = tl.load(k_ptrs + start_n * stride_kn)
            vT = tl.load(v_ptrs + start_n * stride_vn)
        else:
            kT = tl.load(k_ptrs + start_n * stride_kn, mask=offs_d[:, None] < D, other=0.0)
            vT = tl.load(v_ptrs + start_n * stride_vn, mask=offs_d[:, None] < D, other=0.0)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale
        if MASK_KIND != 0:
            s = _score_mask(s, mask_ptr, rows, cols, Tq, Tk, stride_mm, stride_mn, MASK_KIND, False)
        if BOUNDS:
            valid = cols[None, :] < Tk
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + shift)
            s = tl.where(valid, s, float("-inf"))
        p = tl.math.exp2((s - lse_m[:, None]) - lse_l[:, None])
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(_keep_mask(seed, drop_base, rows, cols, Tk, dropout_p, False), dp * inv_keep, 0.0)
        ds = p * (dp - Di[:, None])
        # dQ += dS K   (scale applied once at the end)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (B, H, Tq, D)
    K,  # (B, Hkv, Tk, D)
    V,  # (B, Hkv, Tk, D)
    MASK,  # (B, H, Tq, Tk) broadcast view; unused if MASK_KIND=0
    DO,  # (B, H, Tq, D) any strides
    LSE,  # (2, B, H, Tq) fp32: m2 and log2(l) from the forward
    DELTA,  # (B, H, Tq) fp32
    DQ,  # (B, H, Tq, D) out
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lse,
    H, GROUP, Tq, Tk, D,
    sm_scale, qk_scale, dropout_p, seed,
    T_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EVEN_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, SCHED: tl.constexpr,
):
    # One program per query block: recomputes S and dP for its rows and sums dS K over key
    # blocks in registers (deterministic; costs two extra matmuls against atomics).
    pid_m, pid_bh = _program_ids(CAUSAL, SCHED, True)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qm = (rows[:, None] < Tq) & (offs_d[None, :] < D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=qm, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=qm, other=0.0)
    lse_m = tl.load(LSE + pid_bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=float("inf"))
    lse_l = tl.load(LSE + stride_lse + pid_bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    Di = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + rows, mask=rows < Tq, other=0.0)
    k_ptrs = (K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
              + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
    v_ptrs = (V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
              + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd)
    mask_ptr = MASK + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    drop_base = pid_bh.to(tl.int64) * Tq * Tk
    inv_keep = 1.0 / (1.0 - dropout_p)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Same key ranges as the forward: unmasked blocks, then diagonal/tail blocks.
    shift = Tk - Tq
    n_even = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        n_full = (tl.maximum(start_m + shift + 1, 0) // BLOCK_N) * BLOCK_N
        n_full = tl.minimum(n_full, n_even)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), Tk)
    else:
        n_full = n_even
        hi = Tk
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse_m, lse_l, Di, k_ptrs, v_ptrs, mask_ptr, rows, offs_n, offs_d, 0, n_full,
        Tq, Tk, D, shift, stride_kn, stride_vn, stride_mm, stride_mn, qk_scale, dropout_p, inv_keep, seed, drop_base,
        BLOCK_N, CAUSAL, MASK_KIND, HAS_DROPOUT, EVEN_D, False, INPUT_PRECISION,
    )
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse_m, lse_l, Di, k_ptrs, v_ptrs, mask_ptr, rows, offs_n, offs_d, n_full, hi,
        Tq, Tk, D, shift, stride_kn, stride_vn, stride_mm, stride_mn, qk_scale, dropout_p, inv_keep, seed, drop_base,
        BLOCK_N, CAUSAL, MASK_KIND, HAS_DROPOUT, EVEN_D, True, INPUT_PRECISION,
    )
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=qm)


# =============================================================================================
# 2. Launch configuration and launchers
# =============================================================================================

# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages), best first, per kernel, head-dim bucket
# (BLOCK_D, 64 at least), sequence class ("long": max(Tq, Tk) > 1024) and causal. BLOCK_M is the
# query tile, BLOCK_N the key tile, in every kernel. A list of one is launched directly (no
# autotuner in the way: it costs Python time per call and cannot time kernels of a few
# microseconds reliably anyway); longer lists are autotuned (the autotuner's key buckets T).
# Chosen from benchmarks/sweep_attention.py on an H100 (see docs/notes/attention.md).
_TILE_SPEC = {
    # kind: {(dbucket, long, causal): [tiles]}; D64/D128 measured on an H100 (bf16, B8 H16,
    # T 512 for short, 2048 for long; D128 long and D256 not measured: nearest measured choice).
    "fwd": {
        (64, False, False): [(128, 64, 8, 3)],
        (64, False, True): [(64, 64, 4, 3)],
        (64, True, False): [(128, 64, 4, 3), (128, 64, 8, 3)],
        (64, True, True): [(128, 64, 8, 3), (64, 64, 4, 3)],
        (128, False, False): [(128, 32, 4, 3)],
        (128, False, True): [(128, 32, 4, 3)],
        (128, True, False): [(128, 32, 4, 3), (128, 64, 8, 3)],
        (128, True, True): [(128, 32, 4, 3), (128, 64, 8, 3)],
        (256, False, False): [(64, 32, 4, 2)],
        (256, False, True): [(64, 32, 4, 2)],
        (256, True, False): [(64, 32, 4, 2), (64, 64, 4, 2)],
        (256, True, True): [(64, 32, 4, 2), (64, 64, 4, 2)],
    },
    # dk/dv: few queries per step, many keys per program (keys are the accumulated rows). At D128
    # 4 warps with BLOCK_N=128 spill (two 128x128 fp32 accumulators): 2x slower than BLOCK_N=64.
    "dkdv": {
        (64, False, False): [(32, 128, 4, 3)],
        (64, False, True): [(32, 64, 4, 3)],
        (64, True, False): [(32, 64, 4, 3), (64, 64, 4, 3)],
        (64, True, True): [(32, 128, 4, 3), (64, 64, 4, 3)],
        (128, False, False): [(32, 64, 4, 3)],
        (128, False, True): [(32, 64, 4, 3)],
        (128, True, False): [(32, 64, 4, 3), (64, 128, 8, 3)],
        (128, True, True): [(32, 64, 4, 3), (64, 128, 8, 3)],
        (256, False, False): [(16, 64, 4, 2)],
        (256, False, True): [(16, 64, 4, 2)],
        (256, True, False): [(16, 64, 4, 2), (32, 64, 4, 2)],
        (256, True, True): [(16, 64, 4, 2), (32, 64, 4, 2)],
    },
    "dq": {
        (64, False, False): [(128, 64, 8, 3)],
        (64, False, True): [(64, 32, 4, 3)],
        (64, True, False): [(128, 64, 8, 3), (128, 32, 4, 4)],
        (64, True, True): [(64, 32, 4, 3), (64, 64, 4, 3)],
        (128, False, False): [(128, 32, 4, 3)],
        (128, False, True): [(64, 32, 4, 3)],
        (128, True, False): [(128, 32, 4, 3), (128, 64, 8, 3)],
        (128, True, True): [(64, 32, 4, 3), (128, 64, 8, 3)],
        (256, False, False): [(64, 32, 4, 2)],
        (256, False, True): [(64, 32, 4, 2)],
        (256, True, False): [(64, 32, 4, 2), (32, 32, 4, 2)],
        (256, True, True): [(64, 32, 4, 2), (32, 32, 4, 2)],
    },
}
# Appended to every list, used when nothing above fits in shared memory; fp32 inputs use only
# these (fp32 tiles are twice the bytes; the first is the one the GPU tests ran in fp32).
_FALLBACK_TILES = [(64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)]
# Grid order (see _program_ids). Measured (H100, bf16, T2048 D64 causal): heads-fastest with the
# heavy causal blocks first is 6-9% faster in each kernel; non-causal, blocks-fastest keeps one
# head's K/V shared in L2 by the programs running together (fwd D128 T2048: 1.39 vs 1.76 ms).
# Long causal sequences keep blocks-fastest too (K/V of ~132 heads at once would not fit L2;
# T8192 was measured fast that way).
_SCHED_CAUSAL_MAX_T = 4096
_SCHED_FORCE: dict = {}  # kind -> SCHED, for benchmarks/sweep_attention.py


def _sched(kind: str, causal: bool, tq: int, tk: int) -> int:
    if kind in _SCHED_FORCE:
        return _SCHED_FORCE[kind]
    return 1 if causal and max(tq, tk) <= _SCHED_CAUSAL_MAX_T else 0
_SMEM_BUDGET = 200 * 1024  # H100: 227 KB per block; leave room for layout-conversion scratch
# The interpreter runs one small fixed tile (several blocks per test shape, so loops, diagonal
# splits and partial tiles are all exercised; BLOCK_M != BLOCK_N on purpose).
_INTERPRET_TILE = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}


def _smem_bytes(kind: str, bm: int, bn: int, bd: int, stages: int, elt: int) -> int:
    """Rough shared memory of one program: the operands held for the whole loop plus `stages`
    buffers of the streamed ones (an estimate; it only has to reject the clear misfits)."""
    if kind == "fwd":  # q held; k, v streamed
        return elt * bd * (bm + 2 * stages * bn)
    if kind == "dkdv":  # k, v held; q, dO streamed
        return elt * bd * (2 * bn + 2 * stages * bm)
    return elt * bd * (2 * bm + 2 * stages * bn)  # dq: q, dO held; k, v streamed


@functools.lru_cache(maxsize=None)
def _candidates(kind: str, block_d: int, long: bool, causal: bool, elt: int) -> tuple:
    """The tile list for one launch class, misfits removed (never empty)."""
    spec = _TILE_SPEC[kind][(min(max(64, block_d), 256), long, causal)] if elt <= 2 else []
    fits = [t for t in dict.fromkeys(spec + _FALLBACK_TILES)
            if _smem_bytes(kind, t[0], t[1], block_d, t[3], elt) <= _SMEM_BUDGET]
    fits = fits or [_FALLBACK_TILES[-1]]
    # With the first spec entry gone (does not fit), keep only the first that fits: no tuning
    # across fallbacks.
    if fits[0] not in spec:
        return (fits[0],)
    return tuple(tuning_candidates([t for t in fits if t in spec]))


def _is_long(tq: int, tk: int) -> bool:
    return max(tq, tk) > 1024


def _all_configs():
    tiles = dict.fromkeys(t for spec in _TILE_SPEC.values() for lst in spec.values() for t in lst + _FALLBACK_TILES)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        cands = set(_candidates(
            kind, kwargs["BLOCK_D"], _is_long(named_args["Tq"], named_args["Tk"]), bool(kwargs["CAUSAL"]),
            named_args["Q"].element_size(),
        ))
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in cands]

    return prune


_KEY = ["T_BUCKET", "BLOCK_D", "CAUSAL", "MASK_KIND", "HAS_DROPOUT", "INPUT_PRECISION", "SCHED"]
_even_n = triton.heuristics({"EVEN_N": lambda a: a["Tk"] % a["BLOCK_N"] == 0})

# FastKernel (kernels/_launch.py): direct launches once compiled. The raw kernels stay plain
# JITFunctions above (the autotuners below wrap them); these are the launched objects.
_fwd_raw = fast_launch(_attention_fwd_kernel)
_dkdv_raw = fast_launch(_attention_bwd_dkdv_kernel)
_dq_raw = fast_launch(_attention_bwd_dq_kernel)

if INTERPRET:
    _fwd_tuned = _dkdv_tuned = _dq_tuned = None
else:
    # Only reached for classes with several candidates (long sequences, TRITONIZE_AUTOTUNE on).
    _fwd_tuned = fast_launch(triton.autotune(_all_configs(), key=_KEY, prune_configs_by={"early_config_prune": _pruner("fwd")})(
        _attention_fwd_kernel
    ))
    # reset_to_zero: the atomic-dq variant accumulates into DQ, which must start at 0 for every
    # benchmarking run of the autotuner (for the deterministic variant DQ is a dummy).
    _dkdv_tuned = fast_launch(triton.autotune(
        _all_configs(), key=_KEY + ["ATOMIC_DQ"], reset_to_zero=["DQ"],
        prune_configs_by={"early_config_prune": _pruner("dkdv")},
    )(_even_n(_attention_bwd_dkdv_kernel)))
    _dq_tuned = fast_launch(triton.autotune(_all_configs(), key=_KEY, prune_configs_by={"early_config_prune": _pruner("dq")})(
        _attention_bwd_dq_kernel
    ))


def _launch(kind: str, raw, tuned, nblocks: int, nbh: int, args: tuple, consts: dict, Tq: int, Tk: int,
            elt: int, extra=None):
    """Launch `raw` with the single tile of this class, or `tuned` (the autotuner) when several.
    Grid: (sequence blocks, heads), or (heads, blocks) for SCHED=1. `extra(tile)` adds
    tile-dependent constexprs (EVEN_N)."""
    sched = consts["SCHED"]
    if INTERPRET:
        bm, bn = _INTERPRET_TILE[kind]
        tile = {"BLOCK_M": bm, "BLOCK_N": bn}
        blk = bm if kind != "dkdv" else bn
        grid = (cdiv(nblocks, blk), nbh) if sched == 0 else (nbh, cdiv(nblocks, blk))
        raw[grid](*args, **consts, **tile, **(extra(tile) if extra else {}))
        return
    cands = _candidates(kind, consts["BLOCK_D"], _is_long(Tq, Tk), consts["CAUSAL"], elt)
    tkey = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if len(cands) == 1:
        bm, bn, w, s = cands[0]
        tile = {"BLOCK_M": bm, "BLOCK_N": bn}
        blk = bm if kind != "dkdv" else bn
        grid = (cdiv(nblocks, blk), nbh) if sched == 0 else (nbh, cdiv(nblocks, blk))
        raw[grid](*args, **consts, **tile, **(extra(tile) if extra else {}), num_warps=w, num_stages=s)
    elif sched == 0:
        tuned[lambda META: (cdiv(nblocks, META[tkey]), nbh)](*args, **consts)
    else:
        tuned[lambda META: (nbh, cdiv(nblocks, META[tkey]))](*args, **consts)


def _t_bucket(tq: int, tk: int) -> int:
    # Autotune key: powers of two (capped), so a new sequence length reuses the tuned tile.
    return (min(next_pow2(tq), 1 << 16) << 20) | min(next_pow2(tk), 1 << 16)


def _input_precision(dtype: torch.dtype):
    # fp32 inputs follow torch's own matmul setting (off by default -> exact fp32 products, as
    # torch's fp32 matmul); fp16/bf16 take tl.dot's default (None).
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _mask_args(mask: Optional[torch.Tensor], ref: torch.Tensor, B: int, H: int, Tq: int, Tk: int):
    """(tensor, MASK_KIND, strides) for the kernels: the mask as a (B, H, Tq, Tk) broadcast *view*
    (stride 0 on broadcast dims, nothing materialised); bool reinterpreted as int8 (same bytes)."""
    if mask is None:
        return ref, 0, (0, 0, 0, 0)
    m = mask.expand(B, H, Tq, Tk)
    if m.dtype == torch.bool:
        return m.view(torch.int8), 2, m.stride()
    return m, 1, m.stride()


# Entering torch.cuda.device costs a few microseconds per launch: only when t is not on the
# current device (tensors on cuda:1 while cuda:0 is current); see _norm_common.device_ctx.
_device_ctx = device_ctx


def _even_n_of(Tk: int):
    return lambda tile: {"EVEN_N": Tk % tile["BLOCK_N"] == 0}


def attention_forward(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, seed=0):
    """Launch the forward. Returns (out, lse): out with q's layout; lse (2, B, H, Tq) fp32, the
    base-2 row statistic in two parts, m2 = max_j s_ij*log2(e) (+inf on fully masked rows) and
    log2(sum_j 2^(s2_ij - m2)); logsumexp = (m2 + lse[1]) * ln 2. No argument checks (the public `attention` does them)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # empty_like keeps q's memory layout when q is a dense permutation (HF's transpose(1, 2) view),
    # so the caller's transpose back is a view too.
    out = torch.empty_like(q)
    lse = torch.empty((2, B, H, Tq), dtype=torch.float32, device=q.device)
    m, mask_kind, ms = _mask_args(mask, q, B, H, Tq, Tk)
    block_d = max(16, next_pow2(D))
    consts = dict(
        BLOCK_D=block_d, CAUSAL=bool(causal), MASK_KIND=mask_kind, HAS_DROPOUT=dropout_p > 0.0,
        EVEN_D=block_d == D, INPUT_PRECISION=_input_precision(q.dtype), SCHED=_sched("fwd", causal, Tq, Tk),
    )
    args = (
        q, k, v, m, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(), B * H * Tq,
        H, H // Hkv, Tq, Tk, D,
        scale * _LOG2E, dropout_p, seed, _t_bucket(Tq, Tk),
    )
    with _device_ctx(q):
        _launch("fwd", _fwd_raw, _fwd_tuned, Tq, B * H, args, consts, Tq, Tk, q.element_size())
    return out, lse


def attention_backward(do, q, k, v, out, lse, mask=None, causal=False, scale=None, dropout_p=0.0, seed=0,
                       deterministic=True):
    """Launch the backward. Returns (dq, dk, dv) in the layouts of q, k, v; dk/dv are summed over
    each GQA group. `do` may have any strides (including stride 0)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    m, mask_kind, ms = _mask_args(mask, q, B, H, Tq, Tk)
    block_d = max(16, next_pow2(D))
    common = dict(
        BLOCK_D=block_d, CAUSAL=bool(causal), MASK_KIND=mask_kind, HAS_DROPOUT=dropout_p > 0.0,
        EVEN_D=block_d == D, INPUT_PRECISION=_input_precision(q.dtype),
    )
    tb = _t_bucket(Tq, Tk)
    elt = q.element_size()
    if deterministic:
        dq_acc = dk  # unused by the kernel (ATOMIC_DQ=False)
    else:
        # fp32 accumulator for the atomics; cast into dq (q's layout) afterwards.
        dq_acc = torch.zeros((B, H, Tq, D), dtype=torch.float32, device=q.device)
    with _device_ctx(q):
        pre_m = 16 if INTERPRET else (32 if block_d > 128 else 64)
        _attention_bwd_preprocess_kernel[(cdiv(Tq, pre_m), B * H)](
            out, do, delta, *out.stride(), *do.stride(), H, Tq, D, BLOCK_M=pre_m, BLOCK_D=block_d,
        )
        args = (
            q, k, v, m, do, lse, delta, dk, dv, dq_acc,
            *q.stride(), *k.stride(), *v.stride(), *ms, *do.stride(), *dk.stride(), *dv.stride(),
            *(dq_acc.stride() if not deterministic else (0, 0, 0, 0)), B * H * Tq,
            H, Hkv, H // Hkv, Tq, Tk, D,
            scale, scale * _LOG2E, dropout_p, seed, tb,
        )
        _launch("dkdv", _dkdv_raw, _dkdv_tuned, Tk, B * Hkv, args,
                dict(common, ATOMIC_DQ=not deterministic, SCHED=_sched("dkdv", causal, Tq, Tk)), Tq, Tk, elt, _even_n_of(Tk))
        if deterministic:
            args = (
                q, k, v, m, do, lse, delta, dq,
                *q.stride(), *k.stride(), *v.stride(), *ms, *do.stride(), *dq.stride(), B * H * Tq,
                H, H // Hkv, Tq, Tk, D,
                scale, scale * _LOG2E, dropout_p, seed, tb,
            )
            _launch("dq", _dq_raw, _dq_tuned, Tq, B * H, args, dict(common, SCHED=_sched("dq", causal, Tq, Tk)),
                    Tq, Tk, elt)
        else:
            dq.copy_(dq_acc)
    return dq, dk, dv


# =============================================================================================
# 3. Custom ops (opaque to Dynamo/AOTAutograd/Inductor) and autograd
# =============================================================================================


@torch.library.custom_op("tritonize::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
    causal: bool, scale: float, dropout_p: float, seed: Optional[torch.Tensor], deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # seed: a 0-d int64 CPU tensor (a graph value under tracing, drawn fresh each step; an int
    # would be baked into the graph). Reading it is a CPU read, no device sync. None without
    # dropout: no CPU tensor in the graph, which would keep it from being CUDA-graphed.
    seed_i = 0 if seed is None else int(seed)
    if use_triton(q):
        return attention_forward(q, k, v, mask, causal, scale, dropout_p, seed_i)
    out, lse = attention_reference(q, k, v, mask, causal, scale, dropout_p, seed=seed_i, return_lse=True)
    # The fake declares out with q's layout (empty_like(q), as the launcher allocates it): the
    # reference's matmul result is contiguous, so copy it into that layout (Inductor asserts strides).
    return _like(out, q), lse


@_attention_fwd_op.register_fake
def _(q, k, v, mask, causal, scale, dropout_p, seed, deterministic):
    B, H, Tq, _ = q.shape
    return torch.empty_like(q), q.new_empty((2, B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("tritonize::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: Optional[torch.Tensor], causal: bool, scale: float, dropout_p: float, seed: Optional[torch.Tensor],
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seed_i = 0 if seed is None else int(seed)
    if use_triton(q):  # allocates empty_like(q/k/v) itself
        return attention_backward(do, q, k, v, out, lse, mask, causal, scale, dropout_p, seed_i, deterministic)
    # Reference path (same seeded dropout mask as the reference forward), in the fake's layouts.
    dq, dk, dv = attention_reference_backward(do, q, k, v, mask, causal, scale, dropout_p, seed=seed_i)
    return _like(dq, q), _like(dk, k), _like(dv, v)


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`t` in `torch.empty_like(ref)`'s layout (what the fake implementations declare)."""
    want = torch.empty_like(ref, dtype=t.dtype)
    if want.stride() == t.stride():
        return t
    return want.copy_(t)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, mask, causal, scale, dropout_p, seed, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, dropout_p, seed, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.deterministic = causal, scale, dropout_p, deterministic


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    # grad_lse is ignored: lse is an internal statistic, never returned by `attention`.
    dq, dk, dv = _attention_bwd_op(
        grad_out, q, k, v, out, lse, mask, ctx.causal, ctx.scale, ctx.dropout_p, seed, ctx.deterministic
    )
    return dq, dk, dv, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _AttentionFn(torch.autograd.Function):
    """Eager fast path: the same launchers and saved state as the custom ops, without their
    dispatch layers (which cost several times the Python time of a plain autograd.Function per
    forward+backward, enough to decide the speed at T <= 1024). See `eager_fast_path`."""

    # The non-tensor arguments come packed in one tuple `opts` (see _common.fast_apply).
    @staticmethod
    def forward(ctx, q, k, v, mask, opts):
        causal, scale, dropout_p, seed, deterministic = opts
        out, lse = attention_forward(q, k, v, mask, causal, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed, ctx.deterministic = causal, scale, dropout_p, seed, deterministic
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            do, q, k, v, out, lse, mask, ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed, ctx.deterministic
        )
        return dq, dk, dv, None, None


_attention_fn = fast_apply(_AttentionFn)


# =============================================================================================
# 4. Reference
# =============================================================================================


def _reference_probs(q, k, v, mask, causal, scale, dropout_p, seed, dropout_mask):
    """Softmax probabilities (0 on rows with no visible key), the dropout keep mask (or None), the
    row max and row sum, and k/v repeated to H heads (GQA)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (Tk - Tq), float("-inf"))
    mx = s.amax(-1, keepdim=True).detach()
    mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    e = torch.exp(s - mx)
    lsum = e.sum(-1, keepdim=True)
    p = e / torch.where(lsum == 0, torch.ones_like(lsum), lsum)
    keep = None
    if dropout_p > 0.0:
        keep = dropout_mask
        if keep is None:
            gen = torch.Generator(device=q.device).manual_seed(int(seed or 0))
            keep = torch.rand(p.shape, generator=gen, device=q.device) >= dropout_p
    return p, keep, mx, lsum, k, v


def attention_reference(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, *, seed=None,
                        dropout_mask=None, upcast=True, return_lse=False):
    """The op in plain torch (materialises the scores; for tests and the CPU fallback).

    Same semantics as the kernel: GQA by repeating kv heads, bool mask True = keep, causal aligned
    bottom-right, fully masked rows -> 0. Dropout keeps where `dropout_mask` (bool, broadcastable to
    the scores) is True, or, without it, where `torch.rand` from a generator seeded with `seed`
    is >= dropout_p. `return_lse` also returns the (2, B, H, Tq) base-2 statistic as the kernel
    saves it."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, keep, mx, lsum, k, v = _reference_probs(q, k, v, mask, causal, scale, dropout_p, seed, dropout_mask)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = (p.to(v.dtype) @ v).to(dtype)
    if not return_lse:
        return out
    empty = lsum.squeeze(-1) == 0
    m2 = torch.where(empty, float("inf"), mx.squeeze(-1) * _LOG2E)
    l2 = torch.where(empty, 0.0, torch.log2(lsum.squeeze(-1)))
    return out, torch.stack((m2, l2)).float()


def attention_reference_backward(do, q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, *, seed=None):
    """(dq, dk, dv) of `attention_reference` in fp32, by the explicit formulas (the custom op's
    CPU fallback runs below autograd, so it cannot differentiate the reference itself)."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, do = q.float(), k.float(), v.float(), do.float()
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    p, keep, _, _, kr, vr = _reference_probs(q, k, v, mask, causal, scale, dropout_p, seed, None)
    pd = p if keep is None else p * keep / (1.0 - dropout_p)
    dv = pd.transpose(-1, -2) @ do
    dp = do @ vr.transpose(-1, -2)
    if keep is not None:
        dp = dp * keep / (1.0 - dropout_p)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # softmax backward
    dq = (ds @ kr) * scale
    dk = (ds.transpose(-1, -2) @ q) * scale
    if Hkv != H:  # GQA: sum over the query heads of each group
        dk = dk.view(B, Hkv, H // Hkv, Tk, D).sum(2)
        dv = dv.view(B, Hkv, H // Hkv, Tk, D).sum(2)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


# =============================================================================================
# 5. Public function
# =============================================================================================


def _check_detailed(op, q, k, v, mask, scale, dropout_p, seed):
    """Every argument check of `attention`, each raising a clear error; returns the scale
    (1/sqrt(D) when None). Run when the fast check in `attention` fails or for a mask / seed."""
    if seed is not None:
        ok = (isinstance(seed, torch.Tensor) and seed.dim() == 0 and seed.dtype == torch.int64
              and seed.device.type == "cpu") or (isinstance(seed, int) and not isinstance(seed, bool))
        if not ok:
            raise TypeError(f"tritonize.{op}: argument 'seed' must be an int or a 0-d int64 CPU tensor, got {seed!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"tritonize.{op}: argument '{name}' has dtype {t.dtype}, but q has {q.dtype}")
    check_tensor(op, "mask", mask, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.bool), optional=True)
    check_same_device(op, q=q, k=k, v=v, mask=mask)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_arg(op, name, t.dim() == 4, f"must be 4-D (B, H, T, D), got shape {tuple(t.shape)}")
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    check_arg(op, "k", Bk == B, f"has batch {Bk}, but q has batch {B}")
    check_arg(op, "k", Dk == D, f"has head dim {Dk}, but q has head dim {D}")
    check_arg(op, "v", tuple(v.shape) == tuple(k.shape), f"has shape {tuple(v.shape)}, but k has {tuple(k.shape)}")
    check_arg(op, "k", Hkv >= 1 and H % Hkv == 0,
              f"has {Hkv} heads, which must divide q's {H} heads (GQA/MQA)")
    check_arg(op, "q", 1 <= D <= _MAX_HEAD_DIM, f"head dim must be in 1..{_MAX_HEAD_DIM}, got {D}")
    if mask is not None:
        ok = mask.dim() <= 4
        if ok:
            try:
                ok = torch.broadcast_shapes(tuple(mask.shape), (B, H, Tq, Tk)) == (B, H, Tq, Tk)
            except RuntimeError:
                ok = False
        check_arg(op, "mask", ok, f"of shape {tuple(mask.shape)} is not broadcastable to (B, H, Tq, Tk) = {(B, H, Tq, Tk)}")
        check_arg(op, "mask", not (mask.requires_grad and torch.is_grad_enabled()),
                  "requires grad; gradients w.r.t. the mask are not supported")
    check_arg(op, "dropout_p", 0.0 <= dropout_p < 1.0, f"must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    check_arg(op, "scale", math.isfinite(float(scale)), f"must be finite, got {scale}")
    return scale


def attention(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, *, deterministic=True, seed=None):
    """Scaled dot-product attention in SDPA's layout: q (B, H, Tq, D), k/v (B, Hkv, Tk, D) with
    H % Hkv == 0 (GQA/MQA), D <= 256. `mask`: bool (True = keep) or additive float, broadcastable
    to (B, H, Tq, Tk); `causal` may be combined with it (bottom-right aligned when Tq != Tk).
    Fully masked rows give 0. `deterministic=False` accumulates dq with atomics in backward.
    Gradients flow to q, k, v (not to the mask). `seed` (int or 0-d int64 CPU tensor, optional)
    fixes the dropout mask; by default it is drawn from torch's default generator (a graph
    fuser passes a tensor drawn in the graph, so a captured graph draws a fresh one per step)."""
    op = "attention"
    T = torch.Tensor
    # Fast path for the common (valid) call: attribute reads only. The detailed checks below
    # format their messages (shape tuples, f-strings) eagerly, ~40 us per call on a CPU box;
    # they run only when something is off, or for the rarer arguments (a mask, a seed).
    if (
        seed is None and mask is None
        and isinstance(q, T) and isinstance(k, T) and isinstance(v, T)
        and q.dtype in FLOAT_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
        and k.device == q.device and v.device == q.device
        and q.dim() == 4 and k.dim() == 4 and v.shape == k.shape
    ):
        B, H, Tq, D = q.shape
        Bk, Hkv, Tk, Dk = k.shape
        fast = (Bk == B and Dk == D and Hkv >= 1 and H % Hkv == 0 and 1 <= D <= _MAX_HEAD_DIM
                and type(dropout_p) is float and 0.0 <= dropout_p < 1.0
                and (scale is None or (type(scale) is float and math.isfinite(scale))))
    else:
        fast = False
    if not fast:
        scale = _check_detailed(op, q, k, v, mask, scale, dropout_p, seed)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if B * H * Tq == 0:
        return q.new_empty((B, H, Tq, D))
    if Tk == 0:
        return q.new_zeros((B, H, Tq, D))  # no key at all: every row is fully masked
    if EAGER_FAST_PATH and eager_fast_path(q):
        seed_i = 0 if dropout_p == 0.0 else (new_seed() if seed is None else int(seed))
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _attention_fn(q, k, v, mask, (bool(causal), float(scale), float(dropout_p), seed_i,
                                                 bool(deterministic)))
        return attention_forward(q, k, v, mask, bool(causal), float(scale), float(dropout_p), seed_i)[0]
    # Traced (torch.compile, fake tensors): the seed stays a tensor, a graph value drawn each step
    # (new_seed()'s .item() would be data-dependent under Inductor).
    if dropout_p == 0.0:
        seed_t = None
    elif seed is None:
        seed_t = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)  # new_seed()'s draw, kept a tensor
    elif isinstance(seed, torch.Tensor):
        seed_t = seed
    else:
        seed_t = torch.tensor(int(seed), dtype=torch.int64)
    out, _ = _attention_fwd_op(q, k, v, mask, bool(causal), float(scale), float(dropout_p), seed_t, bool(deterministic))
    return out
