"""rewrite: find every pattern's search graphs in a normalized GraphModule, guard, replace, record.

Matching uses `torch.fx.passes.utils.matcher_utils.SubgraphMatcher` (wildcard placeholders that
bind nodes or literals). Its own containment filter is replaced by ours so that a match whose
intermediate escapes (attention weights returned, logits returned) is *reported* as skipped with the
name of the escaping value instead of silently vanishing.

A pattern may declare intermediates that are allowed to escape (`Pattern.escapable`): the LM head's
logits returned beside the loss stay in the graph, and the fused call is computed beside them.

Order: patterns by priority (larger first); within a pattern, variants by size (larger first); a
node already consumed by an earlier rewrite is never matched again.
"""

from __future__ import annotations

import re

import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from tritonize.fuser.normalize import propagate
from tritonize.fuser.report import Report, Site
from tritonize.patterns import LEFT_TO_INDUCTOR, NOT_THIS_VARIANT, Match, Pattern, small_site_reason


class _Matcher(SubgraphMatcher):
    def _is_contained(self, nodes_map) -> bool:  # containment is checked (and reported) by us
        return True

    def _match_nodes(self, pn, gn, match, node_name_match: str = "") -> bool:
        # Two wildcards may bind the same value (F.sdpa(x, x, x), k is v): upstream refuses that.
        if pn.op == "placeholder" and not self.match_placeholder:
            if pn in match.nodes_map:
                return match.nodes_map[pn] == gn
            match.nodes_map[pn] = gn
            return True
        return super()._match_nodes(pn, gn, match, node_name_match)


def _describe(n: fx.Node) -> str:
    t = n.target
    t = getattr(t, "__name__", str(t))
    return f"'{n.name}' ({t})"


_PREFIX = re.compile(r"^(?:[LG]\['[^']*'\]|self)\.?")
_MODULES = re.compile(r"\._modules\['([^']*)'\]|\[['\"]?([^'\"\]]+)['\"]?\]")


def module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else str(path)
    path = _PREFIX.sub("", path)
    path = _MODULES.sub(lambda mo: "." + (mo.group(1) or mo.group(2)), path)
    return path.strip(".")


def site_name(nodes) -> str:
    paths = [module_path(n) for n in nodes]
    paths = [p.split(".") if p else [] for p in paths if p is not None]
    if not paths:
        return "<root>"
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common) or "<root>"


def rewrite(gm: fx.GraphModule, patterns: list[Pattern], report: Report, capture: int = 0,
            options: dict | None = None) -> int:
    """Apply `patterns` to `gm` in place; returns the number of sites fused. `options`: what the
    user asked of the rewrite (e.g. {"drop_logits": True}), read by patterns as `m.options`."""
    graph = gm.graph
    consumed: set[fx.Node] = set()
    replaced: dict[fx.Node, object] = {}
    reported: set = set()
    fused = 0
    for pat in patterns:
        try:
            kfn, kerr = pat.kernel_function(), None
        except Exception as e:  # noqa: BLE001 - any import failure declines the pattern
            kfn, kerr = None, f"kernel unavailable: {type(e).__name__}: {e}"
        for label, flags, pgraph in pat.compiled():
            matcher = _Matcher(pgraph, match_output=False, match_placeholder=False, remove_overlapping_matches=True)
            pnames = {pn: pn.target for pn in pgraph.nodes if pn.op == "placeholder"}
            for im in matcher.match(graph):
                nodes = [gn for pn, gn in im.nodes_map.items() if pn.op not in ("placeholder", "output")]
                if any(n in consumed or n.graph is not graph for n in nodes):
                    continue
                bind = {}
                for pn, gn in im.nodes_map.items():
                    if pn.op == "placeholder":
                        while isinstance(gn, fx.Node) and gn in replaced:
                            gn = replaced[gn]
                        bind[pnames[pn]] = gn
                returning = list(im.returning_nodes)
                m = Match(pat, label, dict(flags), bind, nodes, returning, graph)
                m.options = options or {}
                extra = set(returning[1:])
                m.site = site_name(pat.site_nodes(m) or [n for n in nodes if n not in extra] or nodes)
                anchor_key = (pat.name, returning[-1])
                reason = (_escape_reason(nodes, returning, pat.escapable(m)) or (kerr if kfn is None else None)
                          or (LEFT_TO_INDUCTOR if pat.name in m.options.get("leave_to_inductor", ()) else None)
                          or (small_site_reason(pat.name, m.out_val(0)) if m.options.get("size_policy") else None)
                          or pat.guard(m))
                if reason is None:
                    m.note = pat.note(m)
                    reason = _apply(graph, m, kfn)
                if reason is NOT_THIS_VARIANT:
                    continue  # a later (smaller) variant may match these nodes; nothing to report
                if reason is not None:
                    if anchor_key not in reported:
                        reported.add(anchor_key)
                        report.add(Site(pat.name, m.site, False, reason, capture, label))
                    continue
                reported.add(anchor_key)
                consumed.update(nodes)
                consumed.update(m.new_nodes)
                fused += 1
                report.add(Site(pat.name, m.site, True, "", capture, label, note=m.note))
                for old, new in zip(returning, m.new_values):
                    replaced[old] = new
    _drop_dead_constants(graph)
    graph.lint()
    gm.recompile()
    return fused


def _drop_dead_constants(graph: fx.Graph) -> None:
    """Erase values a rewrite made dead that a pattern marked `meta["tritonize_drop_if_dead"]`
    (a constant causal mask replaced by is_causal), with the ancestors only they used. Only
    functional nodes go: nothing in place, random or side-effecting is touched."""
    roots = [n for n in graph.nodes if n.meta.get("tritonize_drop_if_dead") and not n.users]
    for root in roots:
        stack = [root]
        while stack:
            n = stack.pop()
            if n.graph is not graph or n.users or not _pure(n):
                continue
            inputs = n.all_input_nodes
            graph.erase_node(n)
            stack.extend(inputs)


def _pure(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if name.endswith("_") or "rand" in name or "dropout" in name or "bernoulli" in name or "normal" in name:
        return False
    if n.op == "call_function":
        import operator

        if n.target in (operator.setitem,) or n.target in fx.node._side_effectful_functions:
            return False
        schema = getattr(n.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return False
    return True


def _escape_reason(nodes, returning, escapable=()) -> str | None:
    members = set(nodes)
    ret = set(returning)
    for n in nodes:
        if n in ret or n in escapable:
            continue
        for u in n.users:
            if u not in members:
                what = "the graph's output" if u.op == "output" else _describe(u)
                return f"intermediate {_describe(n)} is also used by {what} outside the pattern"
    return None


def _apply(graph: fx.Graph, m: Match, kfn) -> str | None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    first_ret = min(m.returning, key=lambda n: order[n])
    unused = m.pattern.unused_inputs(m)
    read = [v for k, v in m.bind.items() if k not in unused]
    inputs = [v for v in read if isinstance(v, fx.Node)]
    for v in read:  # nodes nested in bound tuples (shapes with SymInts)
        if isinstance(v, (list, tuple)):
            inputs += [a for a in v if isinstance(a, fx.Node)]
    late = [n for n in inputs if order.get(n, -1) >= order[first_ret]]
    for n in late:
        if n.op == "get_attr" and not n.all_input_nodes:
            first_ret.prepend(n)  # a parameter read may move up
        else:
            return f"cannot order the fused call: {_describe(n)} is computed after the pattern's first result"
    with graph.inserting_before(first_ret):
        before = set(graph.nodes)
        outs = m.pattern.replace(m, kfn)
    if not isinstance(outs, (list, tuple)):
        outs = [outs]
    new_nodes = [n for n in graph.nodes if n not in before]
    like = m.returning[-1]
    for n in new_nodes:
        propagate(n, like)
    m.new_values = list(outs)
    m.new_nodes = new_nodes  # the fused call(s): never matched again (a later variant of the same
    # pattern would otherwise see e.g. the SDPA call it put in place of a masked one)
    for old, new in zip(m.returning, outs):
        old.replace_all_uses_with(new)
    members = sorted(set(m.nodes), key=lambda n: -order[n])
    for n in members:
        if not n.users:
            graph.erase_node(n)
    return None
