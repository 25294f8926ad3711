"""torch's SDPA on repeat_kv'd k, v, without keeping the repeated copies alive for backward.

    out = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), None, dropout_p, is_causal,
                                         scale=scale)        q (B, H, Tq, D), k/v (B, Hkv, Tk, D), H = Hkv * n_rep

Why: transformers' Llama-family attention repeats the kv heads (`repeat_kv`: expand to
(B, Hkv, n_rep, T, D), reshape to (B, H, T, D), a copy) before SDPA. On CUDA in half precision the
sdpa pattern keeps torch's fused (cuDNN/flash) SDPA, and on torch 2.11 it is faster on the repeated
heads than with enable_gqa=True on the kv heads (H100, B4 H16/8 T2048 D64: 0.50 vs 0.64 ms
fwd+bwd; tritonize(gqa_fold=True) takes the GQA call anyway). But SDPA's autograd node saves its
inputs, so the two H-head copies stay alive from forward to backward: 2 x 16.8 MB per layer on
Llama 12L B4 T2048 (bf16, H16/8, D64).

Measured (H100, torch 2.11, that layer shape x 12, q/k/v made as in Llama so that nothing else
keeps the un-repeated k/v): held after forward 774 -> 582 MiB, peak fwd+bwd 1046 -> 887 MiB. The
net saving is half the copies' size at n_rep = 2 (16 MiB per layer, not 32), because the
un-repeated k and v, which nothing kept before (the repeat copied them), are now kept; SDPA with
enable_gqa=True keeps exactly the same (582 MiB). The price: the repeats are made again in
backward, +23 to +59 us of GPU time per layer fwd+bwd (0.52-0.55 -> 0.54-0.61 ms; more when k/v
are strided views), and the hooks' host time (~20 us per call each way for the C++ -> Python hook
calls themselves, plus the two repeats in backward).

Design: the repeat and the SDPA call run as before (same kernel, same values), but the SDPA call
runs under `torch.autograd.graph.saved_tensors_hooks`. Its pack hook recognises the repeated k/v
(or a view of one) by storage and stores a small record instead: the un-repeated k or v, n_rep, and
the saved view's geometry; the unpack hook makes a fresh repeat in backward (one (B, H, T, D) copy,
alive only while that node's backward runs). Every other saved tensor (q, the output, the
logsumexp, a dropout's philox seed/offset) passes through unchanged. The gradients of k and v still
flow through the repeat's own autograd nodes (expand + reshape: summed over each group), exactly
as without the hooks; only what SDPA's node holds between forward and backward changes.

Correctness notes (each is tested in tests/fuser/test_sdpa_repeat_kv.py):
- The hooks cover only the SDPA call, not the repeat: the repeat saves nothing anyway, and no
  other op's saved tensors are touched.
- Only a repeat that made a copy is intercepted: a repeat that is a view (Hkv == 1, or n_rep == 1,
  where torch returns a stride-0/plain view of k) shares k's storage, saving it costs nothing, and
  matching on that storage could catch q or v when they are views of one fused qkv projection.
  A copy's storage belongs to that repeat alone, so "same storage" is exact there.
- Version counters: autograd does not check the versions of tensors that went through saved-tensor
  hooks (torch/csrc/autograd/saved_variable.cpp), so the hooks check them: every tensor passed
  through records its version at pack time (a detach shares the version counter) and unpack raises
  autograd's "modified by an inplace operation" error if it moved. For the repeated k/v the check
  is on the un-repeated k/v instead: k_rep itself is a fresh temporary nobody else can modify,
  but it is rebuilt from k, so k must not change before backward. (Eager would allow modifying k in
  place after this call, since it saved a copy; here that raises instead of giving wrong gradients.)
- Dropout: SDPA draws its own RNG; its saved philox seed/offset tensors pass through unchanged,
  so backward regenerates the same mask as without the hooks.
- Outer saved-tensor hooks (torch.utils.checkpoint(use_reentrant=False), save_on_cpu): only the
  innermost hooks apply, so ours would silently bypass the user's. Instead they compose: what we
  pass through goes through the outer pack/unpack, and the record holds the outer-packed small k/v.
- Double backward (create_graph=True): autograd re-attaches the saved tensor's grad_fn to what
  unpack returns, so a rebuilt k_rep is differentiated through the original repeat. torch's fused
  SDPA backends have no double backward (torch raises, as without the hooks); the math fallback
  saves derived copies (k_rep * scale, ...), not k_rep, so the hooks do not change what it saves.
- Fake/meta tensors (shape propagation in the fuser), tensor subclasses and contexts where
  saved-tensor hooks are disabled take the plain path (repeat + SDPA, no hooks).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["sdpa_repeat_kv", "repeat_kv"]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: (B, Hkv, T, D) -> (B, Hkv * n_rep, T, D), kv head h // n_rep for
    head h (a copy unless n_rep == 1 or Hkv == 1)."""
    b, h, t, d = x.shape
    return x.unsqueeze(2).expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _inplace_error(t: torch.Tensor, saved: int, what: str) -> RuntimeError:
    return RuntimeError(
        f"one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{t.type()} {list(t.shape)}] ({what}, saved by tritonize's sdpa_repeat_kv) is at version "
        f"{t._version}; expected version {saved} instead.")


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


class _Outer:
    """A saved tensor passed through to the outer hooks: what their pack made of it."""

    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


class _Repeated:
    """A saved repeated k/v (or a view of one): the un-repeated tensor (detached, with its version;
    or the outer hooks' packing of it), n_rep, the repeat's shape, and the saved view's geometry
    when it is not the repeat itself."""

    __slots__ = ("src", "version", "outer", "n_rep", "size", "view")

    def __init__(self, src, version, outer, n_rep, size, view):
        self.src, self.version, self.outer, self.n_rep, self.size, self.view = src, version, outer, n_rep, size, view


class _SavedRepeats:
    """pack/unpack hooks for one SDPA call. Holds no reference to the repeated tensors (that is
    the point): only their storages' addresses, valid while the call runs (the caller keeps the
    repeats alive for its duration, so no other storage can get those addresses meanwhile).

    Host time matters here (one pack per saved tensor in forward, one unpack each in backward, on
    every layer; torch's fused SDPA is kept because it is fast), so the common path is short:
    one storage-address lookup, a detach and a version read per saved tensor."""

    __slots__ = ("by_ptr", "outer")

    def __init__(self):
        self.by_ptr = {}  # repeat's storage data_ptr -> (src, n_rep, (size, stride, offset))
        # the hooks in force outside ours (None: none), composed with ours; see the module docstring
        self.outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def add(self, rep: torch.Tensor, src: torch.Tensor, n_rep: int) -> None:
        """Intercept `rep` = repeat_kv(src, n_rep) when it is a copy of its own (not a view of src)."""
        if type(rep) is not torch.Tensor or rep.layout != torch.strided or rep.device.type == "meta":
            return  # fake tensors (the fuser's shape propagation), subclasses, meta: no interception
        ptr = rep.untyped_storage().data_ptr()
        if ptr == 0 or ptr == src.untyped_storage().data_ptr() or not rep.is_contiguous():
            return  # empty, or a view of src (Hkv == 1): saving it costs nothing
        self.by_ptr[ptr] = (src, n_rep, (tuple(rep.shape), rep.stride(), rep.storage_offset()))

    def pack(self, t):
        try:
            hit = self.by_ptr.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # no storage (a subclass, sparse): not ours
            hit = None
        if hit is None:
            if self.outer is not None:
                return _Outer(self.outer[0](t))
            d = t.detach()  # detached: a saved output holding its own grad_fn would be a reference
            return (d, _version(d))  # cycle; the detach shares t's version counter
        src, n_rep, geo = hit
        view = (tuple(t.shape), t.stride(), t.storage_offset())
        view = None if view == geo else view
        if self.outer is not None:
            return _Repeated(None, None, _Outer(self.outer[0](src)), n_rep, geo[0], view)
        d = src.detach()
        return _Repeated(d, _version(d), None, n_rep, geo[0], view)

    def unpack(self, rec):
        if type(rec) is tuple:
            t, version = rec
            if version is not None and t._version != version:
                raise _inplace_error(t, version, "a tensor saved by SDPA")
            return t
        if type(rec) is _Outer:
            return self.outer[1](rec.packed)
        if rec.outer is not None:
            src = self.outer[1](rec.outer.packed)
        else:
            src = rec.src
            if rec.version is not None and src._version != rec.version:
                raise _inplace_error(src, rec.version, "k or v before repeat_kv")
        # the repeat the forward made, again, with the same layout (contiguous, offset 0; add()
        # checked the forward's was). From a contiguous k/v, torch.stack: same values, and its
        # batched copy is faster (H100, bf16 (4, 8, 2048, 64) -> 16 heads: 14 vs 19 us; host 5 vs
        # 8 us); from a strided one (v as a transposed view of its projection) it is slower (33 vs
        # 27 us), so expand + reshape there.
        if src.is_contiguous():
            r = torch.stack((src,) * rec.n_rep, 2).view(rec.size)
        else:
            b, h, t, d = src.shape
            r = src.unsqueeze(2).expand(b, h, rec.n_rep, t, d).reshape(rec.size)
        if rec.view is not None:
            r = r.as_strided(*rec.view)
        return r

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def sdpa_repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_rep: int, is_causal: bool = False,
                   scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), None, dropout_p,
    is_causal, scale=scale): same kernel, values and gradients, but SDPA's autograd node keeps k and
    v with their Hkv heads and repeats them again in backward instead of keeping the H-head copies."""
    if n_rep == 1:  # transformers' repeat_kv returns its input then: nothing to save memory on
        return F.scaled_dot_product_attention(q, k, v, None, dropout_p, is_causal, scale=scale)
    k_rep, v_rep = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    saved = None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad) \
            and torch._C._autograd._saved_tensors_hooks_is_enabled():
        saved = _SavedRepeats()
        saved.add(k_rep, k, n_rep)
        saved.add(v_rep, v, n_rep)
    hooked = saved is not None and bool(saved.by_ptr)
    # only the SDPA call is hooked (the repeat above saves nothing and is differentiated as usual)
    with saved.hooks() if hooked else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k_rep, v_rep, None, dropout_p, is_causal, scale=scale)
    if hooked:
        saved.by_ptr = {}  # no more packing: drop the references to k and v held for matching
    return out
