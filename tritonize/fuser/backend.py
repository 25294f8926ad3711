"""The "tritonize" torch.compile backend, registered through the `torch_dynamo_backends` entry
point in setup.cfg, so `torch.compile(model, backend="tritonize")` works without importing
tritonize first. Options come through `options={...}`:

    patterns=None   names (or families) of the patterns to apply; None = all
    exclude=()      names (or families) to leave out
    rest="eager"    what runs the rest of the graph: "eager" or "inductor"
    cudagraphs=False  replay each rewritten graph as a CUDA graph (see `tritonize.tritonize`)
    report=None     a tritonize Report to fill; default: `tritonize.fuser.backend.GLOBAL_REPORT`
"""

from __future__ import annotations

from tritonize.fuser.report import Report

GLOBAL_REPORT = Report("torch.compile(backend='tritonize')")

_OPTIONS = ("patterns", "exclude", "rest", "report", "strict", "cudagraphs")


def tritonize_backend(gm, example_inputs, options=None, **kwargs):
    from tritonize.fuser.capture import make_backend

    options = dict(options or {})
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"tritonize backend: unknown option(s) {sorted(unknown)}; known: {list(_OPTIONS)}")
    report = options.pop("report", None) or GLOBAL_REPORT
    compiler = make_backend(report, **options)
    return compiler(gm, example_inputs)
