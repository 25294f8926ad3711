"""Pattern families: one file per family, each pattern declared once.

A pattern is
  - search functions: plain torch code in the fuser's canonical spelling (see
    tritonize/fuser/normalize.py), generated over the spellings a family has (scale by mul or div,
    mask by add/masked_fill/where, fp32 upcast or not, dropout or not, ...). `searches()` yields
    (variant label, flags, function). Each is traced with `torch.fx.symbolic_trace`; its arguments
    become wildcards that bind graph nodes OR literals (a scale of 0.125, an eps of 1e-5), which
    the guard then reads;
  - a guard: reads the fake tensors (`m.val(name)`: dtype, device, shape, strides) and the bound
    literals; returns None to accept or a reason string to decline (recorded in the report);
  - a replacement: builds the call of a `tritonize.kernels` function in the graph; returns one
    value per value the search function returns.

Registry: `register(PatternClass)` at import of the family module; `all_patterns()` imports every
family and returns instances ordered by priority (larger, more specific patterns first, so e.g.
add+layer_norm is tried before layer_norm, gated MLP before linear->act).

Dependencies point one way: a pattern knows nothing of Dynamo; the fuser knows no kernel by name.
"""

from __future__ import annotations

import importlib
import inspect
import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

FAMILIES = ("attention", "norm", "linear_act", "rotary", "cross_entropy", "dropout")

_REGISTRY: dict[str, "Pattern"] = {}


def register(cls):
    inst = cls()
    _REGISTRY[inst.name] = inst
    return cls


def all_patterns() -> list["Pattern"]:
    for fam in FAMILIES:
        importlib.import_module(f"{__name__}.{fam}")
    return sorted(_REGISTRY.values(), key=lambda p: -p.priority)


def get(name: str) -> "Pattern":
    all_patterns()
    return _REGISTRY[name]


def kernel_fn(module: str, name: str):
    """The public kernel function; raises ImportError/AttributeError with the reason."""
    mod = importlib.import_module(f"tritonize.kernels.{module}")
    return getattr(mod, name)


# ---------------------------------------------------------------------------------------------
# helpers for guards: fake-tensor metadata, possibly symbolic
# ---------------------------------------------------------------------------------------------

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def static_int(s):
    """An int for a static size, None for a symbolic one (never adds a guard)."""
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        try:
            node = s.node
            if node.is_constant() if hasattr(node, "is_constant") else False:
                return int(node.constant) if hasattr(node, "constant") else None
            v = node.maybe_as_int() if hasattr(node, "maybe_as_int") else None
            return v
        except Exception:
            return None
    return None


def dim_eq(a, b) -> bool:
    """Two sizes provably equal without adding a guard (ints, or SymInts with the same expression)."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        try:
            return a.node.expr == b.node.expr
        except Exception:
            return False
    sa, sb = static_int(a), static_int(b)
    return sa is not None and sa == sb


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(dim_eq(x, y) for x, y in zip(a, b))


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def tensor_problem(name: str, t, dtypes=FLOATS, device=None) -> str | None:
    """A reason string when `t` is not a tensor of a supported dtype/device, else None."""
    if not isinstance(t, torch.Tensor):
        return f"{name} is not a tensor with known metadata"
    if dtypes is not None and t.dtype not in dtypes:
        return f"unsupported dtype {str(t.dtype).replace('torch.', '')} for {name}"
    if t.device.type not in ("cuda", "cpu"):
        return f"unsupported device {t.device.type} for {name}"
    if device is not None and t.device != device:
        return f"{name} is on {t.device}, not {device}"
    return None


def first_problem(*reasons) -> str | None:
    for r in reasons:
        if r:
            return r
    return None


# ---------------------------------------------------------------------------------------------
# Pattern and Match
# ---------------------------------------------------------------------------------------------


class Match:
    """One occurrence of a search function in a graph."""

    def __init__(self, pattern, variant: str, flags: dict, bind: dict, nodes: list, returning: list, graph):
        self.pattern = pattern
        self.variant = variant
        self.flags = flags
        self.bind = bind  # search-function argument name -> graph Node or literal
        self.nodes = nodes  # matched graph nodes (the pattern's operations)
        self.returning = returning  # graph nodes standing for the search function's return values
        self.graph = graph
        self.site = ""
        self.note = ""
        self.options = {}  # the rewrite's options (tritonize(..., drop_logits=...))

    def __getitem__(self, name):
        return self.bind[name]

    def get(self, name, default=None):
        return self.bind.get(name, default)

    def val(self, name_or_node):
        from tritonize.fuser.normalize import val

        x = self.bind.get(name_or_node, None) if isinstance(name_or_node, str) else name_or_node
        return val(x)

    def out_val(self, i: int = 0):
        from tritonize.fuser.normalize import val

        return val(self.returning[i])

    def call(self, fn, *args, **kwargs) -> fx.Node:
        """Add `fn(*args, **kwargs)` at the insertion point (the fuser sets it)."""
        return self.graph.call_function(fn, tuple(args), kwargs)

    def method(self, name, *args, **kwargs) -> fx.Node:
        return self.graph.call_method(name, tuple(args), kwargs)

    def getitem(self, x, i) -> fx.Node:
        return self.graph.call_function(operator.getitem, (x, i))


# A guard's answer for "this variant does not apply here, try the next one" without reporting
# the site as skipped (e.g. an optional rewrite the user's options turn off).
NOT_THIS_VARIANT = "not this variant"

# rest="inductor" without an explicit `patterns=` leaves these patterns to Inductor (the rewrite
# reports each site skipped with this reason). Measured on the H100 (session 5, one host each,
# `benchmarks/profile_model.py --exclude`): GPT-2 124M B8 T1024 ran 205k tok/s with all our ops in
# Inductor's graph, 272k without our norms, 377k without our linear -> activation, at about equal
# GPU time (22.4 / 22.4 / 21.4 ms): each of our ops is a Python call in Inductor's otherwise
# generated graph, and this step is host-bound. Llama 12L B4 T2048 was unaffected by leaving the
# norms (209k vs 201-211k tok/s, GPU-bound). Inductor fuses a norm or a linear's activation with
# its neighbours as well as we do; gated MLPs, the LM head + loss and attention stay ours. Rotary
# embeddings are element-wise maps Inductor fuses with the q/k projections' epilogues and views.
LEAVE_TO_INDUCTOR = ("linear_act", "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "rotary_qk", "rotary")
LEFT_TO_INDUCTOR = ("left to Inductor (rest='inductor': measured faster there; "
                    "name it in tritonize(patterns=...) to fuse it anyway)")

# rest="eager" on CUDA without CUDA graphs: each of our ops is a Python call (~150 us of host time
# for forward + backward on the H100 hosts) where torch dispatches from C++. Where torch has one
# fused kernel of its own (nn.LayerNorm's native kernel; cuBLAS + one activation kernel, which is
# also what our linear_act runs at these sizes), a small site saves less GPU time than that call
# costs, and a host-bound step gets slower. Measured (H100, benchmarks/ab_models.py, GPT-2 124M
# B8 T1024, interleaved rounds in one process): tritonize 1.46x eager with our LayerNorms and
# linear->GELU, 1.83x without the norms, 2.01x without both. GPU time saved per call: LayerNorm
# fwd+bwd at 16384x1024 0.164 ms (torch) vs 0.086 ms (ours), i.e. ~5 ps per element (+2 ps for
# the fused residual add); linear_act only fuses its bias gradient into the backward pass (~1 ps
# per output element). The thresholds put the break-even at ~150 us. Sites below them stay torch's
# and the report says why; naming the pattern in tritonize(patterns=...) fuses them anyway, and
# TRITONIZE_SIZE_POLICY=0 turns the rule off (the tests fuse tiny shapes to check numerics).
EAGER_MIN_ELEMENTS = {"layer_norm": 2**25, "add_layer_norm": 2**24, "linear_act": 2**27}


def size_hint(s):
    """An int for a size, the tracing hint for a symbolic one, None if neither is known."""
    v = static_int(s)
    if v is None and isinstance(s, torch.SymInt):
        v = getattr(s.node, "hint", None)
    return v if isinstance(v, int) else None


def small_site_reason(name: str, out) -> str | None:
    """The size policy above: a reason to keep torch's op for a small CUDA site, else None."""
    limit = EAGER_MIN_ELEMENTS.get(name)
    if limit is None or not isinstance(out, torch.Tensor) or out.device.type != "cuda":
        return None
    n = size_hint(out.numel())
    if n is None or n >= limit:
        return None
    return (f"kept torch's: {n} output elements, below {limit} where our kernel's GPU saving would pay "
            "for its Python call (host-bound step; name it in tritonize(patterns=...) to fuse it anyway)")


class Pattern:
    name: str = ""
    family: str = ""
    priority: int = 0
    kernel: tuple[str, str] = ("", "")  # (module under tritonize.kernels, function name)

    def searches(self) -> Iterable[tuple[str, dict, Callable]]:
        raise NotImplementedError

    def guard(self, m: Match) -> str | None:
        return None

    def replace(self, m: Match, fn) -> list:
        raise NotImplementedError

    def escapable(self, m: Match) -> set:
        """Matched intermediates that may also be used outside the match: the replacement must
        then leave them computing what they computed (they are kept while they have users)."""
        return set()

    def unused_inputs(self, m: Match) -> set:
        """Names of wildcards the replacement does not read (checked by the guard only, e.g. the
        slices of an input): the rewrite does not require them to be computed before the call."""
        return set()

    def site_nodes(self, m: Match) -> list:
        """The nodes whose module path names the site in the report (default: all matched)."""
        return []

    def note(self, m: Match) -> str:
        """A remark for the report on a fused site (before the rewrite), or ""."""
        return ""

    # -- compiled search graphs, cached ----------------------------------------------------
    _compiled = None

    def compiled(self) -> list[tuple[str, dict, fx.Graph]]:
        if self._compiled is None:
            out, seen = [], set()
            for label, flags, f in self.searches():
                g = trace_search(f)
                key = str(g)
                if key in seen:
                    continue  # two flag combinations that spell the same graph
                seen.add(key)
                out.append((label, flags, g))
            # larger graphs first: a spelling with dropout must win over the one without
            out.sort(key=lambda t: -len(t[2].nodes))
            self._compiled = out
        return self._compiled

    def kernel_function(self):
        return kernel_fn(*self.kernel)


def trace_search(f: Callable) -> fx.Graph:
    """Trace a search function to a canonical FX graph (unused arguments dropped)."""
    from tritonize.fuser.normalize import normalize

    from tritonize.fuser.normalize import quick_gelu

    tracer = fx.Tracer(autowrap_functions=(quick_gelu,))
    g0 = tracer.trace(f)
    gm = fx.GraphModule(tracer.root, g0)
    normalize(gm, has_meta=False)
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "placeholder" and not n.users:
            g.erase_node(n)
    g.eliminate_dead_code()
    return g


def search_args(f: Callable) -> list[str]:
    return list(inspect.signature(f).parameters)


__all__ = [
    "Pattern", "Match", "register", "dim_eq", "same_shape", "all_patterns", "get", "kernel_fn", "static_int", "is_number",
    "tensor_problem", "first_problem", "FLOATS", "FAMILIES", "NOT_THIS_VARIANT",
]

_ = Any
