"""Attention: softmax(q @ k^T * scale (+ mask | masked_fill | where) [fp32]) [dropout] @ v, and
F.scaled_dot_product_attention itself -> tritonize.kernels.attention (flash attention).

Generated spellings (2 x 4 x 5 x 2 x 2 = 160 graphs, traced once per process):
    kv:      k, v as they are | repeat_kv(k), repeat_kv(v) (GQA: k[:, :, None].expand(..).reshape(..)),
             folded away because the kernel reads kv head h // n_rep itself
    scale:   s * c | s / c | (q * c) @ k^T | none (c = 1)
    mask:    none | s + m | m + s | s.masked_fill(m, fill) | torch.where(m, s, fill)
    upcast:  no | softmax(s.to(float32)).to(dtype)
    dropout: no | F.dropout(p, training=True)
The head split (view + transpose) and merge (transpose + reshape) around it stay as they are: the
kernel takes SDPA's (B, H, T, D) layout with any strides and returns q's layout, so they remain
views. masked_fill/where become a bool keep-mask when the fill is -inf, an additive mask when it
is a finite value <= -1e30 (HF's finfo.min: rows whose every key is masked are uniform in eager and
in the kernel alike); any other fill is declined, as it would change fully masked rows.
Fully masked rows with a -inf fill are NaN in eager and 0 in the kernel.
"""

from __future__ import annotations

import itertools
import math
import os

import torch
import torch.nn.functional as F

from tritonize.patterns import (
    FLOATS, NOT_THIS_VARIANT, Pattern, dim_eq, first_problem, is_number, register, same_shape, static_int,
    tensor_problem,
)

_MAX_HEAD_DIM = 256


def _repeat_kv(x, esz, rsz):
    return x[:, :, None, :, :].expand(esz).reshape(rsz)


def _attn(q, k, v, c, m, fill, p, dt_up, dt_back, ek, rk, ev, rv, *, gqa, scale, mask, upcast, dropout):
    if gqa:
        k = _repeat_kv(k, ek, rk)
        v = _repeat_kv(v, ev, rv)
    if scale == "q":
        q = q * c
    s = torch.matmul(q, torch.transpose(k, -2, -1))
    if scale == "mul":
        s = s * c
    elif scale == "div":
        s = s / c
    if mask == "add":
        s = s + m
    elif mask == "radd":
        s = m + s
    elif mask == "masked_fill":
        s = torch.masked_fill(s, m, fill)
    elif mask == "where":
        s = torch.where(m, s, fill)
    if upcast:
        s = s.to(dt_up)
    a = torch.softmax(s, -1)
    if upcast:
        a = a.to(dt_back)
    if dropout:
        a = F.dropout(a, p, True, False)
    return torch.matmul(a, v)


def _qkv_guard(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        r = tensor_problem(name, t)
        if r:
            return r
        if t.dim() != 4:
            return f"{name} is {t.dim()}-D, not (B, H, T, D)"
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k, v have different dtypes"
    if q.device != k.device or q.device != v.device:
        return "q, k, v on different devices"
    d = static_int(q.shape[-1])
    if d is None:
        return "head dim is symbolic"
    if d > _MAX_HEAD_DIM:
        return f"head dim {d} > {_MAX_HEAD_DIM}"
    if not (dim_eq(k.shape[-1], q.shape[-1]) and same_shape(v.shape, k.shape)):
        return "k/v head dims differ from q's (or v's shape from k's)"
    if not dim_eq(k.shape[0], q.shape[0]):
        return "q and k have different batch sizes"
    hq, hk = static_int(q.shape[1]), static_int(k.shape[1])
    if hq is None or hk is None or hk < 1 or hq % hk:
        return f"kv heads ({k.shape[1]}) do not divide q heads ({q.shape[1]})"
    return None


# A mask computed in the graph from constants only (HF's causal mask under Dynamo on torch <= 2.13:
# transformers materialises it while tracing instead of passing is_causal) is evaluated once at
# rewrite time; when it equals the causal pattern the call becomes is_causal=True: no (B, T, T)
# mask read per step, and SDPA/our kernel take their causal fast path.
CONST_MASK_MAX_ELEMENTS = 1 << 26  # evaluate at most 64M mask entries (a B8 x 2048^2 bool mask)


def _constant_value(node):
    """The real value of `node` when it depends on no graph input (placeholders, attributes),
    computed by running its ancestors; None when it depends on one or evaluation fails."""
    import torch.fx as fx

    order, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op not in ("call_function", "call_method"):
            return None  # a graph input, a parameter/buffer, a submodule: not a constant
        order.append(n)
        stack.extend(n.all_input_nodes)
    pos = {n: i for i, n in enumerate(node.graph.nodes)}
    env = {}

    def get(a):
        return env[a] if isinstance(a, fx.Node) else a

    try:
        with torch.no_grad():
            for n in sorted(order, key=pos.__getitem__):
                args = fx.node.map_aggregate(n.args, get)
                kwargs = fx.node.map_aggregate(n.kwargs, get)
                env[n] = n.target(*args, **kwargs) if n.op == "call_function" else \
                    getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - anything unexpected: not provable
        return None
    return env[node]


def mask_is_causal(mask_node, tq, tk) -> bool:
    """True when the mask (bool keep-mask, or additive 0 / <= -1e30 float mask) equals SDPA's
    is_causal pattern (key j visible to query i iff j <= i) for every batch and head."""
    from tritonize.fuser.normalize import val as meta_val

    tq, tk = static_int(tq), static_int(tk)
    v = meta_val(mask_node)
    if tq is None or tk is None or tq != tk or not isinstance(v, torch.Tensor):
        return False
    if any(static_int(d) is None for d in v.shape) or v.numel() > CONST_MASK_MAX_ELEMENTS:
        return False
    cache = mask_node.meta.setdefault("tritonize_causal", {})
    if "causal" not in cache:
        val = _constant_value(mask_node)
        ok = isinstance(val, torch.Tensor) and val.dim() >= 2 and tuple(val.shape[-2:]) == (tq, tk)
        if ok:
            if val.dtype == torch.bool:
                keep = val
            else:
                keep = val == 0
                ok = bool(((val == 0) | (val <= -1e30)).all())
            tril = torch.ones(tq, tk, dtype=torch.bool, device=val.device).tril()
            ok = ok and bool((keep == tril).all())
        cache["causal"] = ok
    return cache["causal"]


def _mask_guard(m_val, scores_shape):
    if not isinstance(m_val, torch.Tensor):
        return "mask is not a tensor"
    if m_val.dtype not in FLOATS + (torch.bool,):
        return f"mask dtype {m_val.dtype}"
    if m_val.requires_grad:
        return "mask requires grad (a learned bias): the kernel gives no mask gradient"
    if m_val.dim() > 4:
        return "mask has more than 4 dims"
    # broadcastable to the scores, without growing them
    ms = list(m_val.shape)
    ss = list(scores_shape)[-len(ms):] if ms else []
    for a, b in zip(reversed(ms), reversed(ss)):
        if not (dim_eq(a, 1) or dim_eq(a, b)):
            return f"mask shape {tuple(ms)} does not broadcast to the scores {tuple(scores_shape)}"
    return None


@register
class Attention(Pattern):
    name = "attention"
    family = "attention"
    priority = 70
    kernel = ("attention", "attention")

    def searches(self):
        combos = itertools.product([False, True], ["mul", "div", "q", "none"],
                                   ["none", "add", "radd", "masked_fill", "where"], [False, True], [False, True])
        for gqa, scale, mask, upcast, dropout in combos:
            flags = dict(gqa=gqa, scale=scale, mask=mask, upcast=upcast, dropout=dropout)

            def make(flags):
                def f(q, k, v, c, m, fill, p, dt_up, dt_back, ek, rk, ev, rv):
                    return _attn(q, k, v, c, m, fill, p, dt_up, dt_back, ek, rk, ev, rv, **flags)
                return f

            f = make(flags)
            yield ",".join(f"{a}={b}" for a, b in flags.items()), flags, f

    def guard(self, m):
        f = m.flags
        q, k, v = m.val("q"), m.val("k"), m.val("v")
        r = _qkv_guard(q, k, v)
        if r:
            return r
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        if f["gqa"]:
            r = _repeat_kv_problem(m, H, k.shape[1])
            if r:
                return r
        elif not dim_eq(k.shape[1], H):
            return "k has fewer heads than q without a repeat_kv"
        if f["scale"] == "none":
            scale = 1.0
        else:
            c = m["c"]
            if not is_number(c) or c == 0 or not math.isfinite(c):
                return f"scale {c!r} is not a finite python number"
            scale = 1.0 / c if f["scale"] == "div" else float(c)
        if f["upcast"]:
            if m["dt_up"] is not torch.float32:
                return f"softmax computed in {m['dt_up']}"
            if m["dt_back"] != v.dtype:
                return f"probabilities cast to {m['dt_back']}, not v's dtype"
        else:
            # softmax in the scores' dtype: must be q's (or fp32, computed more precisely by us)
            pass
        mask_kind = f["mask"]
        if mask_kind != "none":
            mv = m.val("m")
            r = _mask_guard(mv, (B, H, Tq, Tk))
            if r:
                return r
            if mask_kind in ("add", "radd"):
                if mv.dtype == torch.bool:
                    return "adding a bool mask"
            else:
                if mv.dtype != torch.bool:
                    return f"{mask_kind} with a non-bool mask"
                fill = m["fill"]
                if not is_number(fill):
                    return f"{mask_kind} fill {fill!r} is not a python number"
                if not (fill == -math.inf or fill <= -1e30):
                    return f"{mask_kind} fill {fill} is not -inf or <= -1e30 (fully masked rows would differ)"
        if f["dropout"]:
            p = m["p"]
            if not is_number(p) or not 0.0 <= p < 1.0:
                return f"dropout p {p!r}"
        out = m.out_val(0)
        if out is None or out.dtype != q.dtype or out.dim() != 4:
            return "output dtype/rank differs from q's"
        if not (same_shape(out.shape[:3], q.shape[:3]) and dim_eq(out.shape[3], v.shape[3])):
            return "scores broadcast beyond (B, H, Tq, Tk)"
        m.scale_value = scale
        return None

    def replace(self, m, fn):
        f = m.flags
        k, v = m["k"], m["v"]
        mask = None
        kind = f["mask"]
        if kind in ("add", "radd"):
            mask = m["m"]
        elif kind in ("masked_fill", "where"):
            fill = float(m["fill"])
            keep = m["m"] if kind == "where" else m.call(torch.logical_not, m["m"])
            if fill == -math.inf:
                mask = keep
            else:
                sdt = m.val("q").dtype if not f["upcast"] else torch.float32
                zero = 0.0
                mask = m.call(torch.where, keep, zero, fill)
                mask = m.method("to", mask, sdt)
        q = m["q"]
        p = float(m["p"]) if f["dropout"] else 0.0
        return [m.call(fn, q, k, v, mask, False, m.scale_value, p, **_seed_kw(m, p))]


# Without a mask tensor, CUDA SDPA in half precision already runs a fused kernel (cuDNN or
# FlashAttention-2 on an H100 with torch 2.11). Replacing it lost whole-model speed there:
# GPT-2 124M B8 T1024 train step 38.7 ms with our kernel vs 30.6 ms with SDPA kept (cuDNN's
# fwd+bwd is ~0.40 ms per layer vs our 0.50, and our op adds ~0.7 ms of host time per layer).
# So by default ("auto") such calls are kept and reported; TRITONIZE_SDPA=replace replaces them
# anyway (the tests do, to cover the kernel inside models). Masked SDPA, the unfused spellings
# (the `attention` pattern) and CPU/fp32 calls are replaced as before.
KEPT_FUSED_SDPA = "kept: SDPA already runs a fused cuDNN/flash kernel here (faster on H100; TRITONIZE_SDPA=replace)"
# the note on a kept SDPA of repeat_kv'd k, v rewritten to tritonize.kernels.sdpa_repeat_kv
REPEAT_RECOMPUTED = "repeat_kv kept for torch's SDPA; k, v saved with their kv heads (recomputed in backward)"


def torch_runs_fused_sdpa(q) -> bool:
    """Whether torch's SDPA runs a fused kernel (cuDNN/flash) for this q (its fake tensor): CUDA,
    half precision, head dim a multiple of 8 up to 256. A module-level function so that the CPU
    tests can pretend it does (monkeypatch) to exercise the kept-SDPA rewrites."""
    d = static_int(q.shape[-1])
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and d is not None \
        and d % 8 == 0 and d <= 256


def sdpa_policy() -> str:
    v = os.environ.get("TRITONIZE_SDPA", "auto").strip().lower()
    if v not in ("auto", "replace"):
        raise ValueError(f"TRITONIZE_SDPA must be 'auto' or 'replace', got {v!r}")
    return v


@register
class SDPA(Pattern):
    name = "sdpa"
    family = "attention"
    priority = 70
    kernel = ("attention", "attention")

    def searches(self):
        # repeat_kv(k), repeat_kv(v) feeding SDPA (transformers' GQA spelling whenever it passes a
        # mask, which it does under Dynamo): the fused call takes the kv heads as they are (our
        # kernel's native GQA; torch's kept SDPA with enable_gqa=True only with the gqa_fold
        # option), so the H-head copies of k and v are neither made nor saved for backward
        # (Llama 12L B4 T2048: 2 x 16.8 MB per layer). Torch's kept SDPA without gqa_fold runs on
        # the repeated heads (faster), through sdpa_repeat_kv: the copies are made but not saved.
        def g(q, k, v, m, p, causal, c, gqa, ek, rk, ev, rv):
            return F.scaled_dot_product_attention(q, _repeat_kv(k, ek, rk), _repeat_kv(v, ev, rv), m, p, causal,
                                                  scale=c, enable_gqa=gqa)

        yield "F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v))", {"repeat": True}, g

        def f(q, k, v, m, p, causal, c, gqa):
            return F.scaled_dot_product_attention(q, k, v, m, p, causal, scale=c, enable_gqa=gqa)

        yield "F.scaled_dot_product_attention", {"repeat": False}, f

    def guard(self, m):
        q, k, v = m.val("q"), m.val("k"), m.val("v")
        r = _qkv_guard(q, k, v)
        if r:
            return r
        if m.flags["repeat"]:
            if _repeat_kv_problem(m, q.shape[1], k.shape[1]):
                return NOT_THIS_VARIANT  # an expand + reshape that is not repeat_kv: the plain spelling applies
        elif not m["gqa"] and not dim_eq(k.shape[1], q.shape[1]):
            return "k has fewer heads than q and enable_gqa is False"
        causal, p, c = m["causal"], m["p"], m["c"]
        if not isinstance(causal, bool):
            return f"is_causal {causal!r} is not a python bool"
        if not is_number(p) or not 0.0 <= p < 1.0:
            return f"dropout_p {p!r}"
        if c is not None and (not is_number(c) or not math.isfinite(c)):
            return f"scale {c!r} is not a python number"
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        if causal and not dim_eq(Tq, Tk):
            return "is_causal with Tq != Tk (SDPA aligns top-left, the kernel bottom-right)"
        m.causal_mask = False
        if m.get("m") is not None:
            if causal:
                return "attn_mask together with is_causal (eager SDPA rejects it)"
            r = _mask_guard(m.val("m"), (B, H, Tq, Tk))
            if r:
                return r
            m.causal_mask = mask_is_causal(m["m"], Tq, Tk)
        out = m.out_val(0)
        if out is None or out.dtype != q.dtype:
            return "output dtype differs from q's"
        m.torch_fused = sdpa_policy() == "auto" and torch_runs_fused_sdpa(q)
        # torch's fused SDPA stays (no mask tensor left): read again by note() and replace()
        m.kept = m.torch_fused and (m.causal_mask or m.get("m") is None)
        # kept with the repeat in front, its H-head copies not saved (sdpa_repeat_kv): see replace()
        m.repeat_recomputed = False
        if m.kept and m.flags["repeat"] and not m.options.get("gqa_fold"):
            # torch 2.11's cuDNN SDPA runs GQA slower than on repeated heads (H100, Llama's
            # B4 H16/8 T2048 D64: 0.64 vs 0.50 ms fwd+bwd): keep the repeat unless memory is the aim.
            # Through AOTAutograd (rest="inductor", cudagraphs) saved-tensor hooks are not traced
            # and its partitioner decides what is saved: the repeat stays as it is (the plain
            # spelling's verdict applies). Otherwise torch's SDPA runs on the repeated heads, but
            # sdpa_repeat_kv keeps the kv heads for backward instead of the H-head copies.
            if m.options.get("aot"):
                return NOT_THIS_VARIANT
            m.repeat_recomputed = True
        if m.torch_fused and m.get("m") is None and not m.flags["repeat"]:
            return KEPT_FUSED_SDPA
        return None

    def note(self, m):
        notes = []
        if m.causal_mask:
            notes.append("constant mask proven causal: is_causal=True" + (" (torch's fused SDPA)" if m.torch_fused else ""))
        if m.repeat_recomputed:
            notes.append(REPEAT_RECOMPUTED)
        elif m.flags["repeat"]:
            notes.append("repeat_kv folded: k, v keep their kv heads" + (" (SDPA enable_gqa=True)" if m.kept else ""))
        return "; ".join(notes)

    def replace(self, m, fn):
        c = m["c"]
        p = float(m["p"])
        if m.causal_mask:
            m["m"].meta["tritonize_drop_if_dead"] = True  # its construction goes once no site reads it
        gqa = True if m.flags["repeat"] else m["gqa"]
        if m.repeat_recomputed:
            # torch's SDPA on the repeated heads, minus the mask as below; dropout as there too
            # (torch draws its RNG, no seed node); k, v are repeat_kv's inputs, the kv heads
            from tritonize.kernels.sdpa_repeat_kv import sdpa_repeat_kv

            n_rep = static_int(m.val("q").shape[1]) // static_int(m.val("k").shape[1])
            return [m.call(sdpa_repeat_kv, m["q"], m["k"], m["v"], n_rep, True if m.causal_mask else m["causal"],
                           None if c is None else float(c), p)]
        if m.kept:
            # the same SDPA call minus the mask (its fused kernel runs) and minus repeat_kv
            return [m.call(F.scaled_dot_product_attention, m["q"], m["k"], m["v"], None, p,
                           True if m.causal_mask else m["causal"], scale=c, enable_gqa=gqa)]
        mask, causal = (None, True) if m.causal_mask else (m.get("m"), m["causal"])
        return [m.call(fn, m["q"], m["k"], m["v"], mask, causal, None if c is None else float(c),
                       p, **_seed_kw(m, p))]


def _repeat_kv_problem(m, h, hkv) -> str | None:
    """None when ek/rk and ev/rv are repeat_kv's: each of the hkv heads expanded n_rep = h / hkv
    times along a new dim 2, then merged back to h heads."""
    h, hkv = static_int(h), static_int(hkv)
    if h is None or hkv is None or hkv == 0 or h % hkv:
        return f"{h} query heads are not a multiple of {hkv} kv heads"
    for name in ("ek", "ev"):
        e = m[name]
        if not (isinstance(e, tuple) and len(e) == 5 and static_int(e[2]) == h // hkv):
            return f"repeat of kv heads {e} is not repeat_kv's"
    for name in ("rk", "rv"):
        e = m[name]
        if not (isinstance(e, tuple) and len(e) == 4 and static_int(e[1]) == h):
            return f"merge of kv heads {e} is not repeat_kv's"
    return None


def _seed_kw(m, p):
    """With dropout, the seed is drawn in the graph (a 0-d CPU tensor node), not as a Python int
    inside the kernel call: Inductor cannot trace an `.item()`, and the graph draws per step."""
    if p == 0.0:
        return {}
    from tritonize.patterns.dropout import seed_node

    return {"seed": seed_node(m)}


_ = first_problem
