"""softmax -> cross-entropy, and the LM head linear -> cross-entropy.

Spellings: F.cross_entropy(logits, target, ...), F.nll_loss(log_softmax(logits[.to(f32)], -1), ...);
for the LM head, F.cross_entropy(linear(h, W, b)[.to(f32)][.view/.reshape(-1, V)], target, ...)
when the logits are used by nothing else (HF models return their logits, so there it is skipped
with that reason and the plain cross-entropy fuses). Preceding shifts/flattens of the labels are
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


@register
class LinearCrossEntropy(Pattern):
    name = "linear_cross_entropy"
    family = "cross_entropy"
    priority = 60
    kernel = ("linear_cross_entropy", "linear_cross_entropy")

    def searches(self):
        for cast in (True, False):
            for view in (None, "view", "reshape"):
                def make(cast, view):
                    def f(h, w, b, t, wt, sa, ii, rd, red, ls, dt, shape):
                        z = F.linear(h, w, b)
                        if cast:
                            z = z.to(dt)
                        if view == "view":
                            z = z.view(shape)
                        elif view == "reshape":
                            z = z.reshape(shape)
                        return F.cross_entropy(z, t, wt, sa, ii, rd, red, ls)
                    return f

                f = make(cast, view)
                yield f"cast={cast},view={view}", {"cast": cast, "view": view}, f

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

        r = _ce_guard(m, val(z))
        if r:
            return r
        if m.get("ls", 0.0):
            return "label smoothing with the fused LM head"  # kernel supports it; keep the plain path simple
        from tritonize.patterns import static_int

        m.hidden_size = static_int(h.shape[-1])
        if m.hidden_size is None:
            return "hidden size is symbolic"
        return None

    def replace(self, m, fn):
        h = m["h"]
        hv = m.val("h")
        if hv.dim() != 2:
            h = m.method("reshape", h, (-1, m.hidden_size))
        loss = m.call(fn, h, m["w"], m["t"], m["b"], m["ii"], m["red"])
        return [_cast_back(m, loss)]
