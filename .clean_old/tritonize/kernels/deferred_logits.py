"""deferred_linear(h, w, b): logits = F.linear(h, w, b), computed only when something reads them.

Why. A causal LM returns `logits` (N x V: 8192 x 128256 bf16 is 2.1 GB) next to the loss. The
fused LM-head + cross-entropy kernel computes the loss without them, but returning real logits
would still cost the matmul and the 2.1 GB of peak memory, although training loops almost never
read them. `deferred_linear` returns a stand-in instead.

Design.
- `DeferredLogits` is a wrapper tensor subclass (`_make_wrapper_subclass`): it has the logits'
  shape, dtype, device, contiguous strides and requires_grad, but no storage. It holds (detached
  aliases of) h, w and b. Shape/dtype/device queries, `.requires_grad`, `.grad_fn`, `len()` and
  hooks never compute anything.
- `__torch_dispatch__` sees every aten op that reaches the tensor. The first one computes
  F.linear(h, w, b) under no_grad and caches it on the instance (`_cache`); every op then runs on
  plain tensors (the DeferredLogits arguments replaced by the cache, also inside lists and
  kwargs) and returns plain tensors. Views (`logits[0]`, `.view(-1, V)`, `.detach()`) are views
  of the cache, so writes through them and in-place ops on the tensor itself (`logits.div_(2)`,
  `logits[0] = 0`) change the cache, and later reads see the change, exactly as on a real tensor.
  Ops that only need metadata (`torch.zeros_like(logits)`, `logits.new_empty(...)`) do not
  compute the logits, and a dtype cast before any read (`logits.float()`: accelerate applies it
  to every bf16/fp16 model output under mixed precision) returns another DeferredLogits.
- Autocast: deferred_linear casts h, w, b as F.linear would under the caller's autocast, and the
  logits are computed with autocast off, so their dtype does not depend on where they are read.
- Autograd. Autograd runs above `__torch_dispatch__`, so the graph is recorded on the wrapper as
  on any tensor. The wrapper is made by `_DeferredLinear` (an autograd.Function), whose backward
  is F.linear's (dh = g @ W, dW = g^T @ h, db = sum(g)) and needs neither the logits nor the
  cache: loss-only training never computes them, and a gradient that reaches them (e.g.
  `(logits * g).sum().backward()`) is a plain tensor, which autograd accepts for a subclass
  output (it checks the gradient's shape, dtype, device and layout, not its Python type).

The staleness rule. The logits are F.linear of h, w, b *as they were at the forward*. The
versions of h, w and b (torch's in-place counters, shared with their detached aliases) are
recorded when the wrapper is made; if any of them changed before the first read (e.g.
`optimizer.step()` updated the LM head's weight in place, then the loop logged the logits), the
first read raises a RuntimeError instead of returning logits of the new weight. Once computed,
the logits are cached, and later changes to h, w, b do not matter (the wrapper drops them).
Version counters only see writes made through torch ops: `w.data.add_(...)` (a `.data` alias has
its own counter) or a raw-pointer write by a custom kernel are invisible, so code that updates
the LM head that way must read (or `materialize`) the logits first or not defer them. Inference
tensors have no version counter, so inputs made under `torch.inference_mode()` are not deferred
(the logits are computed at once: correct, and inference reads them anyway).

Supported beyond aten ops: `repr`/`str`/`print`, `.tolist()`, `.numpy()`, `np.asarray`,
`.data_ptr()`, `.untyped_storage()` / `.storage()` / `share_memory_()`, dlpack, `.data` (read,
and `= x` with x of the same shape/dtype/strides), `pickle` / `torch.save` / `copy.copy`
(they save a plain tensor with the values), `copy.deepcopy` (a plain copy; like a real non-leaf
tensor, a DeferredLogits that has a grad_fn refuses it). Unsupported, with a clear error: ops
that change the tensor's own metadata in place (`logits.unsqueeze_(0)`, `resize_`, `set_`,
`as_strided_`, an `out=` that resizes it): the wrapper's shape cannot follow them; use the
out-of-place op or `materialize(logits)` first. Not meant for torch.compile tracing: under Dynamo,
or for tensor-subclass inputs (FakeTensor, DTensor, ...), the logits are computed at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ._common import check_arg, check_same_device, check_tensor, linear_backward

__all__ = ["DeferredLogits", "deferred_linear", "materialize"]

_OP = "deferred_linear"

STALE_MESSAGE = (
    "tritonize: the returned logits were deferred (computed on first use from the LM head's inputs) "
    "and the LM head's weight/hidden states changed in place since the forward (e.g. optimizer.step()); "
    "read the logits before that, or call tritonize(..., defer_logits=False)"
)

_aten = torch.ops.aten

# Ops whose result depends only on a DeferredLogits argument's shape/dtype/device (not its values):
# they get a storage-free stand-in with that metadata, so they do not compute the logits.
_METADATA_ONLY = {
    _aten.empty_like, _aten.zeros_like, _aten.ones_like, _aten.full_like, _aten.rand_like,
    _aten.randn_like, _aten.randint_like, _aten.new_empty, _aten.new_empty_strided, _aten.new_zeros,
    _aten.new_ones, _aten.new_full, _aten.is_same_size,
}  # fmt: skip


class DeferredLogits(torch.Tensor):
    """Logits F.linear(h, w, b) computed on first use; see the module docstring.

    Attributes (private): _h, _w, _b (detached aliases, dropped once computed), _versions (their
    in-place counters at creation), _cache (the computed logits or None), _error (set when an op
    left the cache inconsistent with the wrapper's metadata; every later use raises it). The
    values are F.linear(_h, _w, _b) in _h's dtype, then cast to self.dtype if that differs.
    """

    # No __torch_function__ layer: torch.Tensor's default one would re-wrap every result as a
    # DeferredLogits (`as_subclass`). Ops go straight to aten and meet __torch_dispatch__.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, versions: tuple,
                dtype: torch.dtype | None = None):
        shape = (*h.shape[:-1], w.shape[0])
        # No storage: the (N, V) memory is allocated only when the logits are computed. Default
        # strides are contiguous, which the cache is made to match (views replay on it).
        # dtype: h's, or the target of a deferred cast (`logits.float()`, see __torch_dispatch__).
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype or h.dtype, device=h.device,
                                                   requires_grad=False)
        self._h, self._w, self._b = h, w, b
        self._versions = versions
        self._cache = None
        self._error = None
        return self

    def __init__(self, *args, **kwargs):  # everything is set in __new__
        pass

    # --- computing the values ---------------------------------------------------------------

    @property
    def is_materialized(self) -> bool:
        """True once the logits have been computed (by any read of them)."""
        return self._cache is not None

    def _values(self) -> torch.Tensor:
        """The cached logits (plain tensor, no autograd history), computed on the first call."""
        if self._error is not None:
            raise RuntimeError(self._error)
        cache = self._cache
        if cache is None:
            self._check_fresh()
            # Autocast off: the values must have the wrapper's dtype wherever they are first read
            # (deferred_linear already applied the forward's autocast to h, w, b).
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                cache = F.linear(self._h, self._w, self._b)
                if cache.dtype != self.dtype:  # a deferred cast: as the real logits' .to(dtype)
                    cache = cache.to(self.dtype)
            # The wrapper claims contiguous strides, and autograd replays views of it on the cache
            # (as_strided with the wrapper's strides): the two layouts must agree.
            if cache.stride() != self.stride():
                cache = cache.contiguous()
            self._cache = cache
            self._h = self._w = self._b = None  # cached: the inputs are no longer needed here
        return cache

    def _check_fresh(self):
        """Raise the staleness error if h, w or b changed in place since the forward."""
        changed = [name for name, t, v in zip(("hidden states", "weight", "bias"), (self._h, self._w, self._b),
                                              self._versions) if t is not None and t._version != v]  # fmt: skip
        if changed:
            raise RuntimeError(f"{STALE_MESSAGE} (changed in place: {', '.join(changed)})")

    def materialize(self) -> torch.Tensor:
        """A plain tensor with the logits: a view of the cache, differentiable like `self`
        (autograd records it as a view of this tensor), so writes to it show in `self`."""
        return self.view(self.shape)

    # --- every aten op ----------------------------------------------------------------------

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _METADATA_ONLY:
            # A 1-element tensor expanded to the shape: right metadata, no (N, V) memory. Its
            # strides are all 0, so `*_like(memory_format=preserve)` falls back to contiguous,
            # the wrapper's own layout.
            def stand_in(t):
                return torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape)

            return func(*pytree.tree_map_only(cls, stand_in, args), **pytree.tree_map_only(cls, stand_in, kwargs))

        if func is _aten._to_copy.default and _deferred_cast_ok(args, kwargs):
            # `logits.float()` (e.g. accelerate's convert_outputs_to_fp32 on every bf16 output
            # under mixed precision) before any read: another DeferredLogits of the same inputs
            # in the new dtype. Same values as the copy made now (the source's values now are
            # F.linear of the same inputs, whose versions both check), independent of later
            # writes to the source. Autograd records the cast (ToCopyBackward0) above us.
            src = args[0]
            src._check_fresh()  # the cast reads the values now: a stale read fails here, as any other
            return cls(src._h, src._w, src._b, src._versions, dtype=kwargs["dtype"])

        schema = func._schema
        written = _written_arguments(schema, args, kwargs)
        if torch.Tag.inplace_view in func.tags and any(isinstance(a, cls) for a in written.values()):
            # unsqueeze_, transpose_, resize_, set_, as_strided_ change the tensor's own sizes and
            # strides; the wrapper's cannot be changed from here, so they would drift apart.
            raise NotImplementedError(
                f"tritonize: {func} changes the deferred logits' shape/strides in place, which a "
                "DeferredLogits cannot follow; use the out-of-place op, or call "
                "tritonize.kernels.deferred_logits.materialize(logits) first")

        u_args = pytree.tree_map_only(cls, cls._values, args)
        u_kwargs = pytree.tree_map_only(cls, cls._values, kwargs)
        out = func(*u_args, **u_kwargs)

        if not written:
            # A fresh result or a view. Never hand out the cache object itself (autograd would
            # attach view metadata to it); no aten op does, but keep the invariant explicit.
            caches = {id(a._cache) for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, cls)}
            return pytree.tree_map_only(
                torch.Tensor, lambda t: _aten.alias.default(t) if id(t) in caches else t, out)
        # In-place / out= op: its returns alias the written arguments; return the DeferredLogits
        # object itself where it was written, so `logits.div_(2) is logits` and identity holds.
        for a in written.values():
            if isinstance(a, cls) and (a._cache.shape != a.shape or a._cache.stride() != a.stride()):
                a._error = (f"tritonize: {func} resized the deferred logits' values to "
                            f"{tuple(a._cache.shape)} (out= into a tensor of another shape), which a "
                            f"DeferredLogits of shape {tuple(a.shape)} cannot follow")  # fmt: skip
                raise RuntimeError(a._error)
        return _realias_returns(schema, written, out)

    # --- Python-level methods that do not go through aten dispatch ----------------------------

    def __repr__(self, *, tensor_contents=None):
        # torch's repr reads the values through `self.detach()` (dispatched: computes them) and
        # appends grad_fn/requires_grad from the wrapper, so it prints like the real tensor.
        return torch._tensor_str._str(self, tensor_contents=tensor_contents)

    @property
    def data(self):
        # Reading: torch's getter (a detached alias through dispatch: the computed values).
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new):
        # torch's setter would swap the storage-free wrapper's own (unused) storage and leave the
        # values behind; set the values instead (as `t.data = x` does, they then share x's memory).
        if not (isinstance(new, torch.Tensor) and type(new) in (torch.Tensor, torch.nn.Parameter)
                and new.shape == self.shape and new.dtype == self.dtype and new.device == self.device
                and new.stride() == self.stride()):  # fmt: skip
            raise NotImplementedError(
                "tritonize: `logits.data = x` on deferred logits takes only a plain tensor of the same shape, dtype, "
                f"device and (contiguous) strides {tuple(self.shape)} {self.dtype} {self.device}; "
                "call tritonize.kernels.deferred_logits.materialize(logits) first")
        self._cache = new.detach()
        self._h = self._w = self._b = None
        self._error = None

    def tolist(self):
        return self._values().tolist()

    def numpy(self, *, force: bool = False):
        # Through the differentiable view, so a tensor requiring grad refuses as a real one does
        # ("Can't call numpy() on Tensor that requires grad") unless force=True.
        return self.materialize().numpy(force=force)

    def data_ptr(self) -> int:
        return self._values().data_ptr()

    def untyped_storage(self):
        # Also what `.storage()`, `share_memory_()` and storage-identity checks go through.
        return self._values().untyped_storage()

    def __dlpack__(self, *args, **kwargs):
        return self.materialize().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._values().__dlpack_device__()

    def __reduce_ex__(self, proto):
        # pickle / torch.save / copy.copy: a plain tensor with the values (the default would
        # pickle the storage-free wrapper). Like a real tensor's, it keeps requires_grad and
        # loads as a leaf. A detached alias, so the cache's own flags are not touched.
        plain = self._values().detach()
        plain.requires_grad_(self.requires_grad)
        return plain.__reduce_ex__(proto)

    def __deepcopy__(self, memo):
        if not self.is_leaf:  # torch's rule for every tensor: same message
            return torch.Tensor.__deepcopy__(self, memo)
        if id(self) in memo:
            return memo[id(self)]
        with torch.no_grad():
            new = self._values().clone()
        new.requires_grad_(self.requires_grad)
        if self.grad is not None:
            new.grad = self.grad.__deepcopy__(memo)
        memo[id(self)] = new
        return new


def _deferred_cast_ok(args, kwargs) -> bool:
    """True for `_to_copy` that only changes a not-yet-computed DeferredLogits' floating dtype."""
    src = args[0] if len(args) == 1 else None
    if not isinstance(src, DeferredLogits) or src._cache is not None or src._error is not None:
        return False
    dtype = kwargs.get("dtype")
    device = kwargs.get("device")
    return (dtype is not None and dtype.is_floating_point and (device is None or device == src.device)
            and kwargs.get("layout") in (None, torch.strided) and not kwargs.get("pin_memory")
            and kwargs.get("memory_format") in (None, torch.preserve_format, torch.contiguous_format))  # fmt: skip


def _written_arguments(schema, args, kwargs) -> dict:
    """{alias set name: argument} for the arguments the op writes (`Tensor(a!) self`, `out=`)."""
    written = {}
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is not None and info.is_write:
            value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
            for name in info.before_set:
                written[name] = value
    return written


def _realias_returns(schema, written, out):
    """`out` with each return that aliases a written DeferredLogits replaced by that object."""
    outs = out if isinstance(out, tuple) else (out,)
    fixed = []
    for ret, value in zip(schema.returns, outs):
        info = ret.alias_info
        if info is not None and info.is_write:
            for name in info.before_set:
                if isinstance(written.get(name), DeferredLogits):
                    value = written[name]
        fixed.append(value)
    fixed.extend(outs[len(fixed):])
    return tuple(fixed) if isinstance(out, tuple) else fixed[0]


class _DeferredLinear(torch.autograd.Function):
    """logits = F.linear(h, w, b) as a DeferredLogits; backward is F.linear's and never needs
    the logits. The gradient arrives as a plain tensor (ops on the wrapper return plain tensors),
    possibly non-contiguous or expanded (stride 0): `reshape` and `mm` take any strides."""

    @staticmethod
    def forward(ctx, h, w, b, versions):
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        # Only what the requested gradients read: dh needs w, dW needs h, db neither.
        ctx.save_for_backward(w if need_dh else None, h if need_dw else None)
        ctx.set_materialize_grads(False)  # no gradient reached the logits: return None, compute nothing
        # Detached aliases: the wrapper must not keep a graph alive; detach() shares the version
        # counter, so the staleness check still sees in-place changes of h, w, b.
        return DeferredLogits(h.detach(), w.detach(), None if b is None else b.detach(), versions)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None
        w, h = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        dh, dw, db = linear_backward(g, h, w, need_dh, need_dw, need_db, g.dtype)
        return dh, dw, db, None


def _versions(*tensors) -> tuple | None:
    """In-place counters of the inputs at the forward; None when one cannot be tracked."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
        elif t.is_inference():  # no version counter: staleness would go unseen
            return None
        else:
            out.append(t._version)
    return tuple(out)


def deferred_linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(h, w, b) as a DeferredLogits: computed (and cached) by the first op that reads it.

    h: (..., H), w: (V, H), b: (V,) or None; one floating dtype, one device. The result has shape
    (..., V), h's dtype and device, and a grad_fn when h, w or b requires grad (F.linear's
    gradients; computing them never computes the logits). See the module docstring for the
    staleness rule: a read after h, w or b changed in place raises instead of returning stale or
    wrong values.
    """
    check_tensor(_OP, "h", h, dtypes=None)
    check_tensor(_OP, "w", w, dtypes=None)
    check_tensor(_OP, "b", b, dtypes=None, optional=True)
    if torch.is_autocast_enabled(h.device.type):
        # F.linear under autocast runs on its inputs cast to the autocast dtype (fp64 excepted);
        # cast them now, as it would, so the wrapper's dtype and values are the real logits'
        # wherever they are read (materialising runs with autocast off). A cast input is a fresh
        # copy holding the forward's values, so no later in-place change can make it stale.
        cast = torch.get_autocast_dtype(h.device.type)
        h, w, b = (t.to(cast) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                   for t in (h, w, b))  # fmt: skip
    if not h.dtype.is_floating_point:
        raise TypeError(f"tritonize.{_OP}: argument 'h' must have a floating dtype, got {h.dtype}")
    for name, t in (("w", w), ("b", b)):
        if t is not None and t.dtype != h.dtype:
            raise TypeError(f"tritonize.{_OP}: argument '{name}' has dtype {t.dtype}, but h has {h.dtype}")
    check_same_device(_OP, h=h, w=w, b=b)
    check_arg(_OP, "h", h.dim() >= 1, "must have at least 1 dimension (..., H), got a scalar")
    check_arg(_OP, "w", w.dim() == 2, f"must be 2-D (V, H), got shape {tuple(w.shape)}")
    check_arg(_OP, "w", w.shape[1] == h.shape[-1],
              f"has shape {tuple(w.shape)}: expected (V, {h.shape[-1]}) for h of shape {tuple(h.shape)}")  # fmt: skip
    if b is not None:
        check_arg(_OP, "b", b.shape == (w.shape[0],), f"has shape {tuple(b.shape)}: expected ({w.shape[0]},)")

    versions = _versions(h, w, b)
    # Compute at once where deferring is impossible or pointless, always with the same values:
    # untrackable inputs (inference tensors), tensor subclasses (FakeTensor, DTensor, another
    # DeferredLogits...: a wrapper around them would break their own dispatch), Dynamo tracing.
    plain = all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in (h, w, b))
    if versions is None or not plain or torch.compiler.is_compiling():
        return F.linear(h, w, b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, w, b)):
        return _DeferredLinear.apply(h, w, b, versions)
    return DeferredLogits(h.detach(), w.detach(), None if b is None else b.detach(), versions)


def materialize(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with t's values: for a DeferredLogits, computes them (if not yet) and
    returns a differentiable view of them (writes to it show in t); any other tensor as is."""
    return t.materialize() if isinstance(t, DeferredLogits) else t
