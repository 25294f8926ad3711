"""tritonize(model) / untritonize(model) / report(model).

`tritonize` compiles the module's call through the tritonize Dynamo backend, the way
`nn.Module.compile` does (it sets `_compiled_call_impl`), and returns the SAME module object: its
parameters, buffers and `state_dict` are untouched, `train()/eval()`, `.to(device/dtype)`,
`no_grad`/`inference_mode` and autocast keep working (Dynamo guards on them and recaptures), and
HF's `generate()`, which calls `self(...)`, runs fused.

Dynamic shapes: automatic dynamic (torch.compile's `dynamic=None`). The first call captures a
graph specialised to its shapes; the first call with a different size (a new sequence length)
recaptures ONCE with that size symbolic, and every later length reuses it. So N sequence lengths
cost at most 2 captures (per train/eval mode), not N, and the common fixed-shape training loop gets
a fully static graph. `dynamic=True` marks everything dynamic from the first call (one capture).
Guards read sizes through `tritonize.patterns.static_int`, which never specialises a symbolic size.

Each model gets its own entry function (a distinct code object), so Dynamo's per-code-object
recompile limit is counted per model, not shared by every module in the process.

A model Dynamo cannot capture at all runs unmodified, with one warning saying why (the report's
`fallback`); `strict=True` raises instead.
"""

from __future__ import annotations

import logging
import types
import warnings
import weakref

import torch
import torch.nn as nn

from tritonize.fuser.capture import make_backend
from tritonize.fuser.report import Report

_STATE = "_tritonize_state"


class _State:
    def __init__(self, model, report, options):
        self.report = report
        self.options = options
        self.calls = 0
        self.disabled = False
        self.compiled = None

    def __deepcopy__(self, memo):  # a deep copy of a tritonized model is a plain (eager) model
        return None


class _TritonizedCall:
    """What `model._compiled_call_impl` holds: runs the compiled entry, watches the first calls."""

    def __init__(self, model, state):
        self.model_ref = model
        self.state = state

    def __deepcopy__(self, memo):
        return None

    def __call__(self, *args, **kwargs):
        st = self.state
        model = self.model_ref
        if st.disabled:
            return model._call_impl(*args, **kwargs)
        from torch._dynamo.utils import counters

        n0 = st.report.captures
        b0 = dict(counters["graph_break"])  # process-wide: only what THIS call adds is this model's
        first = st.calls == 0
        try:
            with _quiet_loggers():
                out = st.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if not first:
                raise
            # Dynamo (or our pass) failed on the first call: if eager runs, run eager from now on.
            out = model._call_impl(*args, **kwargs)  # a user error re-raises from here, as eager
            self._fallback(f"Dynamo could not capture the model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", e)
            return out
        st.calls += 1
        if st.report.captures != n0 or len(counters["graph_break"]) != len(b0) or \
                sum(counters["graph_break"].values()) != sum(b0.values()):
            st.report.add_graph_breaks(_break_reasons(counters, b0))
        if first and st.report.captures == n0:
            why = "; ".join(st.report.graph_breaks) or "the forward was skipped or ran entirely outside Dynamo"
            self._fallback(f"Dynamo captured no graph ({why})", None)
        return out

    def _fallback(self, reason, exc):
        st = self.state
        if st.options.get("strict"):
            raise RuntimeError(f"tritonize(strict=True): {reason}") from exc
        st.disabled = True
        st.report.fallback = reason
        warnings.warn(f"tritonize: {type(self.model_ref).__name__} runs unmodified: {reason}", stacklevel=3)


# One-time logging calls that libraries make inside forward (transformers' `logger.warning_once`
# about `loss_type=None` in every causal LM) are a graph break for Dynamo. Inside tritonize's
# capture they are ignored (Dynamo treats them as no-ops; they still run wherever the code runs
# eagerly). Generic: the `logging.Logger.warning_once` method a library added (transformers does),
# not a per-model list.
_ONCE: dict = {}


def _once_methods() -> set:
    key = len(vars(logging.Logger))  # recomputed only when a library adds methods
    if key not in _ONCE:
        _ONCE.clear()
        # warning_once only: transformers' methods are lru_cache wrappers, which do not compare,
        # and Dynamo sorts this config set when it logs compile metrics (two of them there made
        # it log "Unexpected exception logging compilation metrics" at ERROR on every compile).
        once = vars(logging.Logger).get("warning_once")
        _ONCE[key] = {once} if callable(once) else set()
    return _ONCE[key]


def ignored_logger_methods():
    """Dynamo's `ignore_logger_methods` with `warning_once` added, or None when that is already
    so (or this torch / no library has the setting or the method)."""
    import torch._dynamo.config as dcfg

    once = _once_methods()
    if not once or not hasattr(dcfg, "ignore_logger_methods"):
        return None
    current = set(dcfg.ignore_logger_methods)
    if once <= current:
        return None
    _json_safe_config_logging()
    return current | once


def _quiet_loggers():
    import contextlib

    import torch._dynamo.config as dcfg

    methods = ignored_logger_methods()
    return contextlib.nullcontext() if methods is None else dcfg.patch(ignore_logger_methods=methods)


_JSON_SAFE = [False]


def _json_safe_config_logging() -> None:
    """Dynamo logs its config as JSON with every compile's metrics. torch <= 2.11 does not leave
    `ignore_logger_methods` out of that dump, and a function in it is not JSON: every compile
    under our patch then logged an ERROR traceback ("Object of type _lru_cache_wrapper is not JSON
    serializable", seen on the H100 machine). The dump is metrics only; it becomes None (a value
    it may take) instead of raising. torch >= 2.13 leaves the set out, and nothing changes there."""
    if _JSON_SAFE[0]:  # once per process: this runs on every tritonized call
        return
    _JSON_SAFE[0] = True
    import torch._dynamo.utils as dutils

    fn = getattr(dutils, "_get_dynamo_config_for_logging", None)
    if fn is None or getattr(fn, "_tritonize_json_safe", False):
        return

    def safe():
        try:
            return fn()
        except (TypeError, ValueError):
            return None

    safe._tritonize_json_safe = True
    dutils._get_dynamo_config_for_logging = safe


def _break_reasons(counters, before=None) -> list[str]:
    before = before or {}
    return [str(k) for k, v in counters["graph_break"].items() if v != before.get(k, 0)]


def _entry_for(model, tag: int, guard_training: bool = False):
    """A fresh function with its own code object that calls `model._call_impl`. With
    `guard_training`, it branches on `model.training`, so Dynamo guards on the flag even for a
    model whose forward never reads it (what drop_logits decides at capture must not outlive a
    switch between train() and eval())."""

    if guard_training:
        def _tritonize_entry(*args, **kwargs):
            if model.training:
                return model._call_impl(*args, **kwargs)
            return model._call_impl(*args, **kwargs)
    else:
        def _tritonize_entry(*args, **kwargs):
            return model._call_impl(*args, **kwargs)

    code = _tritonize_entry.__code__.replace(co_name=f"_tritonize_entry_{tag}")
    return types.FunctionType(code, _tritonize_entry.__globals__, code.co_name, None, _tritonize_entry.__closure__)


_counter = [0]


def tritonize(model: nn.Module, *, patterns=None, exclude=(), rest: str = "eager", strict: bool = False,
              dynamic: bool | None = None, cudagraphs: bool = False, drop_logits: bool = False,
              gqa_fold: bool | None = None, defer_logits: bool | None = None):
    """Rewrite `model`'s forward into fused Triton kernels; returns the same module object.

    patterns: None (all) or names/families of patterns to apply; exclude: names/families to leave
    out; rest: "eager" (the unfused rest runs as PyTorch) or "inductor" (Inductor compiles the rest
    and calls our ops; plain linear -> activation and the norms are then left to Inductor unless
    `patterns` names them, because measured faster there; the report says so per site); strict: raise instead of
    running unmodified when Dynamo cannot capture the model; dynamic: torch.compile's `dynamic`
    (default None = automatic dynamic: at most one recapture when sizes change, see module doc);
    cudagraphs: record each rewritten graph (forward and backward) as a CUDA graph and replay it
    (torch's CUDA graph trees, as `torch.compile(mode="reduce-overhead")`): one host call per graph
    instead of one per op. Opt-in, as in torch.compile: a replay overwrites the previous call's
    outputs, so keep `.clone()`s of outputs you hold across calls (torch raises if you read an
    overwritten one); a graph drawing dropout seeds on the CPU, or off the GPU, runs uncaptured
    and the report's `cudagraphs` lines say why;
    drop_logits: in training mode, when the model computes its loss from its LM head (HF causal
    LMs called with labels=), return an EMPTY logits tensor instead of the (tokens, vocab) matrix,
    as Liger-Kernel does by default (its `logits` is None then): the 2 GB of a 128k-vocabulary
    batch are never written. Opt-in, because code that reads `out.logits` in training then gets
    an empty tensor (an error at first use, not wrong values); eval mode keeps the logits.
    gqa_fold: where torch's fused SDPA is kept (CUDA, half precision, causal or no mask) and
    k, v arrive repeated to every query head (transformers' repeat_kv, which it applies whenever
    it passes a mask, as under Dynamo), call SDPA on the kv heads as they are (enable_gqa=True):
    the H-head copies of k and v are neither made nor saved (Llama 12L B4 T2048 on an H100:
    0.4 GB less peak memory), nor the repeat's copies and saved-tensor hooks run per layer. None
    (default): on with rest="eager" without cudagraphs (measured faster: Llama 12L B4 T2048,
    H100, interleaved in one process, 38.4 vs 53.4 ms per step, session 7 run 1) and with
    drop_logits; off in the AOTAutograd modes (rest="inductor", cudagraphs=True), where it
    measured neutral (Llama rest="inductor": 39.09 vs 39.15 ms, session 7 run 14). Calls that go to
    our attention kernel always take the kv heads as they are (its GQA costs nothing extra).
    defer_logits: in training (gradients on), when the model computes its loss from its LM head
    and only returns the logits, return them as a DeferredLogits (kernels/deferred_logits.py):
    a tensor that computes F.linear(hidden, W, b) on its first read and then behaves as the real
    logits (values, autograd, in-place ops, pickling). A loop that never reads them saves the
    (tokens, vocab) matrix and its matmul; the loss comes from the lean fused LM head + loss.
    Reading them after the LM head's weight (or the hidden states) changed in place since the
    forward, e.g. after optimizer.step(), raises a RuntimeError instead of returning logits of the
    new weight: read them before the step, or pass defer_logits=False (also the faster choice for a
    loop that reads them every step: deferred, the LM head's matmul then runs twice). None (default): on with
    rest="eager" and no cudagraphs; the AOTAutograd modes (rest="inductor", cudagraphs=True)
    cannot return a tensor subclass and return computed logits (True there is an error).
    Tritonizing an already tritonized model is a no-op (untritonize first to change options).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tritonize: expected an nn.Module, got {type(model).__name__}")
    if model.__dict__.get(_STATE) is not None:
        return model
    if not isinstance(drop_logits, bool):
        raise TypeError(f"tritonize: drop_logits must be True or False, got {drop_logits!r}")
    options = dict(patterns=patterns, exclude=exclude, rest=rest, strict=strict, dynamic=dynamic, cudagraphs=cudagraphs,
                   drop_logits=drop_logits, gqa_fold=gqa_fold, defer_logits=defer_logits)
    report = Report(type(model).__name__)
    ref = weakref.ref(model)
    report.set_module_names(lambda: [n for n, _ in ref().named_modules()] if ref() is not None else [])
    # Dynamo guards on the module's training flag, so a graph captured in training mode only runs
    # in training mode: reading the flag at capture time is enough.
    in_training = (lambda: ref() is not None and ref().training) if drop_logits else None
    backend = make_backend(report, patterns=patterns, exclude=exclude, rest=rest, strict=strict, cudagraphs=cudagraphs,
                           drop_logits=in_training, gqa_fold=gqa_fold, defer_logits=defer_logits)
    state = _State(model, report, options)
    _counter[0] += 1
    state.compiled = torch.compile(_entry_for(model, _counter[0], guard_training=drop_logits), backend=backend,
                                   dynamic=dynamic)
    model.__dict__[_STATE] = state
    model._compiled_call_impl = _TritonizedCall(model, state)
    return model


def untritonize(model: nn.Module):
    """Undo `tritonize(model)`: the module runs its original forward again. Returns the module."""
    if model.__dict__.get(_STATE) is not None:
        del model.__dict__[_STATE]
        model._compiled_call_impl = None
    return model


def is_tritonized(model) -> bool:
    return isinstance(model, nn.Module) and model.__dict__.get(_STATE) is not None


def report(model) -> Report:
    """The Report of a tritonized model; for a `torch.compile(..., backend="tritonize")` module
    (or anything else) the backend's global report; for a GraphModule from the fx path, its own."""
    st = model.__dict__.get(_STATE) if isinstance(model, nn.Module) else None
    if st is not None:
        return st.report
    rep = getattr(model, "tritonize_report", None)
    if isinstance(rep, Report):
        return rep
    from tritonize.fuser.backend import GLOBAL_REPORT

    return GLOBAL_REPORT


def tritonize_fx(module, *example_inputs, patterns=None, exclude=()):
    """The torch.fx.symbolic_trace path: returns a rewritten GraphModule (see capture.symbolic)."""
    from tritonize.fuser.capture import symbolic

    return symbolic(module, *example_inputs, patterns=patterns, exclude=exclude)
