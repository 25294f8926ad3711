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


def ignore_warning_once() -> None:
    """Let Dynamo trace through `logger.warning_once` (transformers' "loss_type=None" warning in
    every causal LM's loss property) instead of breaking the graph there: with the break, the LM
    head and the loss land in two graphs and cannot fuse (GPT-2 B8 T1024 on the H100: 239k tok/s
    through this backend against 399k through `tritonize()`, session 7 run 5). `tritonize()`
    patches this Dynamo setting around its own calls; a torch.compile backend is called after
    tracing, so the setting is made when Dynamo looks the backend up (this module's import) and
    again on every compile (a library imported later adds the method). Effect beyond our graphs:
    under torch.compile such warnings are not printed, as under `tritonize()`."""
    import torch._dynamo.config as dcfg

    from tritonize.fuser.api import ignored_logger_methods

    methods = ignored_logger_methods()
    if methods is not None:
        dcfg.ignore_logger_methods = methods


ignore_warning_once()

_OPTIONS = ("patterns", "exclude", "rest", "report", "strict", "cudagraphs")


def tritonize_backend(gm, example_inputs, options=None, **kwargs):
    from tritonize.fuser.capture import make_backend

    options = dict(options or {})
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"tritonize backend: unknown option(s) {sorted(unknown)}; known: {list(_OPTIONS)}")
    ignore_warning_once()
    report = options.pop("report", None) or GLOBAL_REPORT
    compiler = make_backend(report, **options)
    return compiler(gm, example_inputs)
