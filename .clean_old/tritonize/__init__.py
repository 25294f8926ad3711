"""tritonize: a JIT graph-fusion compiler pass for PyTorch.

    from tritonize import tritonize
    model = tritonize(model)            # same module back, forward now runs fused kernels
    print(tritonize.report(model))      # what fused where, what was skipped and why

This file is a thin face: importing `tritonize` imports neither the fuser nor Triton, so it is
cheap and needs no GPU. The work lives in `tritonize.fuser` (the compiler pass),
`tritonize.patterns` (what to match) and `tritonize.kernels` (the Triton kernels).
"""

__version__ = "0.1.0"

__all__ = ["tritonize", "untritonize", "report", "__version__"]


def tritonize(model, **options):
    """Rewrite `model`'s forward into fused Triton kernels; returns the same module object.

    Options (see `tritonize.fuser.api.tritonize`): patterns=None, exclude=(), rest="eager",
    strict=False, dynamic=None, cudagraphs=False, drop_logits=False, gqa_fold=None,
    defer_logits=None.
    """
    from .fuser.api import tritonize as _tritonize

    return _tritonize(model, **options)


def untritonize(model):
    """Undo `tritonize(model)`: the module runs its original forward again."""
    from .fuser.api import untritonize as _untritonize

    return _untritonize(model)


def report(model):
    """The report of what fused where in a tritonized `model` (printable; `.to_dict()`)."""
    from .fuser.api import report as _report

    return _report(model)


# The contract spells it `tritonize.report(model)` after `from tritonize import tritonize`.
tritonize.report = report
tritonize.untritonize = untritonize
