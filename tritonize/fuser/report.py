"""Report: what fused where, what was skipped and why, how the model was captured.

One `Report` per tritonized model (or per `torch.compile(..., backend="tritonize")` call). Every
captured graph adds its sites, so a recapture (a new shape, train()/eval() switch) adds its own
entries: `captures` says how many graphs the backend received.

    print(report)            # a table, one row per pattern
    report.to_dict()         # {"captures": .., "graph_breaks": [..], "fallback": .., "patterns": {...}}
    report.fused("attention")            # site names (module paths) fused by a pattern
    report.count("attention")            # how many sites
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
    capture: int = 0  # which captured graph (0-based)
    variant: str = ""  # which generated spelling matched


class Report:
    def __init__(self, name: str = ""):
        self.name = name
        self.sites: list[Site] = []
        self.captures = 0
        self.graph_breaks: list[str] = []
        self.fallback: str | None = None  # set when the model runs unmodified (capture failed)
        self._lock = threading.Lock()

    # -- recording (the fuser) -------------------------------------------------------------
    def new_capture(self) -> int:
        with self._lock:
            self.captures += 1
            return self.captures - 1

    def add(self, site: Site) -> None:
        with self._lock:
            self.sites.append(site)

    def add_graph_breaks(self, reasons) -> None:
        with self._lock:
            for r in reasons:
                if r not in self.graph_breaks:
                    self.graph_breaks.append(r)

    def clear(self) -> None:
        with self._lock:
            self.sites.clear()
            self.captures = 0
            self.graph_breaks.clear()
            self.fallback = None

    # -- reading ---------------------------------------------------------------------------
    def fused(self, pattern: str | None = None) -> list[str]:
        return [s.site for s in self.sites if s.fused and (pattern is None or s.pattern == pattern)]

    def skipped(self, pattern: str | None = None) -> list[tuple[str, str]]:
        return [(s.site, s.reason) for s in self.sites if not s.fused and (pattern is None or s.pattern == pattern)]

    def count(self, pattern: str | None = None) -> int:
        return len(self.fused(pattern))

    def patterns(self) -> list[str]:
        return list(OrderedDict.fromkeys(s.pattern for s in self.sites))

    def to_dict(self) -> dict:
        pats = {}
        for name in self.patterns():
            pats[name] = {
                "fused": self.fused(name),
                "skipped": [{"site": s, "reason": r} for s, r in self.skipped(name)],
            }
        return {
            "captures": self.captures,
            "graph_breaks": list(self.graph_breaks),
            "fallback": self.fallback,
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
        if self.graph_breaks:
            lines.append("  graph breaks:")
            for r in self.graph_breaks:
                lines.append(f"    {r}")
        return "\n".join(lines)

    __repr__ = __str__
