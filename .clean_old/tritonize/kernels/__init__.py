"""Triton kernels, one file per op, each with a custom backward.

Public functional API (torch-style signatures):

    layer_norm(x, weight, bias, eps)            add_layer_norm(x, residual, weight, bias, eps)
    rms_norm(x, weight, eps)                    add_rms_norm(x, residual, weight, eps)
    softmax(x, dim=-1)                          dropout(x, p, training=True)
    linear_act(x, weight, bias=None, activation="gelu")
    gated_linear(x, w_gate, w_up, activation="silu")
    gated_mlp(x, w_gate, w_up, w_down, activation="silu")   # + the down projection, product not saved
    attention(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0)
    rotary_embedding(q, k, cos, sin)            # HF's apply_rotary_pos_emb, q and k in one launch
    cross_entropy(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0)
    linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean")
    linear_cross_entropy_with_logits(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean")

Names resolve lazily (PEP 562), so `import tritonize.kernels` does not compile or import every
kernel module, and one op's module can be imported on its own.
"""

import importlib
import sys
import types

# public name -> module (inside this package) that defines it
_EXPORTS = {
    "layer_norm": "layer_norm",
    "add_layer_norm": "layer_norm",
    "rms_norm": "rms_norm",
    "add_rms_norm": "rms_norm",
    "softmax": "softmax",
    "dropout": "dropout",
    "linear_act": "linear_act",
    "gated_linear": "linear_act",
    "gated_mlp": "linear_act",
    "ACTIVATIONS": "_activations",
    "attention": "attention",
    "cross_entropy": "cross_entropy",
    "linear_cross_entropy": "linear_cross_entropy",
    "linear_cross_entropy_with_logits": "linear_cross_entropy",
    "deferred_linear": "deferred_logits",
    "rotary_embedding": "rotary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tritonize.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # cache: the next lookup is a plain attribute read
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _KernelsPackage(types.ModuleType):
    """Most ops share their module's name (`layer_norm` in `layer_norm.py`). Importing a
    submodule makes the import system set it as an attribute of this package, which would
    replace the op; keep the op instead (the module stays in sys.modules and importable)."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage
