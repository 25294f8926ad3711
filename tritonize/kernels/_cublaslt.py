"""cuBLASLt's GEMM with a bias + activation epilogue (GELU(tanh) or ReLU), GELU's optionally
storing the pre-activation too.

    y, z = linear_act_epilogue(x, weight, bias, "gelu_tanh", store_pre=True)
           z = x @ weight^T + bias,  y = gelu_tanh(z)
    y, _ = linear_act_epilogue(x, weight, bias, "relu", store_pre=False)     y = relu(z)

Why: linear_act's forward at GPT-2's MLP shape (H100, bf16, 8192x768->3072) is a GEMM plus an
epilogue that applies the activation and stores both Z (for the backward) and Y. Our Triton kernel
with that epilogue (persistent, TMA, 156 configs swept) takes 93 us; cuBLAS's GEMM alone 61 us;
triton 3.6 cannot overlap the epilogue of one tile with the main loop of the next the way cuBLAS's
warp-specialised kernels do. cuBLASLt has exactly this epilogue (CUBLASLT_EPILOGUE_GELU_AUX_BIAS:
the GELU input is written to an "aux" matrix next to the output; its GELU is the tanh form), but
torch exposes it only without the aux output (torch._addmm_activation). So we call it through
ctypes, on the cuBLASLt library torch itself has loaded: 82.3 us for that forward (H100, session
11), against 92.7 for our persistent Triton kernel. ReLU needs no aux (its derivative comes from
the output), nor does a forward without grad. Everything here is optional: where the
library, the symbols or a suitable algorithm are missing, `available()` / the call return False /
None and the caller keeps its Triton path.

Second use (session 15): `matmul(a, b)`, a plain GEMM through the same library whose algorithm is
chosen by timing cuBLASLt's heuristic candidates once per problem (`_tune`), for the large GEMMs
of gated_linear / gated_mlp. torch.mm runs the heuristic's first pick; on the H100 another of its
candidates was 5-12% faster for x W^T at all three bench shapes and for dW = dG^T X at Llama-8B
in single calls (benchmarks/probe_cublaslt_algos.py; docs/notes/linear_act.md); at the GPU's power
limit (a training run's state) only Llama-1B's x W^T gain held (1.08x), hence the 5% margin below.
The epilogue call above is tuned the same way. Tuning is skipped (the first pick kept) while a
CUDA graph is being captured, under torch.use_deterministic_algorithms (so that two processes run
the same algorithm), and with TRITONIZE_CUBLASLT_TUNE=0.

Layout: cuBLASLt is column-major. Row-major Y (M, N) is column-major Y^T (N x M, ld N), and
Y^T = W X^T: A = W (column-major K x N, ld = W's row stride, op T), B = X (K x M, ld = x's row
stride, op N), D = Y^T and aux = Z^T (N x M, ld N); the bias runs along D's rows (length N).
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading

import torch

# cublasLt.h enum values (stable across CUDA 11.x-13.x)
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F = 68
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_EPILOGUE_BIAS_BIT = 4
# (activation, store_pre) -> epilogue without bias; | _EPILOGUE_BIAS_BIT with one
EPILOGUES = {("gelu_tanh", True): 160, ("gelu_tanh", False): 32, ("relu", False): 2}
_PREF_MAX_WORKSPACE = 1
_PREF_MIN_ALIGN = (5, 6, 7, 8)  # A, B, C, D bytes
_WORKSPACE_MAX = 32 * 1024 * 1024
_CANDIDATES = 8  # heuristic results asked for (cuBLASLt 13 returns at most 8 for these problems)
TUNE = os.environ.get("TRITONIZE_CUBLASLT_TUNE", "1") != "0"
# Timing per problem, once: rounds x reps calls of every candidate, interleaved by round (the GPU's
# clock drifts with its power draw: measured 1.18-1.51 ms for the same GEMM within a second); the
# median round decides, and another candidate replaces the first pick only when that is at least
# 5% faster. Why 5% (session 16): a training run keeps the GPU at its power limit (H100: 700 W,
# the SM clock 1305-1470 MHz under back-to-back GEMMs, 1980 after a pause), and there the ranking
# changes: at Llama-8B's GEMMs the candidates that were 5-12% faster in short bursts are 0.96-1.01x
# the first pick in 400 ms blocks (benchmarks/probe_cublaslt_algos.py --sustained), and picks that
# won a 2% margin in a sustained state made gated_linear's fwd+bwd 0.992x torch.mm's. A gain that
# survives the power limit is larger (Llama-1B's x W^T: 1.08x sustained, 1.11x burst).
TUNE_ROUNDS, TUNE_REPS, TUNE_MARGIN = 5, 2, 0.95

_DTYPES = {torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF}


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_lock = threading.Lock()
_lib = None  # the ctypes library, False when it cannot be had
_handles: dict = {}  # device index -> cublasLtHandle_t
_plans: dict = {}  # problem key (see linear_act_epilogue) -> _Plan, or False where this path cannot take it


def _find_library():
    """The libcublasLt torch has loaded (the same build torch's own GEMMs use), else the loader's."""
    torch.cuda.current_blas_handle()  # makes sure torch's CUDA BLAS libraries are loaded
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcublasLt.so" in line:
                    return ctypes.CDLL(line.split()[-1])
    except OSError:
        pass
    for name in ("libcublasLt.so", "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _library():
    global _lib
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    lib = _find_library()
                    for fn in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescSetAttribute",
                               "cublasLtMatrixLayoutCreate", "cublasLtMatmulPreferenceCreate",
                               "cublasLtMatmulPreferenceSetAttribute", "cublasLtMatmulAlgoGetHeuristic",
                               "cublasLtMatmul"):
                        getattr(lib, fn).restype = ctypes.c_int
                    lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                                               ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64]
                    vp = ctypes.c_void_p
                    lib.cublasLtMatmulDescSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
                    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
                    # handle, desc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo, workspace,
                    # its size, stream: every pointer passed as an int
                    lib.cublasLtMatmul.argtypes = [vp] * 14 + [ctypes.c_size_t, vp]
                    _lib = lib
                except (OSError, AttributeError, RuntimeError, TypeError):
                    _lib = False
    return _lib or None


def _check(status: int, what: str):
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} returned status {status}")


def _set(setter, obj, attr: int, value):
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")


def _alignment(t: torch.Tensor) -> int:
    ptr = t.data_ptr()
    return min(ptr & -ptr, 256) if ptr else 256  # the largest power of two dividing ptr, up to 256


class _Plan:
    """One problem's cuBLASLt objects, as plain ints for the call (the ctypes objects in `keep`, so
    they stay alive), the bias / aux pointers last written into its descriptor, and, until the
    problem has been timed, the candidate algorithms [(algo address, workspace bytes), ...] (None
    once tuned); picked: the index of the algorithm in use among the heuristic's results."""

    __slots__ = ("handle", "desc", "a_l", "b_l", "d_l", "algo", "ws", "keep", "aux_ptr", "bias_ptr", "cands", "picked")


def _handle(lib, dev: int):
    handle = _handles.get(dev)
    if handle is None:
        handle = ctypes.c_void_p()
        if lib.cublasLtCreate(ctypes.byref(handle)) != 0:
            return None
        _handles[dev] = handle
    return handle


def _make_plan(lib, dev: int, dtype, op_a: int, lay_a, op_b: int, lay_b, n_rows: int, n_cols: int, epilogue: int,
               aligns, d_ld: int = 0) -> "_Plan | bool":
    """A _Plan for D (n_rows x n_cols, column-major, ld d_ld or n_rows) = op_a(A) op_b(B) with the
    given epilogue, A / B laid out as (rows, cols, ld); aligns: the A, B, C, D pointers' alignment
    in bytes. False where cuBLASLt has no algorithm for it (or refused a step)."""
    handle = _handle(lib, dev)
    if handle is None:
        return False
    dt = _DTYPES[dtype]
    try:
        desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _CUDA_R_32F), "desc")
        sa = lib.cublasLtMatmulDescSetAttribute
        _set(sa, desc, _DESC_TRANSA, ctypes.c_int32(op_a))
        _set(sa, desc, _DESC_TRANSB, ctypes.c_int32(op_b))
        if epilogue != 1:  # 1: CUBLASLT_EPILOGUE_DEFAULT
            _set(sa, desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        if epilogue & 128:  # an aux output: as D, ld n_rows
            _set(sa, desc, _DESC_AUX_LD, ctypes.c_int64(n_rows))
        layouts = []
        for rows, cols, ld in (lay_a, lay_b, (n_rows, n_cols, d_ld or n_rows)):
            lay = ctypes.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dt, rows, cols, ld), "layout")
            layouts.append(lay)
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ps = lib.cublasLtMatmulPreferenceSetAttribute
        _set(ps, pref, _PREF_MAX_WORKSPACE, ctypes.c_uint64(_WORKSPACE_MAX))
        for attr, a in zip(_PREF_MIN_ALIGN, aligns):
            _set(ps, pref, attr, ctypes.c_uint32(a))
        results = (_Heuristic * _CANDIDATES)()
        count = ctypes.c_int(0)
        a_l, b_l, d_l = layouts
        status = lib.cublasLtMatmulAlgoGetHeuristic(handle, desc, a_l, b_l, d_l, d_l, pref, _CANDIDATES, results,
                                                    ctypes.byref(count))
    except RuntimeError:  # a status cuBLASLt refused: this problem keeps the caller's kernel
        return False
    if status != 0 or count.value <= 0 or results[0].state != 0:
        return False
    plan = _Plan()
    plan.handle, plan.desc, plan.a_l, plan.b_l, plan.d_l = handle.value, desc.value, a_l.value, b_l.value, d_l.value
    cands = [(ctypes.addressof(r.algo), int(r.workspaceSize)) for r in results[: count.value] if r.state == 0]
    plan.algo, plan.ws = cands[0]  # the heuristic's first pick (torch's): kept unless timing finds better
    plan.keep = (results, pref, count.value)  # count: how many of results are filled
    plan.aux_ptr = plan.bias_ptr = None  # nothing written yet
    plan.cands = cands if len(cands) > 1 else None
    plan.picked = 0
    return plan


def _plan(lib, x2, weight, epilogue: int, M: int, N: int, K: int, dev: int):
    """The epilogue call's plan: Y^T (N x M) = W X^T, A = W (op T), B = X (op N)."""
    return _make_plan(lib, dev, x2.dtype, _OP_T, (K, N, weight.stride(0)), _OP_N, (K, M, x2.stride(0)), N, M,
                      epilogue, (_alignment(weight), _alignment(x2), 256, 256))  # fmt: skip


def _may_tune() -> bool:
    return TUNE and not torch.are_deterministic_algorithms_enabled() and not torch.cuda.is_current_stream_capturing()


def _tune(plan: _Plan, call, x2: torch.Tensor, dev: int, stream: int) -> None:
    """Time plan.cands (call(algo, workspace pointer, workspace bytes) -> status launches one) and keep
    the fastest in plan.algo / plan.ws (see TUNE_MARGIN). Runs once per problem, on the caller's
    stream, inside the caller's lock; the outputs it writes are written again by the real call."""
    cands = plan.cands
    work = _workspace(x2, dev, max(ws for _, ws in cands), stream)
    ptr = work.data_ptr()
    times = [[] for _ in cands]
    alive = [True] * len(cands)
    events = []  # (candidate, start, end) per round and candidate
    for _ in range(TUNE_ROUNDS):
        for i, (algo, ws) in enumerate(cands):
            if not alive[i]:
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(TUNE_REPS):
                if call(algo, ptr if ws else None, ws) != 0:
                    alive[i] = False  # a candidate that refuses this problem is dropped
            end.record()
            events.append((i, start, end))
    events[-1][2].synchronize()
    for i, start, end in events:
        times[i].append(start.elapsed_time(end))
    med = [statistics.median(t) if alive[i] else float("inf") for i, t in enumerate(times)]
    best = min(range(len(cands)), key=med.__getitem__)
    if alive[0] and med[best] >= med[0] * TUNE_MARGIN:
        best = 0
    if alive[best]:
        plan.algo, plan.ws = cands[best]
        plan.picked = best
    plan.cands = None


def supported(x2: torch.Tensor, weight: torch.Tensor, bias, activation: str, store_pre: bool) -> bool:
    """The problems this path takes: an epilogue for (activation, store_pre), CUDA fp16/bf16, unit
    inner strides, 16-byte aligned rows and N, a contiguous bias of the same dtype."""
    if (activation, store_pre) not in EPILOGUES:
        return False
    if not (x2.is_cuda and x2.dtype in _DTYPES and weight.dtype == x2.dtype and x2.stride(1) == 1
            and weight.stride(1) == 1):
        return False
    es = x2.element_size()
    if (x2.stride(0) * es) % 16 or (weight.stride(0) * es) % 16 or (weight.shape[0] * es) % 16:
        return False
    return bias is None or (bias.dtype == x2.dtype and bias.stride(0) == 1 and bias.data_ptr() % 16 == 0)


_WORKSPACES: dict = {}  # device index -> workspace kept for the legacy default stream


def _workspace(x2: torch.Tensor, dev: int, nbytes: int, stream: int) -> torch.Tensor:
    """A workspace of nbytes for a call on `stream`. On the legacy default stream (0) one buffer per
    device is kept across calls (launches there are serialized, so the next call's use comes after
    this one's): one torch.empty less per call (~5 us of host time on the H100 host). On any other
    stream a fresh one per call (calls on two streams may overlap; CUDA-graph trees' private pool
    must not hand out a buffer that outlives its recording)."""
    if stream != 0:
        return torch.empty(nbytes, dtype=torch.uint8, device=x2.device)
    work = _WORKSPACES.get(dev)
    if work is None or work.numel() < nbytes:
        work = _WORKSPACES[dev] = torch.empty(nbytes, dtype=torch.uint8, device=x2.device)
    return work


def linear_act_epilogue(x2: torch.Tensor, weight: torch.Tensor, bias, activation: str, store_pre: bool):
    """(y, z | None): y = act(x2 @ weight^T + bias), z the pre-activation when store_pre, both
    (M, N) contiguous, from one cuBLASLt call. None where this path cannot take the problem (see
    `supported`) or cuBLASLt / an algorithm for it is not available: the caller then runs its own
    kernel. x2 must be on the current device.

    Host path (this runs every step): one key holds every property `supported` and the algorithm
    depend on (device, dtypes, shapes, strides, the inputs' alignment, the bias's), so a problem
    seen before costs one dict lookup, not the checks; the descriptor's bias / aux pointers are
    written only when they differ from the last call's (a parameter's bias never moves; the
    caching allocator often hands Z the same block). H100 host, session 13: the call cost 37-55 us
    (median), of which cublasLtMatmul itself 15-18, the two outputs' new_empty ~12, the two pointer
    writes 3.4-4.8, and the checks and lookups most of the rest."""
    epilogue = EPILOGUES.get((activation, store_pre))
    if epilogue is None or not x2.is_cuda:
        return None
    dev = x2.get_device()
    M, K = x2.shape
    N = weight.shape[0]
    if bias is not None:
        epilogue |= _EPILOGUE_BIAS_BIT
        bias_key = (bias.dtype, bias.stride(0), bias.dim(), bias.data_ptr() & 15)
    else:
        bias_key = None
    key = (dev, x2.dtype, weight.dtype, M, N, K, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
           epilogue, x2.data_ptr() & 255, weight.data_ptr() & 255, bias_key)  # fmt: skip
    plan = _plans.get(key)
    if plan is None:
        lib = _library() if supported(x2, weight, bias, activation, store_pre) else None
        plan = _plan(lib, x2, weight, epilogue, M, N, K, dev) if lib is not None else False
        if len(_plans) >= 4096:  # many distinct shapes (varying M): start over rather than grow without bound
            _plans.clear()
        _plans[key] = plan
    if not plan:
        return None
    y = x2.new_empty((M, N))
    z = x2.new_empty((M, N)) if store_pre else None
    stream = _raw_stream(dev) if _raw_stream else torch.cuda.current_stream().cuda_stream
    ws = plan.ws
    work = _workspace(x2, dev, ws, stream) if ws else None  # held until enqueued
    lib = _lib
    y_ptr = y.data_ptr()
    with _lock:  # the descriptor carries this call's bias / aux pointers
        status = 0
        if store_pre:
            z_ptr = z.data_ptr()
            if z_ptr != plan.aux_ptr:
                status = _set_pointer(lib, plan, _DESC_AUX_POINTER, z_ptr)
                plan.aux_ptr = z_ptr if status == 0 else None
        if bias is not None and status == 0:
            b_ptr = bias.data_ptr()
            if b_ptr != plan.bias_ptr:
                status = _set_pointer(lib, plan, _DESC_BIAS_POINTER, b_ptr)
                plan.bias_ptr = b_ptr if status == 0 else None
        if status == 0 and plan.cands is not None and _may_tune():
            w_ptr, x_ptr = weight.data_ptr(), x2.data_ptr()
            _tune(plan, lambda algo, wp, wsz: lib.cublasLtMatmul(
                plan.handle, plan.desc, _ONE_ADDR, w_ptr, plan.a_l, x_ptr, plan.b_l, _ZERO_ADDR, y_ptr, plan.d_l,
                y_ptr, plan.d_l, algo, wp, wsz, stream), x2, dev, stream)  # fmt: skip
            ws = plan.ws
            work = _workspace(x2, dev, ws, stream) if ws else None
        if status == 0:
            status = lib.cublasLtMatmul(plan.handle, plan.desc, _ONE_ADDR, weight.data_ptr(), plan.a_l, x2.data_ptr(),
                                        plan.b_l, _ZERO_ADDR, y_ptr, plan.d_l, y_ptr, plan.d_l, plan.algo,
                                        work.data_ptr() if ws else None, ws, stream)  # fmt: skip
    if status != 0:  # a status cuBLASLt refused: the caller runs its own kernel
        return None
    return y, z


def _operand(t: torch.Tensor, rows: int, cols: int):
    """(op, (rows, cols, ld)) of a row-major (rows x cols) operand t as cuBLASLt sees it (column-major):
    unit column stride -> its transpose as is (op N, cols x rows); unit row stride -> op T. None
    where neither stride suits (or the leading dimension is not 16-byte aligned). A single row
    (or column) has no meaningful stride along it (torch reports 1 for (16, 1).t()): its leading
    dimension is then any aligned value >= the other extent."""
    s0, s1 = t.stride()
    es = t.element_size()
    if s1 == 1 or cols == 1:
        ld = s0 if rows > 1 else -(-cols * es // 16) * 16 // es
        if ld >= max(cols, 1) and (ld * es) % 16 == 0:
            return _OP_N, (cols, rows, ld)
    if s0 == 1 or rows == 1:
        ld = s1 if cols > 1 else -(-rows * es // 16) * 16 // es
        if ld >= max(rows, 1) and (ld * es) % 16 == 0:
            return _OP_T, (rows, cols, ld)
    return None


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None):
    """a (M, K) @ b (K, N) through cuBLASLt with the algorithm timed per problem (see the module
    docstring), into a new contiguous (M, N) tensor or into `out` ((M, N), unit column stride, any
    16-byte aligned row stride: e.g. a column slice of a wider buffer), which is returned. None
    where this path does not take the problem (the caller runs torch.mm): CUDA fp16/bf16 on the
    current device, each operand with one unit stride and 16-byte aligned rows, N * element size a
    multiple of 16.

    Column-major, C^T (N x M) = b^T a^T: A = b, B = a."""
    if not (a.is_cuda and a.dtype in _DTYPES and b.dtype is a.dtype and b.is_cuda):
        return None
    M, K = a.shape
    N = b.shape[1]
    dev = a.get_device()
    if out is None:
        ldc, c_align = N, 256
    else:
        if not (out.is_cuda and out.dtype is a.dtype and out.shape == (M, N) and out.stride(1) == 1):
            return None
        ldc, c_align = (out.stride(0) if M > 1 else N), _alignment(out)
    key = (dev, a.dtype, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), a.data_ptr() & 255,
           b.data_ptr() & 255, ldc, c_align, b.get_device(), out.get_device() if out is not None else dev)  # fmt: skip
    plan = _mm_plans.get(key)
    if plan is None:
        opa, opb = _operand(b, K, N), _operand(a, M, K)
        es = a.element_size()
        lib = _library() if (opa and opb and (N * es) % 16 == 0 and (ldc * es) % 16 == 0 and ldc >= N
                             and c_align >= 16 and key[-2] == dev and key[-1] == dev and M and N and K) else None  # fmt: skip
        plan = (_make_plan(lib, dev, a.dtype, opa[0], opa[1], opb[0], opb[1], N, M, 1,
                           (_alignment(b), _alignment(a), c_align, c_align), ldc) if lib is not None else False)  # fmt: skip
        if len(_mm_plans) >= 4096:
            _mm_plans.clear()
        _mm_plans[key] = plan
    if not plan:
        return None
    c = a.new_empty((M, N)) if out is None else out
    stream = _raw_stream(dev) if _raw_stream else torch.cuda.current_stream().cuda_stream
    lib = _lib
    a_ptr, b_ptr, c_ptr = a.data_ptr(), b.data_ptr(), c.data_ptr()

    def run(algo, work_ptr, work_bytes):  # one launch of C = a @ b with the given algorithm
        return lib.cublasLtMatmul(plan.handle, plan.desc, _ONE_ADDR, b_ptr, plan.a_l, a_ptr, plan.b_l, _ZERO_ADDR,
                                  c_ptr, plan.d_l, c_ptr, plan.d_l, algo, work_ptr, work_bytes, stream)  # fmt: skip

    with _lock:
        if plan.cands is not None and _may_tune():
            _tune(plan, run, a, dev, stream)
        ws = plan.ws
        work = _workspace(a, dev, ws, stream) if ws else None  # held until enqueued
        status = run(plan.algo, work.data_ptr() if ws else None, ws)
    return c if status == 0 else None


_mm_plans: dict = {}  # matmul's problem key -> _Plan, or False


def _set_pointer(lib, plan: _Plan, attr: int, ptr: int) -> int:
    _PTR.value = ptr
    return lib.cublasLtMatmulDescSetAttribute(plan.desc, attr, _PTR_ADDR, 8)


_ONE, _ZERO, _PTR = ctypes.c_float(1.0), ctypes.c_float(0.0), ctypes.c_uint64(0)
_ONE_ADDR, _ZERO_ADDR, _PTR_ADDR = ctypes.addressof(_ONE), ctypes.addressof(_ZERO), ctypes.addressof(_PTR)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # an int, faster than a Stream object
