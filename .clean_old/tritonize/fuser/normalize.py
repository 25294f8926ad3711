"""normalize: rewrite a torch-level FX graph into one canonical spelling per operation.

Dynamo (and `torch.fx.symbolic_trace`) hand us the code as the model wrote it: `x.softmax(-1)`,
`F.softmax(x, dim=-1, dtype=torch.float32)`, `torch.nn.functional.softmax(x, -1)`, `a @ b`,
`torch.bmm(a, b)`, `x.transpose(2, 3)`, `nn.Linear` modules, transformers' `Conv1D` (an `addmm`
between two views), activations written out by hand inside modules (`NewGELUActivation`), ... A
pattern is written once, against the canonical form this pass produces:

    op                 canonical node (call_function unless said otherwise; every argument filled)
    linear             F.linear(x, w, b)                      <- nn.Linear, Conv1D's view/addmm/view
    layer_norm         F.layer_norm(x, shape, w, b, eps)      <- nn.LayerNorm
    rms_norm           F.rms_norm(x, shape, w, eps)           <- nn.RMSNorm
    activations        F.gelu(x, approximate=...), torch.relu, F.silu, torch.sigmoid, torch.tanh,
                       quick_gelu (below)                     <- nn.GELU/ReLU/..., methods, and any
                                                                 leaf module whose element-wise body
                                                                 computes one of them (checked
                                                                 numerically, see _fold_activation_modules)
    softmax            torch.softmax(x, dim)                  <- F.softmax, x.softmax, dtype= becomes a cast
    log_softmax        torch.log_softmax(x, dim)
    dropout            F.dropout(x, p, True, False)           <- nn.Dropout; removed when p == 0 or eval
    matmul             torch.matmul(a, b)                     <- a @ b, torch.bmm, a.matmul(b)
    transpose          torch.transpose(x, d0, d1)             <- x.transpose, swapaxes, permute of the
                                                                 last two dims; dims negative, d0 < d1
    flatten            x.flatten(start, end) (call_method)    <- torch.flatten, keyword dims
    casts              x.to(dtype) (call_method "to")         <- .float(), .half(), .type(dtype),
                                                                 .to(dtype=..), .to(device, dtype); a cast
                                                                 to the dtype/device x already has is removed
    arithmetic         operator.mul/add/sub/truediv(a, b)     <- torch.mul, x.mul, ...; a python scalar
                                                                 operand of mul/add goes second
    neg, cat           operator.neg(x), torch.cat(tensors, dim) <- torch.neg, x.neg(), torch.concat, dim=
    pow, rsqrt, mean   torch.pow(x, e), torch.rsqrt(x), torch.mean(x, dim, keepdim)
    masked_fill/where  torch.masked_fill(x, m, v), torch.where(c, a, b)
    losses             F.cross_entropy(all 8 args), F.nll_loss(all 7 args)
    sdpa               F.scaled_dot_product_attention(q, k, v, mask, p, causal, scale=, enable_gqa=)

Every rewrite preserves what the graph computes (a removed cast/dropout is an identity). New nodes get
a fake value in `meta["val"]` (computed under the graph's fake mode) so guards can read shapes and
dtypes, and the `nn_module_stack` of the node they replace (for the report's site names).
"""

from __future__ import annotations

import math
import operator
import os
import sys
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

REQ = object()  # marks a required argument in the signature tables below


def quick_gelu(x):
    """x * sigmoid(1.702 x): the canonical target for QuickGELU (CLIP-style) activations."""
    return x * torch.sigmoid(1.702 * x)


# canonical name -> (target, positional [(name, default)], keyword-only [(name, default)])
CANON: dict[str, tuple[Callable, list, list]] = {
    "linear": (F.linear, [("input", REQ), ("weight", REQ), ("bias", None)], []),
    "layer_norm": (
        F.layer_norm,
        [("input", REQ), ("normalized_shape", REQ), ("weight", None), ("bias", None), ("eps", 1e-5)],
        [],
    ),
    "rms_norm": (F.rms_norm, [("input", REQ), ("normalized_shape", REQ), ("weight", None), ("eps", None)], []),
    "gelu": (F.gelu, [("input", REQ)], [("approximate", "none")]),
    "relu": (torch.relu, [("input", REQ)], []),
    "silu": (F.silu, [("input", REQ)], []),
    "sigmoid": (torch.sigmoid, [("input", REQ)], []),
    "tanh": (torch.tanh, [("input", REQ)], []),
    "softmax": (torch.softmax, [("input", REQ), ("dim", REQ)], []),
    "log_softmax": (torch.log_softmax, [("input", REQ), ("dim", REQ)], []),
    "dropout": (F.dropout, [("input", REQ), ("p", 0.5), ("training", True), ("inplace", False)], []),
    "matmul": (torch.matmul, [("input", REQ), ("other", REQ)], []),
    "transpose": (torch.transpose, [("input", REQ), ("dim0", REQ), ("dim1", REQ)], []),
    "rsqrt": (torch.rsqrt, [("input", REQ)], []),
    "pow": (torch.pow, [("input", REQ), ("exponent", REQ)], []),
    "mean": (torch.mean, [("input", REQ), ("dim", REQ), ("keepdim", False)], []),
    "masked_fill": (torch.masked_fill, [("input", REQ), ("mask", REQ), ("value", REQ)], []),
    "where": (torch.where, [("condition", REQ), ("input", REQ), ("other", REQ)], []),
    "cross_entropy": (
        F.cross_entropy,
        [("input", REQ), ("target", REQ), ("weight", None), ("size_average", None), ("ignore_index", -100),
         ("reduce", None), ("reduction", "mean"), ("label_smoothing", 0.0)],
        [],
    ),
    "nll_loss": (
        F.nll_loss,
        [("input", REQ), ("target", REQ), ("weight", None), ("size_average", None), ("ignore_index", -100),
         ("reduce", None), ("reduction", "mean")],
        [],
    ),
    "sdpa": (
        F.scaled_dot_product_attention,
        [("query", REQ), ("key", REQ), ("value", REQ), ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False)],
        [("scale", None), ("enable_gqa", False)],
    ),
    "mul": (operator.mul, [("input", REQ), ("other", REQ)], []),
    "add": (operator.add, [("input", REQ), ("other", REQ)], []),
    "sub": (operator.sub, [("input", REQ), ("other", REQ)], []),
    "truediv": (operator.truediv, [("input", REQ), ("other", REQ)], []),
    "neg": (operator.neg, [("input", REQ)], []),
    "cat": (torch.cat, [("tensors", REQ), ("dim", 0)], []),
}

# where the same op arrives under another name: call_function targets, then call_method names.
# Source signatures differ from the canonical one only where a second table entry says so.
_FUNCTION_SOURCES: dict[Any, str] = {
    F.linear: "linear",
    F.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm",
    F.rms_norm: "rms_norm",
    torch.rms_norm: "rms_norm",
    F.gelu: "gelu",
    torch.relu: "relu",
    F.relu: "relu",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch.log_softmax: "log_softmax",
    F.log_softmax: "log_softmax",
    F.dropout: "dropout",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    torch.bmm: "matmul",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.rsqrt: "rsqrt",
    torch.pow: "pow",
    operator.pow: "pow",
    torch.mean: "mean",
    torch.masked_fill: "masked_fill",
    torch.where: "where",
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "nll_loss",
    F.scaled_dot_product_attention: "sdpa",
    torch.mul: "mul",
    operator.mul: "mul",
    torch.add: "add",
    operator.add: "add",
    torch.sub: "sub",
    operator.sub: "sub",
    torch.div: "truediv",
    torch.true_divide: "truediv",
    operator.truediv: "truediv",
    torch.neg: "neg",
    operator.neg: "neg",
    torch.cat: "cat",
    torch.concat: "cat",
}
_METHOD_SOURCES = {
    "softmax": "softmax", "log_softmax": "log_softmax", "matmul": "matmul", "__matmul__": "matmul",
    "transpose": "transpose", "swapaxes": "transpose", "rsqrt": "rsqrt", "pow": "pow", "__pow__": "pow",
    "mean": "mean", "masked_fill": "masked_fill", "mul": "mul", "add": "add", "sub": "sub", "div": "truediv",
    "true_divide": "truediv", "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "neg": "neg", "__neg__": "neg",
}
# source-specific extra parameters: F.softmax(input, dim, _stacklevel, dtype); torch.softmax(x, dim, dtype)
_EXTRA = {
    (F.softmax, "softmax"): [("input", REQ), ("dim", None), ("_stacklevel", 3), ("dtype", None)],
    (F.log_softmax, "log_softmax"): [("input", REQ), ("dim", None), ("_stacklevel", 3), ("dtype", None)],
    (torch.softmax, "softmax"): [("input", REQ), ("dim", REQ), ("dtype", None)],
    (torch.log_softmax, "log_softmax"): [("input", REQ), ("dim", REQ), ("dtype", None)],
    ("method", "softmax"): [("input", REQ), ("dim", REQ), ("dtype", None)],
    ("method", "log_softmax"): [("input", REQ), ("dim", REQ), ("dtype", None)],
    (F.relu, "relu"): [("input", REQ), ("inplace", False)],
    (F.silu, "silu"): [("input", REQ), ("inplace", False)],
    (torch.add, "add"): [("input", REQ), ("other", REQ), ("alpha", 1)],
    ("method", "add"): [("input", REQ), ("other", REQ), ("alpha", 1)],
    (torch.sub, "sub"): [("input", REQ), ("other", REQ), ("alpha", 1)],
    ("method", "sub"): [("input", REQ), ("other", REQ), ("alpha", 1)],
    (torch.div, "truediv"): [("input", REQ), ("other", REQ), ("rounding_mode", None)],
    ("method", "div"): [("input", REQ), ("other", REQ), ("rounding_mode", None)],
    (torch.mean, "mean"): [("input", REQ), ("dim", None), ("keepdim", False), ("dtype", None)],
    ("method", "mean"): [("input", REQ), ("dim", None), ("keepdim", False), ("dtype", None)],
    (torch.masked_fill, "masked_fill"): [("input", REQ), ("mask", REQ), ("value", REQ)],
}
_ELEMENTWISE_FUNCS = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, operator.neg, torch.mul, torch.add,
    torch.sub, torch.div, torch.pow, torch.tanh, torch.sigmoid, torch.erf, torch.exp, torch.sqrt, torch.rsqrt,
    torch.relu, F.relu, F.gelu, F.silu, torch.neg, torch.reciprocal, F.sigmoid, F.tanh, torch.clamp, quick_gelu,
}
_ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "pow", "tanh", "sigmoid", "erf", "exp", "sqrt", "rsqrt", "neg",
                        "relu", "__mul__", "__add__", "__rmul__", "__radd__", "__truediv__", "__pow__", "reciprocal"}

# canonical activation name (the kernels' ACTIVATIONS names) -> a reference to test a module body against
ACTIVATION_CANDIDATES: dict[str, Callable] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": torch.relu,
    "quick_gelu": quick_gelu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def canonical_activation_call(name: str):
    """(target, kwargs) of the canonical node for an activation name."""
    if name == "gelu":
        return F.gelu, {"approximate": "none"}
    if name == "gelu_tanh":
        return F.gelu, {"approximate": "tanh"}
    return {"silu": F.silu, "relu": torch.relu, "quick_gelu": quick_gelu, "sigmoid": torch.sigmoid,
            "tanh": torch.tanh}[name], {}


# ---------------------------------------------------------------------------------------------
# fake values: guards read node.meta["val"] (fake tensors); new nodes get one computed here
# ---------------------------------------------------------------------------------------------


def val(x):
    """The fake (or real) tensor a node stands for, or None; literals pass through."""
    if isinstance(x, fx.Node):
        v = x.meta.get("val", x.meta.get("example_value"))
        return v
    return x


def _fake_mode_of(nodes):
    # the tensors' own mode (the ambient tracing context may hold a different one)
    for n in nodes:
        v = val(n) if isinstance(n, fx.Node) else None
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def propagate(node: fx.Node, like: fx.Node | None = None):
    """Give a newly created node `meta["val"]` (and the module stack of `like`); best effort."""
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta and key not in node.meta:
                node.meta[key] = like.meta[key]
    inputs = node.all_input_nodes
    if any(val(n) is None for n in inputs):
        return
    mode = _fake_mode_of(inputs)
    if mode is None and not inputs and like is not None:
        mode = _fake_mode_of([like])  # a node with no inputs (a seed draw): never run it for real

    def conv(a):
        return val(a) if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, conv)
    kwargs = fx.node.map_aggregate(node.kwargs, conv)
    try:
        import contextlib

        ctx = mode if mode is not None else contextlib.nullcontext()
        if mode is None and any(isinstance(val(n), torch.Tensor) for n in inputs):
            return  # real tensors in meta (should not happen): do not compute on them
        with ctx:
            if node.op == "call_function":
                out = node.target(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                return
        node.meta["val"] = out
    except Exception as e:
        if os.environ.get("TRITONIZE_LOG", "").lower() == "debug":
            print(f"[tritonize] no fake value for {node.format_node()}: {type(e).__name__}: {e}", file=sys.stderr)


def _rank(x) -> int | None:
    v = val(x)
    return v.dim() if isinstance(v, torch.Tensor) else None


def _new(graph: fx.Graph, op: str, target, args, kwargs, like: fx.Node) -> fx.Node:
    with graph.inserting_before(like):
        n = graph.create_node(op, target, tuple(args), dict(kwargs))
    propagate(n, like)
    return n


def _replace(old: fx.Node, new) -> None:
    old.replace_all_uses_with(new)
    if isinstance(new, fx.Node):
        for key in ("nn_module_stack",):
            if key in old.meta and key not in new.meta:
                new.meta[key] = old.meta[key]
    old.graph.erase_node(old)


# ---------------------------------------------------------------------------------------------
# argument binding
# ---------------------------------------------------------------------------------------------


def _bind(params, args, kwargs, kwonly=()):
    """Bind call arguments to a signature table; None if they do not fit."""
    out = {}
    if len(args) > len(params):
        return None
    for (name, default), a in zip(params, args):
        out[name] = a
    names = {p[0] for p in params} | {p[0] for p in kwonly}
    for k, v in kwargs.items():
        if k not in names or k in out:
            return None
        out[k] = v
    for name, default in list(params) + list(kwonly):
        if name not in out:
            if default is REQ:
                return None
            out[name] = default
    return out


def _canonical_node(graph, node, name, bound):
    target, params, kwonly = CANON[name]
    args = [bound[p[0]] for p in params]
    kwargs = {p[0]: bound[p[0]] for p in kwonly}
    return _new(graph, "call_function", target, args, kwargs, node)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------


def normalize(gm: fx.GraphModule, *, has_meta: bool = True) -> fx.GraphModule:
    """Canonicalize `gm` in place (see the module docstring) and return it.

    `has_meta=False` is for pattern graphs (no fake values): rank-dependent rewrites are skipped there,
    which is why patterns spell dims as negative numbers.
    """
    graph = gm.graph
    _fold_modules(gm)
    if has_meta:
        _fold_activation_modules(gm)
        _fold_conv1d(gm)
    for node in list(graph.nodes):
        if node.graph is not graph or node.op not in ("call_function", "call_method"):
            continue
        try:
            _normalize_node(graph, node, has_meta)
        except _Skip:
            pass
    graph.lint()
    gm.recompile()
    return gm


class _Skip(Exception):
    pass


_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def _normalize_node(graph, node, has_meta):
    if node.op == "call_method" and node.target in _CAST_METHODS and not node.kwargs and len(node.args) == 1:
        return _make_cast(graph, node, node.args[0], _CAST_METHODS[node.target], None, has_meta)
    if node.op == "call_method" and node.target in ("to", "type"):
        return _normalize_to(graph, node, has_meta)
    if node.op == "call_method" and node.target == "permute":
        return _normalize_permute(graph, node)
    if (node.op == "call_method" and node.target == "flatten") or (
            node.op == "call_function" and node.target is torch.flatten):
        # torch.flatten(x, s, e) / x.flatten(start_dim=s) -> x.flatten(s, e): one spelling
        b = _bind([("input", REQ), ("start_dim", 0), ("end_dim", -1)], node.args, node.kwargs, [])
        if b is None or not all(isinstance(b[k], int) for k in ("start_dim", "end_dim")):
            return
        if node.op == "call_method" and node.args == (b["input"], b["start_dim"], b["end_dim"]) and not node.kwargs:
            return
        return _replace(node, _new(graph, "call_method", "flatten", (b["input"], b["start_dim"], b["end_dim"]), {}, node))
    if node.op == "call_method" and node.target in ("view", "reshape", "expand") and not node.kwargs:
        # x.view(a, b) / x.view((a, b)) / torch.reshape(x, (a, b)) -> x.view((a, b)): one spelling
        single = len(node.args) == 2 and not isinstance(node.args[1], (tuple, list))
        if single and isinstance(node.args[1], fx.Node) and not isinstance(val(node.args[1]), (int, torch.SymInt)):
            return  # a whole shape in one value (a pattern's wildcard, a torch.Size node)
        if len(node.args) > 2 or single:
            if not any(isinstance(a, torch.dtype) for a in node.args[1:]):
                node.args = (node.args[0], tuple(node.args[1:]))
        elif len(node.args) == 2 and isinstance(node.args[1], list):
            node.args = (node.args[0], tuple(node.args[1]))
        return
    if node.op == "call_function" and node.target is torch.reshape and len(node.args) == 2 and not node.kwargs:
        shape = node.args[1]
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)
        return _replace(node, _new(graph, "call_method", "reshape", (node.args[0], shape), {}, node))
    if node.op == "call_method" and node.target == "where" and len(node.args) == 3 and not node.kwargs:
        # x.where(c, y) == torch.where(c, x, y)
        x, c, y = node.args
        return _replace(node, _canonical_node(graph, node, "where", {"condition": c, "input": x, "other": y}))

    if node.op == "call_function":
        name = _FUNCTION_SOURCES.get(node.target)
        params = _EXTRA.get((node.target, name))
    else:
        name = _METHOD_SOURCES.get(node.target)
        params = _EXTRA.get(("method", name))
    if name is None:
        return
    _, cparams, ckwonly = CANON[name]
    bound = _bind(params or cparams, node.args, node.kwargs, ckwonly)
    if bound is None:
        return
    # source-specific arguments that change meaning are folded or make us leave the node alone
    if bound.get("alpha", 1) != 1 or bound.get("rounding_mode") is not None or bound.get("inplace"):
        return
    if name in ("softmax", "log_softmax") and bound.get("dim") is None:
        return
    if name == "mean" and (bound.get("dim") is None or bound.get("dtype") is not None):
        return
    dtype = bound.pop("dtype", None) if name in ("softmax", "log_softmax") else None
    bound.pop("_stacklevel", None)
    for k in ("alpha", "rounding_mode", "inplace"):
        if k not in dict(cparams):
            bound.pop(k, None)

    if name == "dropout":
        p, training = bound["p"], bound["training"]
        if isinstance(p, (int, float)) and training is not None and not isinstance(training, fx.Node):
            if p == 0 or not training:
                return _replace(node, bound["input"])  # an identity
        bound["inplace"] = False if not bound["inplace"] else bound["inplace"]
    if name in ("softmax", "log_softmax", "mean"):
        bound["dim"] = _norm_dim(bound["input"], bound["dim"], has_meta)
        if name == "mean":
            bound["keepdim"] = bool(bound["keepdim"])
    if name == "transpose":
        d0 = _norm_dim(bound["input"], bound["dim0"], has_meta)
        d1 = _norm_dim(bound["input"], bound["dim1"], has_meta)
        if isinstance(d0, int) and isinstance(d1, int) and d0 > d1:
            d0, d1 = d1, d0
        bound["dim0"], bound["dim1"] = d0, d1
    if name == "pow" and _is_number(bound["exponent"]) and float(bound["exponent"]) == 2.0:
        bound["exponent"] = 2.0  # 2, 2.0 -> one literal
    if name in ("mul", "add") and _is_number(bound["input"]) and isinstance(bound["other"], fx.Node):
        bound["input"], bound["other"] = bound["other"], bound["input"]  # scalar second
    if name == "matmul" and node.target is torch.bmm:
        pass  # identical to matmul for 3-D operands

    if dtype is not None:
        bound["input"] = _make_cast_node(graph, node, bound["input"], dtype, has_meta)
    new = _canonical_node(graph, node, name, bound)
    _replace(node, new)
    if name == "cat" and has_meta:
        _fold_cat_of_empty(graph, new)


def _fold_cat_of_empty(graph, node):
    """torch.cat([empty, x], dim) -> x, where `empty` is a 1-D tensor of no elements made in the
    graph (`torch.tensor([])`): cat skips such tensors, so the result equals x, and only the copy
    goes. transformers' DynamicCache starts each layer's cache this way (`torch.cat([self.keys,
    key_states], dim=-2)` on a fresh `torch.tensor([])`), in training too (use_cache defaults
    on): two copies of k and v per layer, kept alive as graph outputs until the forward returns.
    The result then aliases x instead of being a fresh tensor, so the fold is made only where
    neither is written in place in the graph (an in-place write by the caller afterwards bumps x's
    version and autograd raises if x was saved; it is never silently wrong)."""
    tensors, _ = node.args
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return
    empties = [t for t in tensors if _is_fresh_empty(t)]
    rest = [t for t in tensors if t not in empties]
    if len(rest) != 1 or not isinstance(rest[0], fx.Node):
        return
    x, out = val(rest[0]), val(node)
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.dtype == out.dtype
            and _same_device(x.device, out.device) and tuple(x.shape) == tuple(out.shape)):
        return
    if _written_in_place(node) or _written_in_place(rest[0]):
        return
    _replace(node, rest[0])
    for e in empties:
        if not e.users:
            graph.erase_node(e)


def _is_fresh_empty(t) -> bool:
    if not (isinstance(t, fx.Node) and t.op == "call_function" and t.target is torch.tensor):
        return False
    v = val(t)
    return isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == 0 and len(t.users) == 1


def _written_in_place(n: fx.Node) -> bool:
    for u in n.users:
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
        if isinstance(name, str) and name.endswith("_") and not name.startswith("_"):
            return True
        if u.target is operator.setitem or "out" in u.kwargs:
            return True
        schema = getattr(u.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False


def _norm_dim(x, d, has_meta):
    if isinstance(d, (list, tuple)) and len(d) == 1:
        d = d[0]
    if not isinstance(d, int) or isinstance(d, bool):
        return d
    r = _rank(x) if has_meta else None
    if d >= 0 and r is not None:
        return d - r
    return d


def _make_cast_node(graph, like, x, dtype, has_meta):
    v = val(x)
    if has_meta and isinstance(v, torch.Tensor) and v.dtype == dtype:
        return x
    return _new(graph, "call_method", "to", (x, dtype), {}, like)


def _make_cast(graph, node, x, dtype, device, has_meta):
    v = val(x)
    if has_meta and isinstance(v, torch.Tensor) and v.dtype == dtype and (device is None or v.device == device):
        return _replace(node, x)
    if device is not None:
        return  # a device move stays as written
    return _replace(node, _new(graph, "call_method", "to", (x, dtype), {}, node))


def _normalize_to(graph, node, has_meta):
    args, kwargs = list(node.args), dict(node.kwargs)
    x = args.pop(0)
    if kwargs.pop("non_blocking", False) or kwargs.pop("copy", False) or kwargs.get("memory_format") is not None:
        return
    kwargs.pop("memory_format", None)
    dtype = kwargs.pop("dtype", None)
    device = kwargs.pop("device", None)
    if kwargs:
        return
    for a in args:
        if isinstance(a, torch.dtype) and dtype is None:
            dtype = a
        elif isinstance(a, (torch.device, str)) and device is None and node.target == "to":
            device = torch.device(a)
        elif a is False or a is None:
            continue
        else:
            return  # .to(other_tensor), .type("torch.FloatTensor"), ...
    v = val(x)
    if isinstance(device, str):
        device = torch.device(device)
    if device is not None:
        if not (has_meta and isinstance(v, torch.Tensor) and _same_device(v.device, device)):
            return
        device = None  # a move to where it already is
    if dtype is None:
        return _replace(node, x) if has_meta and isinstance(v, torch.Tensor) else None
    return _make_cast(graph, node, x, dtype, None, has_meta)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index == b.index or a.index is None or b.index is None and a.type == "cpu"


def _normalize_permute(graph, node):
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    if node.kwargs or not all(isinstance(a, int) for a in args):
        return
    r = len(args)
    perm = [a % r for a in args]
    if r >= 2 and perm == list(range(r - 2)) + [r - 1, r - 2]:
        new = _canonical_node(graph, node, "transpose", {"input": node.args[0], "dim0": -2, "dim1": -1})
        _replace(node, new)


# ---------------------------------------------------------------------------------------------
# modules: call_module nodes (symbolic_trace) and inlined activation modules (Dynamo)
# ---------------------------------------------------------------------------------------------


def _get_attr(gm, graph, like, qualname):
    with graph.inserting_before(like):
        n = graph.get_attr(qualname)
    return n


def _fold_modules(gm: fx.GraphModule):
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        try:
            mod = gm.get_submodule(node.target)
        except AttributeError:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        x = node.args[0]
        q = node.target

        def attr(name, _q=q, _mod=mod, _node=node):
            return None if getattr(_mod, name, None) is None else _get_attr(gm, graph, _node, f"{_q}.{name}")

        new = None
        t = type(mod)
        if t is nn.Linear:
            new = _canonical_node(graph, node, "linear", {"input": x, "weight": attr("weight"), "bias": attr("bias")})
        elif t is nn.LayerNorm:
            new = _canonical_node(graph, node, "layer_norm", {
                "input": x, "normalized_shape": tuple(mod.normalized_shape), "weight": attr("weight"),
                "bias": attr("bias"), "eps": mod.eps})
        elif getattr(nn, "RMSNorm", None) is not None and t is nn.RMSNorm:
            new = _canonical_node(graph, node, "rms_norm", {
                "input": x, "normalized_shape": tuple(mod.normalized_shape), "weight": attr("weight"), "eps": mod.eps})
        elif t is nn.GELU:
            new = _canonical_node(graph, node, "gelu", {"input": x, "approximate": mod.approximate})
        elif t in (nn.ReLU, nn.SiLU) and not mod.inplace:
            new = _canonical_node(graph, node, "relu" if t is nn.ReLU else "silu", {"input": x})
        elif t in (nn.Sigmoid, nn.Tanh):
            new = _canonical_node(graph, node, "sigmoid" if t is nn.Sigmoid else "tanh", {"input": x})
        elif t is nn.Softmax and mod.dim is not None:
            new = _canonical_node(graph, node, "softmax", {"input": x, "dim": mod.dim})
        elif t is nn.Dropout and not mod.inplace:
            # the traced graph is specialised to the mode the module had when it was traced
            if mod.p == 0 or not mod.training:
                _replace(node, x)
                continue
            new = _canonical_node(graph, node, "dropout", {"input": x, "p": mod.p, "training": True, "inplace": False})
        elif t is nn.Identity:
            _replace(node, x)
            continue
        if new is not None:
            _replace(node, new)


def _module_key(node):
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key = list(stack.keys())[-1]
    return key


def _elementwise(node):
    if node.op == "call_function":
        return node.target in _ELEMENTWISE_FUNCS
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return False


def _fold_activation_modules(gm: fx.GraphModule):
    """Replace the body of a leaf module that computes a known activation by the canonical call.

    Any module (transformers' NewGELUActivation, FastGELUActivation, QuickGELUActivation, a user's
    own `Swish`) whose inlined body is made only of element-wise ops with one tensor input and one
    output is evaluated, in float64, on probe values and compared with each activation the kernels
    know; only an exact match (to 1e-9) is folded. No class-name table: a body that computes
    something else is left alone.
    """
    graph = gm.graph
    groups: dict[Any, list[fx.Node]] = {}
    for node in graph.nodes:
        key = _module_key(node)
        if key is not None and node.op in ("call_function", "call_method"):
            groups.setdefault(key, []).append(node)
    probe = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    for key, nodes in groups.items():
        if len(nodes) < 2 or len(nodes) > 24 or not all(_elementwise(n) for n in nodes):
            continue
        members = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in members}
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if len(inputs) != 1 or len(outputs) != 1:
            continue
        (x,) = inputs
        (out,) = outputs
        if out is not nodes[-1]:
            continue
        env = {x: probe}
        try:
            for n in nodes:
                a = fx.node.map_arg(n.args, lambda m: env[m])
                kw = fx.node.map_arg(n.kwargs, lambda m: env[m])
                env[n] = n.target(*a, **kw) if n.op == "call_function" else getattr(a[0], n.target)(*a[1:], **kw)
            got = env[out]
        except Exception:
            continue
        if not isinstance(got, torch.Tensor) or got.shape != probe.shape:
            continue
        for name, fn in ACTIVATION_CANDIDATES.items():
            if torch.allclose(got, fn(probe), rtol=0, atol=1e-9):
                target, kwargs = canonical_activation_call(name)
                new = _new(graph, "call_function", target, (x,), kwargs, out)
                out.replace_all_uses_with(new)
                for n in reversed(nodes):
                    if not n.users:
                        graph.erase_node(n)
                break


def _fold_conv1d(gm: fx.GraphModule):
    """transformers' Conv1D: view(x, -1, K) -> addmm(b, ., W) -> view(., *x.shape[:-1], N)  ==  linear(x, W.t(), b)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.addmm or node.kwargs:
            continue
        if len(node.args) != 3:
            continue
        b, v, w = node.args
        if not (isinstance(v, fx.Node) and v.op == "call_method" and v.target in ("view", "reshape")):
            continue
        if len(node.users) != 1:
            continue
        (after,) = node.users
        if not (after.op == "call_method" and after.target in ("view", "reshape")):
            continue
        x = v.args[0]
        vx, vv, vout, vw = val(x), val(v), val(after), val(w)
        if not all(isinstance(t, torch.Tensor) for t in (vx, vv, vout, vw)):
            continue
        if vv.dim() != 2 or vw.dim() != 2 or vv.shape[-1] != vx.shape[-1] or vout.shape[-1] != vw.shape[-1]:
            continue
        if vx.dim() < 1 or vout.dim() != vx.dim() or tuple(vout.shape[:-1]) != tuple(vx.shape[:-1]):
            continue
        wt = _new(graph, "call_method", "t", (w,), {}, after)
        new = _new(graph, "call_function", F.linear, (x, wt, b), {}, after)
        new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", after.meta.get("nn_module_stack"))
        after.replace_all_uses_with(new)
        graph.erase_node(after)
        graph.erase_node(node)
        if not v.users:
            graph.erase_node(v)


__all__ = ["normalize", "val", "propagate", "quick_gelu", "CANON", "canonical_activation_call", "ACTIVATION_CANDIDATES"]

_ = math
