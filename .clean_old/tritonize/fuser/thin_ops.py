"""Thin twins of the `tritonize::` custom ops, for the graphs Inductor compiles (rest="inductor").

Why: Inductor runs an op it cannot lower as a fallback kernel, called through the dispatcher.
A `torch.library.custom_op` answers that call through several Python layers (its autograd
wrapper and redispatch, a backend wrapper that disables Dynamo and re-checks output aliasing):
on the H100 host one LayerNorm forward cost 120 us through `torch.ops.tritonize.layer_norm_fwd`
against 51 us for the same Python function called directly, and GPT-2 makes ~76 such calls per
training step. After AOTAutograd has split the graph into forward and backward (autograd is
then handled), nothing needs those layers: each call is retargeted to `tritonize_fast::<name>`,
an op with the same schema whose CUDA/CPU kernel IS the custom op's Python function and whose
fake kernel is its registered fake. Inductor treats it exactly as before (same schema, same
mutation annotations, an explicit fallback).

    TRITONIZE_THIN_OPS=0   keep the custom ops (A/B switch; default on)
"""

from __future__ import annotations

import os

import torch
import torch.fx as fx

_NS = "tritonize_fast"
_LIB: list = []  # the Library object (kept alive: dropping it unregisters the ops)
_THIN: dict = {}  # tritonize:: OpOverload -> its twin (None: no twin possible)


def enabled() -> bool:
    return os.environ.get("TRITONIZE_THIN_OPS", "1") != "0"


def thin_op(op):
    """The `tritonize_fast::` twin of a `tritonize::` OpOverload, defined on first use; None for
    anything else (or an op whose custom-op definition is not found)."""
    if op in _THIN:
        return _THIN[op]
    twin = None
    if isinstance(op, torch._ops.OpOverload) and op.namespace == "tritonize":
        try:
            twin = _define_twin(op)
        except Exception:  # noqa: BLE001 - a torch without these internals: keep the custom op
            twin = None
    _THIN[op] = twin
    return twin


def _define_twin(op):
    """Define `tritonize_fast::<name>` beside a `tritonize::<name>` custom op (None if it has no
    custom-op definition with a fake, or is not the default overload)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(op._schema.name)
    if opdef is None or opdef._abstract_fn is None or op._overloadname != "default":
        return None
    name = op._schema.name.split("::", 1)[1]
    if not _LIB:
        _LIB.append(torch.library.Library(_NS, "DEF"))
    lib = _LIB[0]
    lib.define(str(op._schema).split("::", 1)[1])
    for key in ("CUDA", "CPU"):
        lib.impl(name, opdef._init_fn, key)
    torch.library.register_fake(f"{_NS}::{name}", opdef._abstract_fn, lib=lib)
    twin = getattr(getattr(torch.ops, _NS), name).default
    try:
        from torch._inductor.lowering import make_fallback

        make_fallback(twin, warn=False)  # as register_inductor_fallbacks does for the originals
    except Exception:  # noqa: BLE001 - an optimisation only
        pass
    return twin


def _functionalized_hops() -> tuple:
    """The higher-order ops that wrap an op writing into its arguments after functionalization
    (their first argument is the op): auto_functionalized, and its v2 where torch has it."""
    hops = []
    for name in ("auto_functionalized", "auto_functionalized_v2"):
        try:
            hops.append(getattr(torch.ops.higher_order, name))
        except AttributeError:
            pass
    return tuple(hops)


def retarget(gm: fx.GraphModule) -> int:
    """Point every call of a `tritonize::` op in a post-AOTAutograd graph (also inside
    auto_functionalized, for the ops that write into an argument) at its thin twin."""
    n = 0
    hops = _functionalized_hops()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        twin = thin_op(node.target)
        if twin is not None:
            node.target = twin
            n += 1
        elif node.target in hops and node.args:
            twin = thin_op(node.args[0])
            if twin is not None:
                node.args = (twin, *node.args[1:])
                n += 1
    if n:
        gm.recompile()
    return n


def inner_compile(gm: fx.GraphModule, example_inputs, **kwargs):
    """compile_fx's per-graph step (forward, backward or inference graph), after retarget."""
    from torch._inductor.compile_fx import compile_fx_inner

    retarget(gm)
    return compile_fx_inner(gm, example_inputs, **kwargs)
