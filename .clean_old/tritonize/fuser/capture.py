"""capture: the Dynamo backend that runs normalize -> rewrite on each captured graph, and the
`torch.fx.symbolic_trace` path for modules that trace.

Dynamo hands the backend a torch-level FX GraphModule (before autograd): `call_function` on
`torch._C._nn.linear`, `F.*`, `operator.*`, `call_method` like 'softmax'/'view', parameters as
placeholders, `meta["example_value"]` fake tensors and `meta["nn_module_stack"]` module paths. We
rewrite there, so the graph calls our custom ops, whose registered autograd gives training; the
rewritten graph then runs eagerly (`rest="eager"`) or goes to Inductor (`rest="inductor"`), where
our ops stay opaque.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import torch
import torch.fx as fx

from tritonize.fuser.normalize import normalize
from tritonize.fuser.report import Report
from tritonize.fuser.rewrite import rewrite
from tritonize.patterns import LEAVE_TO_INDUCTOR

RESTS = ("eager", "inductor")


def debug_enabled() -> bool:
    return os.environ.get("TRITONIZE_LOG", "").lower() == "debug"


def _log_graph(title: str, gm: fx.GraphModule) -> None:
    print(f"[tritonize] ===== {title} =====\n{gm.code}", file=sys.stderr)


def select_patterns(patterns=None, exclude=()):
    """Pattern instances by name (None: all), minus `exclude`; unknown names raise ValueError."""
    from tritonize.patterns import all_patterns

    every = all_patterns()
    names = [p.name for p in every]
    families = {p.family for p in every}
    if isinstance(patterns, str):
        patterns = [patterns]
    if isinstance(exclude, str):
        exclude = [exclude]

    def expand(sel, what):
        out = set()
        for s in sel:
            if s in names:
                out.add(s)
            elif s in families:
                out.update(p.name for p in every if p.family == s)
            else:
                raise ValueError(f"tritonize: unknown pattern {s!r} in {what}; known: {', '.join(names)} "
                                 f"(or a family: {', '.join(sorted(families))})")
        return out

    chosen = set(names) if patterns is None else expand(patterns, "patterns")
    chosen -= expand(exclude or (), "exclude")
    return [p for p in every if p.name in chosen]


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g)


def transform(gm: fx.GraphModule, report: Report, patterns, *, has_meta=True, options=None) -> fx.GraphModule:
    """normalize + rewrite `gm` in place; returns it."""
    capture = report.new_capture()
    if debug_enabled():
        _log_graph(f"graph {capture} before", gm)
    normalize(gm, has_meta=has_meta)
    rewrite(gm, patterns, report, capture, options)
    if debug_enabled():
        _log_graph(f"graph {capture} after", gm)
    return gm


def make_backend(report: Report, patterns=None, exclude=(), rest="eager", strict=False, cudagraphs=False,
                 drop_logits=None, gqa_fold=None, defer_logits=False):
    """A Dynamo backend `(gm, example_inputs) -> callable` that fuses and records into `report`.
    drop_logits: None, or a callable telling at capture time whether returned LM-head logits may
    be dropped (tritonize(drop_logits=True) passes "the model is in training mode"); gqa_fold:
    see `tritonize` (None: on with rest="eager" and no cudagraphs, or with drop_logits);
    defer_logits: see `tritonize` (False here by default: the registered torch.compile backend
    returns plain logits)."""
    if rest not in RESTS:
        raise ValueError(f"tritonize: rest must be one of {RESTS}, got {rest!r}")
    if not isinstance(cudagraphs, bool):
        raise TypeError(f"tritonize: cudagraphs must be True or False, got {cudagraphs!r}")
    pats = select_patterns(patterns, exclude)
    aot = rest == "inductor" or cudagraphs  # the rewritten graph goes through AOTAutograd
    if defer_logits is not None and not isinstance(defer_logits, bool):
        raise TypeError(f"tritonize: defer_logits must be True, False or None, got {defer_logits!r}")
    if defer_logits and aot:
        raise ValueError("tritonize: defer_logits=True needs rest='eager' and cudagraphs=False (AOTAutograd "
                         "cannot return the deferred tensor; those modes skip the logits' backward instead)")
    defer_logits = (not aot) if defer_logits is None else defer_logits  # None: on where possible
    if gqa_fold is not None and not isinstance(gqa_fold, bool):
        raise TypeError(f"tritonize: gqa_fold must be True, False or None, got {gqa_fold!r}")
    if gqa_fold is None:  # measured faster in the eager-rest mode (tritonize's docstring)
        gqa_fold = not aot or drop_logits is not None
    # patterns that decline with a reason in rest="inductor" unless the user named them (see
    # patterns/__init__.py LEAVE_TO_INDUCTOR for the measurement)
    leave = LEAVE_TO_INDUCTOR if rest == "inductor" and patterns is None else ()
    # small LayerNorm / linear -> activation sites stay torch's where our Python call costs more
    # host time than the kernel saves GPU time (patterns/__init__.py EAGER_MIN_ELEMENTS)
    size_policy = not aot and patterns is None and os.environ.get("TRITONIZE_SIZE_POLICY", "1") != "0"

    def tritonize_compiler(gm: fx.GraphModule, example_inputs):
        backup = _copy_graph_module(gm)
        try:
            transform(gm, report, pats, options={"drop_logits": bool(drop_logits is not None and drop_logits()),
                                                 "gqa_fold": bool(gqa_fold), "aot": aot, "defer_logits": defer_logits,
                                                 "leave_to_inductor": leave, "size_policy": size_policy})
            lazy = lift_returned_logits(gm) if aot else None
        except Exception as e:  # a bug in the pass must not break the user's model
            if strict:
                raise
            warnings.warn(f"tritonize: rewriting a captured graph failed ({type(e).__name__}: {e}); "
                          "that graph runs unmodified", stacklevel=2)
            gm, lazy = backup, None
        return attach_returned_logits(compile_rest(gm, example_inputs), lazy)

    def compile_rest(gm, example_inputs):
        graphs = False
        if cudagraphs:
            why = cudagraph_blocker(gm)
            tag = f"graph {report.captures - 1}: "
            report.add_cudagraph_note(tag + ("CUDA graphs on" if why is None else f"no CUDA graphs: {why}"))
            graphs = why is None
        if rest == "inductor":
            from torch._inductor.compile_fx import compile_fx

            register_inductor_fallbacks()
            from tritonize.fuser import thin_ops

            patches = {"triton.cudagraphs": True} if graphs else {}
            if thin_ops.enabled():
                return compile_fx(gm, example_inputs, config_patches=patches, inner_compile=thin_ops.inner_compile)
            return compile_fx(gm, example_inputs, config_patches=patches)
        if graphs:
            return cudagraphed(gm, example_inputs, declined=lambda why: report.set_cudagraph_note(
                tag, f"{tag}no CUDA graphs: torch declined ({why})"))
        return gm.forward

    return tritonize_compiler


def lazy_logits(logits, hidden, weight, bias):
    """In a rewritten graph: the returned LM-head logits, detached (patterns/cross_entropy.py).
    hidden/weight/bias are arguments so that the graph keeps them current when later rewrites
    replace those nodes; lift_returned_logits turns them into extra graph outputs."""
    return logits.detach()


def lift_returned_logits(gm: fx.GraphModule):
    """For each `lazy_logits` node (see above) whose only users are the graph's output: append
    the LM head's inputs to the graph's outputs. Returns (number of original outputs,
    [(positions, first extra, has bias)]) for attach_returned_logits, or None when there are none.
    A `lazy_logits` node used otherwise is undone (the in-graph gradient is exact, only slower)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = out.args[0]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is lazy_logits]
    if not nodes:
        return None
    liftable = isinstance(outs, (tuple, list))
    extra, spec = [], []
    for node in nodes:
        positions = [i for i, a in enumerate(outs) if a is node] if liftable else []
        if not positions or any(u is not out for u in node.users):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        _logits, h, w, b = node.args
        spec.append((tuple(positions), len(outs) + len(extra), b is not None))
        extra += [h, w] + ([b] if b is not None else [])
    if extra:
        out.args = (type(outs)(list(outs) + extra),)
    gm.recompile()
    return (len(outs), spec) if spec else None


def attach_returned_logits(fn, lazy):
    """Wrap a compiled graph whose returned logits were lifted (lift_returned_logits): strip the
    extra outputs and give each returned logits tensor the LM head's gradient again, as an eager
    autograd node that runs only when something differentiates the logits."""
    if lazy is None:
        return fn
    n_out, spec = lazy
    from tritonize.kernels.linear_cross_entropy import attach_logits_grad

    def run(*args):  # Dynamo calls a backend's function unboxed (its `_boxed_call`, copied by
        res = fn(*args)  # functools.wraps from AOTAutograd's inner function, does not apply here)
        outs = list(res[:n_out])
        for positions, first, has_bias in spec:
            h, w = res[first], res[first + 1]
            b = res[first + 2] if has_bias else None
            for p in positions:
                outs[p] = attach_logits_grad(outs[p], h, w, b)
        return type(res)(outs) if isinstance(res, tuple) else outs

    return run


def cudagraph_blocker(gm: fx.GraphModule) -> str | None:
    """Why the rewritten graph cannot be replayed as a CUDA graph, or None when it can.

    A CUDA graph replays the recorded kernels only: anything the graph does on the CPU is frozen
    at its recorded value. Our dropout seeds are drawn in the graph on the CPU (a fresh mask each
    step), so a graph with one must run uncaptured, as must any graph with CPU tensors or off-GPU
    inputs. torch's own checks (input mutation, incompatible ops) may still decline a graph's
    forward: the report's note then says so (`cudagraphed`'s `declined`).
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.randint and \
                torch.device(node.kwargs.get("device") or "cpu").type != "cuda":
            return "it draws a dropout seed on the CPU (masks must change every step)"
    devices = set()
    for node in gm.graph.nodes:
        val = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(val, torch.Tensor):
            if val.device.type != "cuda":
                what = f"{node.target.__name__ if callable(node.target) else node.target}"
                if node.op == "placeholder":
                    return f"input {node.target!r} is on {val.device.type}"
                return f"{what} makes a {val.device.type} tensor"
            devices.add(val.device)
    if not devices:
        return "the graph has no CUDA tensors"
    if len(devices) > 1:
        return f"the graph spans {len(devices)} devices"
    return None


def cudagraphed(gm: fx.GraphModule, example_inputs, declined=None):
    """The rewritten graph through torch's "cudagraphs" backend design: AOTAutograd splits it into a
    forward and a backward graph (our ops enter as custom ops with their registered autograd), and
    each is recorded once per input shape and replayed by CUDA graph trees. A replay costs one host
    call per graph instead of one per op, which is what host-bound steps need.

    One change from torch's backend (torch/_dynamo/backends/cudagraphs.py): parameters are static
    inputs, as Inductor's cudagraphs treat them (`get_static_input_idxs`: a parameter that moves
    makes the tree re-record). torch's backend counts only AOT-lifted inputs as static, and with
    Dynamo's inlined modules no parameter is lifted, so every replay copied every parameter into
    the graph's buffers (2.3 ms per Llama step on the H100). Falls back to torch's backend when
    these internals are not there. `declined(why)` is called when torch's own checks skip the
    forward graph (input mutation, an incompatible op): it then runs uncaptured."""
    try:
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.cudagraphs import (
            check_for_skip, find_input_mutations, get_device_index, get_stack_traces,
        )
        from torch._dynamo.backends.debugging import boxed_nop
        from torch._inductor.compile_fx import get_static_input_idxs
        from torch._inductor.cudagraph_trees import cudagraphify_impl
        from torch._inductor.cudagraph_utils import (
            BoxedDeviceIndex, get_placeholder_info, log_cudagraph_skip_and_bump_counter,
        )
        from torch._inductor.utils import BoxedBool, count_tangents, num_fw_fixed_arguments
    except ImportError:
        from torch._dynamo.backends.cudagraphs import cudagraphs as torch_cudagraphs

        return torch_cudagraphs(gm, example_inputs)

    do_cudagraphs = BoxedBool(True)
    device_index = BoxedDeviceIndex(None)

    def record(aot_model, aot_inputs, static, is_backward, is_inference=False):
        out = cudagraphify_impl(
            boxed_nop(aot_model, aot_inputs), aot_inputs, static, device_index=device_index.value,
            is_backward=is_backward, is_inference=is_inference, stack_traces=get_stack_traces(aot_model),
            placeholders=get_placeholder_info(aot_model.graph), mutated_input_idxs=find_input_mutations(aot_model.graph),
        )  # fmt: skip
        out._boxed_call = True
        return out

    def forward(aot_model, aot_inputs, is_inference=False):
        fixed = num_fw_fixed_arguments(len(example_inputs), len(aot_inputs))
        if skip := check_for_skip(aot_model, fixed):
            BoxedBool.disable(do_cudagraphs)
            log_cudagraph_skip_and_bump_counter(f"skipping cudagraphs due to {skip}")
            if declined is not None:
                declined(str(skip).splitlines()[0])
            return boxed_nop(aot_model, aot_inputs)
        device_index.set(get_device_index(aot_model))
        static = sorted(set(get_static_input_idxs(fixed)) | set(range(fixed)))
        return record(aot_model, aot_inputs, static, is_backward=False, is_inference=is_inference)

    def backward(aot_model, aot_inputs):
        if not do_cudagraphs:
            return aot_model
        fixed = count_tangents(aot_model)  # saved activations: outputs of the recorded forward
        if skip := check_for_skip(aot_model, fixed):
            log_cudagraph_skip_and_bump_counter(f"skipping cudagraphs due to {skip}")
            manager = torch._inductor.cudagraph_trees.get_manager(device_index.value or 0, create_if_none_exists=False)

            def run(inputs):
                if manager is not None:
                    manager.set_to_running_backward()
                return aot_model(inputs)

            run._boxed_call = True
            return run
        return record(aot_model, aot_inputs, range(fixed), is_backward=True)

    compiler = aot_autograd(
        fw_compiler=forward, bw_compiler=backward, inference_compiler=functools.partial(forward, is_inference=True),
        keep_inference_input_mutations=torch._dynamo.config.cudagraph_backend_keep_input_mutation,
    )  # fmt: skip
    return compiler(gm, example_inputs)


def register_inductor_fallbacks() -> None:
    """Declare every `tritonize::` custom op an Inductor fallback kernel (called as is).

    Inductor treats an op without a lowering as an *implicit* fallback and, in torch <= 2.11,
    formats an info-log line with str() of the op's IR arguments first, eagerly: that string
    recurses through the whole IR graph above the op, exponentially, and a 12-layer Llama's
    first compile never finished on the H100 (stacks: ir.py __str__ under graph.call_function).
    An explicit fallback is what the implicit path would register anyway, minus that string.
    """
    try:
        from torch._inductor.lowering import lowerings, make_fallback
    except ImportError:  # an Inductor without this API: the implicit path still works
        return
    ns = torch.ops.tritonize
    for name in list(dir(ns)):
        packet = getattr(ns, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            if op not in lowerings:
                try:
                    make_fallback(op, warn=False)
                except Exception:  # noqa: BLE001 - registration is an optimisation only
                    pass


def symbolic(module: torch.nn.Module, *example_inputs, patterns=None, exclude=(), report: Report | None = None):
    """The `torch.fx.symbolic_trace` path: trace `module` (or take a GraphModule), fill fake
    metadata from `example_inputs`, fuse; returns the rewritten GraphModule (its report in
    `gm.tritonize_report`). For modules without data-dependent Python control flow."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)
    report = report or Report(type(module).__name__)
    pats = select_patterns(patterns, exclude)
    from tritonize.fuser.normalize import _fold_modules

    _fold_modules(gm)  # call_module -> functional first, so the fake pass sees the get_attrs
    gm.recompile()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                                         for t in example_inputs])
    transform(gm, report, pats)
    gm.tritonize_report = report
    return gm
