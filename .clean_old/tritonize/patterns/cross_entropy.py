"""softmax -> cross-entropy, and the LM head linear -> cross-entropy.

Spellings: F.cross_entropy(logits, target, ...), F.nll_loss(log_softmax(logits[.to(f32)], -1), ...);
for the LM head, F.cross_entropy(linear(h, W, b) then at most one fp32 cast and one
view/reshape/flatten of the tokens in either order, target, ...) -> linear_cross_entropy, also
when the logits are returned (HF causal LMs): the plain linear then stays for the returned
logits and the loss is computed beside it from the same hidden states and weight. Preceding shifts/flattens of the labels are
just the target's own producers (any spelling). The kernel's loss is fp32; where eager's is not,
the result is cast back, so the graph sees the dtype it had.

In-place: the cross-entropy kernel can write the gradient over the logits buffer. We ask for it
only when the logits are provably dead after the loss: every value between the loss and the op
that produced the buffer (views, a cast) has that single use, and the producer's own backward
does not read its output (linear, matmul, a cast, + - * /).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from tritonize.patterns import Pattern, is_number, register, tensor_problem

_VIEWS = {"view", "reshape", "contiguous", "flatten", "transpose", "t", "squeeze", "unsqueeze", "expand"}
_FRESH = {F.linear, torch.matmul, operator.add, operator.sub, operator.mul, operator.truediv}


def logits_dead_after(node) -> bool:
    n = node
    while True:
        if len(n.users) != 1 or n.op in ("placeholder", "get_attr", "output"):
            return False
        if n.op == "call_method" and n.target in _VIEWS:
            n = n.args[0]
            continue
        if n.op == "call_function" and n.target is operator.getitem:
            return False  # a slice of something else
        if n.op == "call_method" and n.target == "to":
            return True  # a fresh cast copy (no-op casts were removed by normalize)
        return n.op == "call_function" and n.target in _FRESH


def _ce_guard(m, logits_val, expect_2d=True):
    r = tensor_problem("logits", logits_val)
    if r:
        return r
    from tritonize.kernels.cross_entropy import TARGET_DTYPES

    t = m.val("t")
    r = tensor_problem("target", t, dtypes=TARGET_DTYPES)
    if r:
        return r
    if m.get("wt") is not None:
        return "class weights are not supported"
    if m.get("sa") is not None or m.get("rd") is not None:
        return "legacy size_average/reduce arguments"
    if m["red"] not in ("mean", "sum", "none"):
        return f"reduction {m['red']!r}"
    ii = m["ii"]
    if not isinstance(ii, int) or isinstance(ii, bool):
        return f"ignore_index {ii!r} is not an int"
    ls = m.get("ls", 0.0)
    if not is_number(ls) or not 0.0 <= ls <= 1.0:
        return f"label_smoothing {ls!r}"
    if expect_2d and (logits_val.dim() != 2 or t.dim() != 1):
        return f"logits of rank {logits_val.dim()} (class dim must be last: (N, C) with target (N,))"
    return None


def _requires_grad(m, *names) -> bool:
    return any(getattr(m.val(n), "requires_grad", False) for n in names if m.get(n) is not None)


def _cast_back(m, node):
    out = m.out_val(0)
    if out is not None and out.dtype != torch.float32:
        return m.method("to", node, out.dtype)
    return node


@register
class CrossEntropy(Pattern):
    name = "cross_entropy"
    family = "cross_entropy"
    priority = 50
    kernel = ("cross_entropy", "cross_entropy")

    def searches(self):
        def ce(x, t, wt, sa, ii, rd, red, ls):
            return F.cross_entropy(x, t, wt, sa, ii, rd, red, ls)

        def nll(x, t, wt, sa, ii, rd, red):
            return F.nll_loss(torch.log_softmax(x, -1), t, wt, sa, ii, rd, red)

        def nll_up(x, t, wt, sa, ii, rd, red, dt):
            return F.nll_loss(torch.log_softmax(x.to(dt), -1), t, wt, sa, ii, rd, red)

        yield "F.cross_entropy", {}, ce
        yield "log_softmax+nll_loss", {}, nll
        yield "log_softmax(fp32)+nll_loss", {"upcast": True}, nll_up

    def guard(self, m):
        x = m.val("x")
        if m.flags.get("upcast") and m["dt"] is not torch.float32:
            return f"log_softmax in {m['dt']}"
        return _ce_guard(m, x)

    def replace(self, m, fn):
        inplace = logits_dead_after(m["x"]) and not m.flags.get("upcast")
        loss = m.call(fn, m["x"], m["t"], m["ii"], m["red"], float(m.get("ls", 0.0)), inplace=inplace)
        return [_cast_back(m, loss)]


# The steps transformers and hand-written models put between the LM head and the loss: at most one
# fp32 cast and at most one flatten of the tokens, in either order (HF: cast then view; others:
# flatten then cast). Generated, so every order/spelling is one variant.
_SHAPES = {
    None: None,
    "view": lambda z, shape, fs, fe: z.view(shape),
    "reshape": lambda z, shape, fs, fe: z.reshape(shape),
    "flatten": lambda z, shape, fs, fe: z.flatten(fs, fe),  # dims bound as literals, checked by the guard
}


def _lm_head_chains():
    import itertools

    for cast, shape, cast_first in itertools.product((True, False), _SHAPES, (True, False)):
        if not cast_first and (not cast or shape is None):
            continue  # the order matters only with both steps
        steps = []
        if cast:
            steps.append("cast")
        if shape is not None:
            steps.insert(len(steps) if cast_first else 0, shape)
        yield steps


@register
class LinearCrossEntropy(Pattern):
    """F.linear -> [cast fp32] -> [flatten] -> F.cross_entropy (either order) ->
    linear_cross_entropy(hidden, weight, target, bias): no (N, V) fp32 logits saved for backward.

    When the logits are ALSO returned (every HF causal LM called with labels=), the rewrite keeps
    the plain linear for them (its autograd intact, so a loss on the returned logits still
    backprops correctly) and computes the loss from the same hidden states and weight; the cast
    and flatten only the loss read are erased. The report notes that the logits are still
    materialised. Hidden states are flattened like the logits: the chain only merges leading
    dims, so row i of the logits is row i of the flattened hidden (labels are shifted, not the
    logits, in transformers' ForCausalLMLoss).
    """

    name = "linear_cross_entropy"
    family = "cross_entropy"
    priority = 60
    kernel = ("linear_cross_entropy", "linear_cross_entropy")

    def searches(self):
        for steps in _lm_head_chains():
            def make(steps):
                def f(h, w, b, t, wt, sa, ii, rd, red, ls, dt, shape, fs, fe):
                    z = F.linear(h, w, b)
                    for st in steps:
                        z = z.to(dt) if st == "cast" else _SHAPES[st](z, shape, fs, fe)
                    return F.cross_entropy(z, t, wt, sa, ii, rd, red, ls)
                return f

            yield "->".join(["linear", *steps, "cross_entropy"]), {"cast": "cast" in steps, "steps": tuple(steps)}, \
                make(steps)

    def escapable(self, m):
        """Values between the LM head and the loss may be used elsewhere (the returned logits):
        the rewrite leaves them in place and computes the loss beside them."""
        return {n for n in m.nodes if n not in m.returning}

    def site_nodes(self, m):
        return [n for n in m.nodes if n.op == "call_function" and n.target is F.linear]

    def note(self, m):
        if any(u not in set(m.nodes) for n in m.nodes if n not in m.returning for u in n.users):
            return "logits still materialised: they are returned"
        return ""

    def guard(self, m):
        h = m.val("h")
        r = tensor_problem("hidden", h)
        if r:
            return r
        for name in ("w", "b"):
            if m.get(name) is not None:
                r = tensor_problem(name, m.val(name), dtypes=(h.dtype,))
                if r:
                    return r
        if m.flags["cast"] and m["dt"] is not torch.float32:
            return f"logits cast to {m['dt']}"
        # the logits as cross_entropy saw them: (N, V)
        z = [n for n in m.nodes if n.op == "call_function" and n.target is F.cross_entropy][0].args[0]
        from tritonize.fuser.normalize import val

        zv = val(z)
        r = _ce_guard(m, zv)
        if r:
            return r
        if m.get("ls", 0.0):
            return "label smoothing with the fused LM head"  # kernel supports it; keep the plain path simple
        from tritonize.patterns import dim_eq, static_int

        lin = self.site_nodes(m)[0]
        lv = val(lin)
        # the flatten must merge the leading (token) dims only: (..., V) -> (N, V), V untouched
        if lv is None or not dim_eq(zv.shape[-1], lv.shape[-1]):
            return "the logits' flatten moves the vocabulary dim"
        m.hidden_size = static_int(h.shape[-1])
        if m.hidden_size is None:
            return "hidden size is symbolic"
        return None

    def replace(self, m, fn):
        h = m["h"]
        lin = self.site_nodes(m)[0]
        members = set(m.nodes)
        outside = [u for u in lin.users if u not in members]
        order = {n: i for i, n in enumerate(m.graph.nodes)}
        first_ret = min(m.returning, key=lambda n: order[n])
        from tritonize.fuser.normalize import val

        lv, hv0 = val(lin), m.val("h")
        same_dtype = lv is not None and hv0 is not None and lv.dtype == hv0.dtype  # not under autocast
        kw = {}
        only_returned = bool(outside) and all(u.op == "output" for u in outside)
        stand_in = None
        if only_returned and m.options.get("drop_logits"):
            # tritonize(drop_logits=True), training mode (as Liger in training): the graph returns
            # an empty tensor in their place, nothing (N, V) is written
            stand_in = m.method("new_empty", h, (0,))
            m.note = "logits dropped (drop_logits=True): an empty tensor is returned in their place"
        elif only_returned and m.options.get("defer_logits") and _requires_grad(m, "h", "w", "b"):
            # Training (HF causal LMs called with labels=): the graph returns a DeferredLogits
            # (kernels/deferred_logits.py) that computes F.linear(h, W, b) on its first read. A loop
            # that never reads the logits (the common case) saves the (N, V) matrix and its matmul:
            # Liger's memory with the logits still there for code that wants them. A read after the
            # LM head's weight changed in place (optimizer.step()) raises, never returns logits of
            # the new weight.
            from tritonize.kernels.deferred_logits import deferred_linear

            stand_in = m.call(deferred_linear, h, m["w"], m["b"])
            m.note = "logits deferred: computed on first read from the LM head's inputs (defer_logits=True)"
        if stand_in is not None:
            for u in outside:
                u.replace_input_with(lin, stand_in)
            outside = []
            # no (N, V) logits in the step, so the loss's chunk may be wide (up to N/4 rows: fewer
            # passes over dW; Llama 12L H1024 at 8192 tokens: 256 rows cost 162k tok/s against 191k
            # for the with-logits path's 2048, H100 session 4)
            kw = {"chunk_size": "wide"}
        if outside and same_dtype and all(order[u] > order[first_ret] for u in outside) \
                and m["red"] in ("mean", "sum"):
            # The logits are returned too: one fused call writes them and forms the loss, so the
            # LM head's matmul over the vocabulary runs once, not twice.
            from tritonize.patterns import kernel_fn

            both = m.call(kernel_fn("linear_cross_entropy", "linear_cross_entropy_with_logits"),
                          h, m["w"], m["t"], m["b"], m["ii"], m["red"])
            logits = m.getitem(both, 1)
            m.note = "logits returned: written by the fused LM head + loss (one matmul pass)"
            if m.options.get("aot") and all(u.op == "output" for u in outside) and \
                    _requires_grad(m, "h", "w", "b"):
                # The graph goes through AOTAutograd, which hands the backward a materialised
                # ZERO gradient for every returned output the caller did not differentiate: the
                # returned logits' backward (two (N, V)-deep matmuls) would then run on zeros
                # every step (Llama 12L, V 128256: ~6 ms of a 45 ms step on the H100). So the graph
                # returns them detached, with the LM head's inputs as extra outputs, and the
                # backend re-attaches their gradient OUTSIDE the compiled graph
                # (capture.attach_returned_logits): it runs only when something differentiates them.
                from tritonize.fuser.capture import lazy_logits

                logits = m.call(lazy_logits, logits, h, m["w"], m["b"])
                m.note += "; their gradient, if any, formed outside the compiled graph"
            for u in outside:
                u.replace_input_with(lin, logits)
            return [_cast_back(m, m.getitem(both, 0))]
        hv = m.val("h")
        if hv.dim() != 2:
            h = m.method("reshape", h, (-1, m.hidden_size))
        loss = m.call(fn, h, m["w"], m["t"], m["b"], m["ii"], m["red"], **kw)
        return [_cast_back(m, loss)]
