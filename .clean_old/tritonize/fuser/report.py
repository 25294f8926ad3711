"""Report: what fused where, what was skipped and why, how the model was captured.

One `Report` per tritonized model (or per `torch.compile(..., backend="tritonize")` call).
A site is unique per (pattern, module path, fused or skipped + reason): a recapture (a new shape,
a train()/eval() switch, a graph break's resumed frame) does not add entries, it bumps the site's
`captures` (how many captured graphs contained it). `n` is how many matches one graph had at that
path (a module called twice, or several losses at the top level): `count()` sums `n`, so it counts
the model's fusion sites whatever the number of recaptures. `captures` says how many graphs the
backend received.

    print(report)            # a table, one row per pattern
    report.to_dict()         # {"captures": .., "graph_breaks": [..], "fallback": .., "patterns": {...}}
    report.fused("attention")            # site names (module paths) fused by a pattern (n times each)
    report.count("attention")            # how many sites

Site names are module paths of the *tritonized model* ("transformer.h.3.attn"): a graph captured
from a resumed frame (after a graph break inside a submodule) sees paths relative to that
submodule ("h.3.attn"); `set_module_names` gives the report the model's own names so such a path
is mapped back to its unique full name.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict


@dataclasses.dataclass
class Site:
    pattern: str
    site: str  # module path such as "transformer.h.3.attn" ("<root>" for code at the top level)
    fused: bool
    reason: str = ""  # why it was skipped
    capture: int = 0  # the first captured graph (0-based) that contained it
    variant: str = ""  # which generated spelling matched
    note: str = ""  # e.g. "logits are still materialised: they are returned"
    captures: int = 1  # how many captured graphs contained this site
    n: int = 1  # matches at this path in one graph (the most seen in any capture)


class Report:
    def __init__(self, name: str = ""):
        self.name = name
        self.sites: list[Site] = []
        self.captures = 0
        self.graph_breaks: list[str] = []
        self.fallback: str | None = None  # set when the model runs unmodified (capture failed)
        self.cudagraphs: list[str] = []  # with cudagraphs=True: per captured graph, on or why not
        self._lock = threading.Lock()
        self._index: dict[tuple, tuple[Site, dict]] = {}  # key -> (site, {capture: matches})
        self._names = None  # callable -> iterable of the model's module names (or None)
        self._canon: dict[str, str] = {}

    def set_module_names(self, names_fn) -> None:
        """`names_fn()` -> the tritonized model's module names (called lazily, cached per path)."""
        self._names = names_fn
        self._canon.clear()

    def canonical_site(self, path: str) -> str:
        """`path` as a full module path of the model: unchanged when it is one; else the unique
        model path ending with ".<path>" (a graph captured from a resumed frame)."""
        if self._names is None or not path or path.startswith("<"):
            return path
        got = self._canon.get(path)
        if got is None:
            try:
                names = list(self._names() or ())
            except Exception:  # noqa: BLE001 - the model may be gone
                names = []
            if path in names:
                got = path
            else:
                ends = [n for n in names if n.endswith("." + path)]
                got = ends[0] if len(ends) == 1 else path
            self._canon[path] = got
        return got

    # -- recording (the fuser) -------------------------------------------------------------
    def new_capture(self) -> int:
        with self._lock:
            self.captures += 1
            return self.captures - 1

    def add(self, site: Site) -> None:
        with self._lock:
            site.site = self.canonical_site(site.site)
            key = (site.pattern, site.site, site.fused, site.reason)
            entry = self._index.get(key)
            if entry is None:
                site.captures, site.n = 1, 1
                self._index[key] = (site, {site.capture: 1})
                self.sites.append(site)
                return
            old, per_capture = entry
            per_capture[site.capture] = per_capture.get(site.capture, 0) + 1
            old.captures = len(per_capture)
            old.n = max(per_capture.values())
            if site.note and not old.note:
                old.note = site.note

    def add_graph_breaks(self, reasons) -> None:
        with self._lock:
            for r in reasons:
                if r not in self.graph_breaks:
                    self.graph_breaks.append(r)

    def add_cudagraph_note(self, note: str) -> None:
        with self._lock:
            self.cudagraphs.append(note)

    def set_cudagraph_note(self, prefix: str, note: str) -> None:
        """Replace the last note starting with `prefix` (a graph torch declined after our check)."""
        with self._lock:
            for i in range(len(self.cudagraphs) - 1, -1, -1):
                if self.cudagraphs[i].startswith(prefix):
                    self.cudagraphs[i] = note
                    return
            self.cudagraphs.append(note)

    def clear(self) -> None:
        with self._lock:
            self.sites.clear()
            self._index.clear()
            self.captures = 0
            self.graph_breaks.clear()
            self.cudagraphs.clear()
            self.fallback = None

    # -- reading ---------------------------------------------------------------------------
    def fused(self, pattern: str | None = None) -> list[str]:
        return [s.site for s in self.sites if s.fused and (pattern is None or s.pattern == pattern)
                for _ in range(s.n)]

    def skipped(self, pattern: str | None = None) -> list[tuple[str, str]]:
        return [(s.site, s.reason) for s in self.sites if not s.fused and (pattern is None or s.pattern == pattern)]

    def count(self, pattern: str | None = None) -> int:
        return len(self.fused(pattern))

    def patterns(self) -> list[str]:
        return list(OrderedDict.fromkeys(s.pattern for s in self.sites))

    def to_dict(self) -> dict:
        pats = {}
        for name in self.patterns():
            sites = [s for s in self.sites if s.pattern == name]
            pats[name] = {
                "fused": [_site_dict(s) for s in sites if s.fused],
                "skipped": [dict(_site_dict(s), reason=s.reason) for s in sites if not s.fused],
            }
        return {
            "captures": self.captures,
            "graph_breaks": list(self.graph_breaks),
            "fallback": self.fallback,
            "cudagraphs": list(self.cudagraphs),
            "patterns": pats,
        }

    def __str__(self) -> str:
        lines = [f"tritonize report{(' for ' + self.name) if self.name else ''}: "
                 f"{self.captures} graph(s) captured, {len(self.graph_breaks)} graph break(s)"]
        if self.fallback:
            lines.append(f"  model runs UNMODIFIED: {self.fallback}")
        rows = [("pattern", "fused", "skipped", "sites")]
        for name in self.patterns():
            fused = self.fused(name)
            skipped = self.skipped(name)
            uniq = list(OrderedDict.fromkeys(fused))
            sites = ", ".join(uniq[:6]) + (f", ... ({len(uniq)} distinct)" if len(uniq) > 6 else "")
            notes = list(OrderedDict.fromkeys(s.note for s in self.sites if s.pattern == name and s.fused and s.note))
            if notes:
                sites += " (" + "; ".join(notes) + ")"
            rows.append((name, str(len(fused)), str(len(skipped)), sites or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            lines.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])
        skipped_all = [(s.pattern, s.site, s.reason) for s in self.sites if not s.fused]
        if skipped_all:
            lines.append("  skipped:")
            seen = set()
            for p, site, reason in skipped_all:
                if (p, site, reason) in seen:
                    continue
                seen.add((p, site, reason))
                lines.append(f"    {p} @ {site}: {reason}")
        if self.cudagraphs:
            lines.append("  cudagraphs:")
            for r in self.cudagraphs:
                lines.append(f"    {r}")
        if self.graph_breaks:
            lines.append("  graph breaks:")
            for r in self.graph_breaks:
                lines.append(f"    {r}")
        return "\n".join(lines)

    __repr__ = __str__


def _site_dict(s: Site) -> dict:
    d = {"site": s.site, "n": s.n, "captures": s.captures}
    if s.note:
        d["note"] = s.note
    return d
