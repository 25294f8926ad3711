"""Zero-code-change hook: tritonize every `transformers` model a script builds.

`python -m tritonize script.py [args]` (see `tritonize/__main__.py`) calls `install()` before it runs
the script. The hook is generic — not a line of per-model code:

- Every `transformers.PreTrainedModel` calls `self.post_init()` at the end of its `__init__`, whether
  it is built from a config (`Model(config)`, `AutoModel.from_config`) or loaded
  (`from_pretrained`, which constructs the model and then fills in the weights). The hook wraps
  `PreTrainedModel.post_init` and tritonizes the model there. `tritonize()` returns the same module
  object and captures lazily, at the first call, so tritonizing before the weights are loaded (or
  before `.to("cuda")`, `.half()`, ...) is correct: the capture sees the final parameters.
- Inside `from_pretrained`/`from_config` the hook waits until the outermost call returns, so a model
  is tritonized once, fully built, with its weights in place.
- Nested models are deduplicated: `GPT2LMHeadModel` builds a `GPT2Model` inside its own `__init__`,
  and the inner `post_init` runs first (construction is depth-first). When the outer model is
  tritonized, every tritonized `PreTrainedModel` inside it is untritonized again, so only the
  outermost model runs through the fuser (its capture already covers the inner one).
- `TRITONIZE=0` (or `false`/`off`/`no`) turns the hook off: `install()` does nothing.
- At exit, `summary()` — printed by the launcher to stderr — lists every model the hook
  tritonized with its fused/skipped counts (models are held weakly, their reports strongly, so a
  model built inside `main()` and gone by exit is still listed).

Options for `tritonize()` come from `install(**options)` (the launcher passes `--rest` etc.).
If `transformers` is never imported by the script, nothing is patched and nothing is printed
beyond one line saying so.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import weakref

__all__ = ["install", "uninstall", "enabled", "tritonized_models", "summary", "print_summary"]

_lock = threading.RLock()
_state = {
    "installed": False,
    "options": {},
    "depth": 0,  # nesting depth of from_pretrained/from_config calls in progress
    "originals": {},  # (owner, attr) -> original attribute, to restore on uninstall
    "errors": [],  # (model class name, message) for models tritonize() refused
}
_pending: list = []  # models built inside a from_pretrained/from_config call, tritonized at its end
# One record per model the hook tritonized, in build order. The model is held weakly (a script
# that builds models in a loop must not leak them); its report is held strongly, so the exit
# summary still covers a model that went out of scope (the usual `def main(): model = ...`).
_records: list[dict] = []


def enabled() -> bool:
    """False when the environment variable TRITONIZE is 0/false/off/no."""
    return os.environ.get("TRITONIZE", "1").strip().lower() not in ("0", "false", "off", "no")


# ---------------------------------------------------------------------------------------------
# Tritonize one model, and keep only the outermost of nested models
# ---------------------------------------------------------------------------------------------


def _record_of(module):
    for rec in _records:
        if rec["ref"]() is module:
            return rec
    return None


def _is_ours(module) -> bool:
    return _record_of(module) is not None


def _forget(module) -> None:
    _records[:] = [r for r in _records if r["ref"]() is not module]


def _tritonize_model(model) -> None:
    from transformers import PreTrainedModel

    from . import tritonize as _tritonize
    from . import untritonize as _untritonize

    if _is_ours(model):
        return
    # A model nested in one already tritonized (a submodel built after its parent, rare) is left
    # alone: the parent's capture covers it.
    for rec in _records:
        parent = rec["ref"]()
        if parent is not None and parent is not model and any(m is model for m in parent.modules()):
            return
    try:
        _tritonize(model, **_state["options"])
    except Exception as e:  # a model the fuser refuses keeps running as it was; say so at exit
        _state["errors"].append((type(model).__name__, f"{type(e).__name__}: {e}"))
        if os.environ.get("TRITONIZE_LOG", "").lower() == "debug":
            print(f"tritonize: {type(model).__name__} not tritonized: {e}", file=sys.stderr)
        return
    from . import report as _report

    try:
        rep = _report(model)
    except Exception:
        rep = None
    _records.append({"ref": weakref.ref(model), "name": type(model).__name__, "report": rep})
    # Dedupe: inner PreTrainedModels tritonized earlier (their post_init ran first) go back to eager;
    # the outer model's capture traces through them.
    for sub in model.modules():
        if sub is not model and isinstance(sub, PreTrainedModel) and _is_ours(sub):
            try:
                _untritonize(sub)
            finally:
                _forget(sub)


def _flush_pending() -> None:
    models, _pending[:] = list(_pending), []
    # Outermost last: an inner model's post_init ran before its parent's, so processing in build
    # order lets the parent's dedupe step undo the children.
    for ref in models:
        m = ref()
        if m is not None:
            _tritonize_model(m)


# ---------------------------------------------------------------------------------------------
# The patches
# ---------------------------------------------------------------------------------------------


def _wrap_post_init(original):
    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        with _lock:
            if _state["depth"] > 0:
                _pending.append(weakref.ref(self))
            else:
                _tritonize_model(self)
        return out

    post_init.__tritonize_wrapped__ = original
    return post_init


def _wrap_loader(original_cm):
    """Wrap a classmethod (from_pretrained / _from_config): defer tritonization to its end."""
    func = original_cm.__func__

    @functools.wraps(func)
    def loader(cls, *args, **kwargs):
        with _lock:
            _state["depth"] += 1
        try:
            return func(cls, *args, **kwargs)
        finally:
            with _lock:
                _state["depth"] -= 1
                if _state["depth"] == 0:
                    _flush_pending()

    loader.__tritonize_wrapped__ = func
    return classmethod(loader)


def _patch_transformers() -> None:
    from transformers import PreTrainedModel

    originals = _state["originals"]
    if (PreTrainedModel, "post_init") not in originals:
        originals[(PreTrainedModel, "post_init")] = PreTrainedModel.__dict__["post_init"]
        PreTrainedModel.post_init = _wrap_post_init(PreTrainedModel.__dict__["post_init"])
    for name in ("from_pretrained", "_from_config"):
        attr = PreTrainedModel.__dict__.get(name)
        if isinstance(attr, classmethod) and (PreTrainedModel, name) not in originals:
            originals[(PreTrainedModel, name)] = attr
            setattr(PreTrainedModel, name, _wrap_loader(attr))


class _TransformersFinder:
    """A meta-path hook that patches `transformers` right after the script first imports it.

    Importing transformers eagerly at launch would cost seconds for scripts that never use it and
    change import order; instead the patch is applied when `transformers.modeling_utils` (which
    defines PreTrainedModel) finishes loading.
    """

    TARGET = "transformers.modeling_utils"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.TARGET:
            return None
        # Let the normal finders locate the module, then wrap its loader.
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _remove_finder()
        _patch_transformers()

    def __getattr__(self, name):  # get_code, get_source, ... for tools that ask
        return getattr(self._loader, name)


_finder = _TransformersFinder()


def _remove_finder() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install(**options) -> bool:
    """Patch `transformers` so each model it builds is tritonized with `options`.

    Returns False (and patches nothing) when TRITONIZE=0. Safe to call twice. If
    `transformers.modeling_utils` is already imported the patch applies now, else when it is.
    """
    if not enabled():
        return False
    with _lock:
        _state["options"] = dict(options)
        if _state["installed"]:
            return True
        _state["installed"] = True
        if "transformers.modeling_utils" in sys.modules:
            _patch_transformers()
        else:
            sys.meta_path.insert(0, _finder)
    return True


def uninstall() -> None:
    """Restore transformers' original methods (models already tritonized stay tritonized)."""
    with _lock:
        _remove_finder()
        for (owner, name), original in _state["originals"].items():
            setattr(owner, name, original)
        _state["originals"].clear()
        _state["installed"] = False


# ---------------------------------------------------------------------------------------------
# What was tritonized: the exit summary
# ---------------------------------------------------------------------------------------------


def tritonized_models() -> list:
    """The live models the hook tritonized (outermost only), in build order."""
    return [m for m in (r["ref"]() for r in _records) if m is not None]


def _counts(rep) -> tuple[int, int]:
    """(sites fused, sites skipped) of a report, distinct (pattern, site) pairs: a recapture (a new
    sequence length, a train/eval switch) records its sites again, which must not double them."""
    fused = {(s.pattern, s.site) for s in rep.sites if s.fused}
    skipped = {(s.pattern, s.site) for s in rep.sites if not s.fused} - fused
    return len(fused), len(skipped)


def summary(verbose: bool = False) -> str:
    """One line per tritonized model: fused/skipped counts (the full report with verbose=True).

    Covers every model the hook tritonized, including those already garbage-collected."""
    if not _records and not _state["errors"]:
        return "tritonize: no transformers model was built; nothing tritonized"
    lines = [f"tritonize: {len(_records)} model(s) tritonized"]
    for rec in _records:
        rep = rec["report"]
        if rep is None:
            lines.append(f"  {rec['name']}: no report")
            continue
        fused, skipped = _counts(rep)
        line = f"  {rec['name']}: {fused} site(s) fused, {skipped} skipped, {rep.captures} graph(s) captured"
        if rep.fallback:
            line += f"; runs UNMODIFIED: {rep.fallback}"
        lines.append(line)
        if verbose:
            lines.extend("    " + ln for ln in str(rep).splitlines())
    for name, err in _state["errors"]:
        lines.append(f"  {name}: not tritonized ({err})")
    return "\n".join(lines)


def print_summary(file=None, verbose: bool = False) -> None:
    print(summary(verbose=verbose), file=file or sys.stderr, flush=True)
