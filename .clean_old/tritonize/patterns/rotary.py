"""rotary: rotary position embeddings in the rotate-half convention -> tritonize.kernels.rotary_embedding.

transformers' Llama (and the models that copy its `apply_rotary_pos_emb`: Mistral, Qwen2, Gemma,
GPT-NeoX, Phi, ...) writes

    x1, x2 = x[..., :D/2], x[..., D/2:]
    x_embed = x * cos + cat((-x2, x1), dim=-1) * sin

for q and for k with the same cos and sin. Eager, that is 7 kernels per tensor forward and ~6
backward, each a round trip through memory and a Python-level call; the kernel does q and k in one
launch each way (see kernels/rotary.py).

Spellings generated: `x * cos` or `cos * x`, `rot * sin` or `sin * rot`, either order of the sum.
The halves x1 and x2 are wildcards that the guard checks to be x's two halves along the last dim
(slices are literals the subgraph matcher cannot bind). The pair form (q and k, priority above
the single form) becomes one call; a tensor rotated alone (or a pair the matcher cannot order)
takes the single form.

Partial rotary (`q_rot = q[..., :rot]` rotated and concatenated back with the rest) matches with
x = the rotated slice. rest="inductor" leaves these sites to Inductor (it fuses them as well).
"""

from __future__ import annotations

import itertools
import operator

import torch

from tritonize.patterns import FLOATS, NOT_THIS_VARIANT, Pattern, first_problem, register, static_int, tensor_problem

_SPELLINGS = list(itertools.product([True, False], [True, False], [True, False]))


def _rot(x, c, s, x1, x2, dim, cos_first, sin_first, rot_first):
    a = c * x if cos_first else x * c
    r = torch.cat((-x2, x1), dim)
    b = s * r if sin_first else r * s
    return b + a if rot_first else a + b


def _label(cos_first, sin_first, rot_first):
    return f"{'c*x' if cos_first else 'x*c'},{'s*r' if sin_first else 'r*s'},{'r+' if rot_first else 'x+'}"


# Search functions are traced with every argument a wildcard, so the spelling is closed over.
def _single_search(cf, sf, rf):
    def single(x, cos, sin, x1, x2, dim):
        return _rot(x, cos, sin, x1, x2, dim, cf, sf, rf)

    return single


def _pair_search(cf, sf, rf):
    def pair(q, k, cos, sin, q1, q2, k1, k2, dq, dk):
        return _rot(q, cos, sin, q1, q2, dq, cf, sf, rf), _rot(k, cos, sin, k1, k2, dk, cf, sf, rf)

    return pair


def _halves_problem(m, x, x1, x2, dim) -> str | None:
    """None when x1, x2 are x[..., :D/2] and x[..., D/2:] and the cat is along the last dim."""
    xv = m.val(x)
    r = tensor_problem(x, xv, dtypes=FLOATS)
    if r:
        return r
    d = static_int(xv.shape[-1]) if xv.dim() else None
    if d is None or d % 2 or d == 0:
        return f"{x}'s last dim is not a static even size"
    if not isinstance(dim, int) or dim not in (-1, xv.dim() - 1):
        return "the halves are not concatenated along the last dim"
    half = d // 2
    for name, want in ((x1, (0, half)), (x2, (half, d))):
        if _slice_of(m[name], m[x], d) != want:
            return f"{name} is not {'the first' if want[0] == 0 else 'the second'} half of {x}'s last dim"
    return None


def _slice_source(node):
    """The tensor `node` indexes (`src[...]`), or None when node is no getitem."""
    return node.args[0] if getattr(node, "op", None) == "call_function" and node.target is operator.getitem else None


def _slice_of(node, src, d):
    """(start, stop) when `node` is src[..., start:stop] (step 1) along the last dim, else None."""
    if _slice_source(node) is not src:
        return None
    idx = node.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)):
        return None
    sl = idx[1]
    if sl.step not in (None, 1):
        return None
    start = 0 if sl.start is None else sl.start
    stop = d if sl.stop is None else sl.stop
    if not (isinstance(start, int) and isinstance(stop, int)):
        return None
    start, stop = (start + d if start < 0 else start), (stop + d if stop < 0 else stop)
    return start, min(stop, d)


def _cos_sin_problem(m, xs) -> str | None:
    for name in ("cos", "sin"):
        t = m.val(name)
        r = tensor_problem(name, t, dtypes=FLOATS)
        if r:
            return r
        for x in xs:
            xv = m.val(x)
            if t.device != xv.device:
                return f"{name} is on {t.device}, {x} on {xv.device}"
            try:
                ok = tuple(torch.broadcast_shapes(t.shape, xv.shape)) == tuple(xv.shape)
            except Exception:  # noqa: BLE001 - symbolic sizes that cannot be compared without a guard
                ok = False
            if not ok:
                return f"{name} {tuple(t.shape)} does not broadcast to {x}'s shape {tuple(xv.shape)}"
    return None


def _drop_halves(m, *names):
    """The slices x1, x2 are outside the match (wildcards): once the fused call replaces their
    users they are dead views; marked so the rewrite erases them (one Python call each per step)."""
    for name in names:
        node = m[name]
        if hasattr(node, "meta"):
            node.meta["tritonize_drop_if_dead"] = True


@register
class RotaryPair(Pattern):
    name = "rotary_qk"
    family = "rotary"
    priority = 12
    kernel = ("rotary", "rotary_embedding")

    def searches(self):
        for sp in _SPELLINGS:
            yield f"rotary_qk[{_label(*sp)}]", {}, _pair_search(*sp)

    def guard(self, m):
        r = first_problem(_halves_problem(m, "q", "q1", "q2", m["dq"]), _halves_problem(m, "k", "k1", "k2", m["dk"]),
                          _cos_sin_problem(m, ("q", "k")))
        if r:
            return NOT_THIS_VARIANT  # the single form reports the site (or fuses each tensor)
        qv, kv = m.val("q"), m.val("k")
        if qv.shape[-1] != kv.shape[-1] or qv.device != kv.device:
            return NOT_THIS_VARIANT
        # the matcher may pair q of one layer with k of another when cos/sin are shared across
        # layers: the fused call would then need a later layer's k before its q's users
        order = {n: i for i, n in enumerate(m.graph.nodes)}
        first_out = min(order[n] for n in m.returning)
        if any(order.get(m[n], -1) >= first_out for n in ("q", "k", "cos", "sin")):
            return NOT_THIS_VARIANT
        return None

    def unused_inputs(self, m):
        return {"q1", "q2", "k1", "k2"}

    def replace(self, m, fn):
        _drop_halves(m, "q1", "q2", "k1", "k2")
        out = m.call(fn, m["q"], m["k"], m["cos"], m["sin"])
        return [m.getitem(out, 0), m.getitem(out, 1)]


@register
class Rotary(Pattern):
    name = "rotary"
    family = "rotary"
    priority = 11
    kernel = ("rotary", "rotary_embedding")

    def searches(self):
        for sp in _SPELLINGS:
            yield f"rotary[{_label(*sp)}]", {}, _single_search(*sp)

    def guard(self, m):
        if _slice_source(m["x1"]) in (m["cos"], m["sin"]):
            return NOT_THIS_VARIANT  # a commuted spelling bound x to cos or sin; another one fits
        return first_problem(_halves_problem(m, "x", "x1", "x2", m["dim"]), _cos_sin_problem(m, ("x",)))

    def unused_inputs(self, m):
        return {"x1", "x2"}

    def replace(self, m, fn):
        _drop_halves(m, "x1", "x2")
        return [m.getitem(m.call(fn, m["x"], None, m["cos"], m["sin"]), 0)]
