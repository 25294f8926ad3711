"""Direct launch of compiled Triton kernels: Triton's own launch, minus its per-call binding.

Why: on the H100 host one `JITFunction.run` costs 30-80 us (bind every argument, specialise it,
build a string cache key, check the kernel's globals, build launch metadata), more than the GPU
time of a 4096x8192 norm. Torch issues its kernels from C++ in a few us. After the first call
for a given specialisation, `FastKernel` keeps Triton's `CompiledKernel` and calls its C
launcher directly with the same arguments Triton would pass.

Correctness rests on the key: it must separate every pair of calls that Triton would compile
differently. It holds, per runtime argument, what Triton specialises on (a tensor's dtype and
16-byte alignment; an int being 1, a multiple of 16, and its 32/64-bit range; a bool/float's
type), the value of every constexpr and launch option, the autotuner's key values, the
heuristics' outputs and the current device. A key finer than Triton's only costs one more
first call through Triton. Anything we do not classify (descriptors, tuples, unknown types,
runtime arguments passed by keyword, launch hooks installed by a profiler, config pre-hooks)
takes Triton's normal path, so the fast path is never the only way a launch can happen.

    TRITONIZE_FAST_LAUNCH=1      (default) direct launch after the first call per key
    TRITONIZE_FAST_LAUNCH=0      always Triton's path
    TRITONIZE_FAST_LAUNCH=check  direct launch, and on every call ask Triton which compiled
                                 kernel and which argument list it would use, and raise if
                                 they differ (the GPU test suite runs with this)

Under the interpreter (`TRITON_INTERPRET=1`) kernels always take Triton's path.
"""

from __future__ import annotations

import os

import torch

from ._common import INTERPRET

_MODE = os.environ.get("TRITONIZE_FAST_LAUNCH", "1").strip().lower()
if _MODE not in ("0", "1", "check"):
    raise ValueError(f"TRITONIZE_FAST_LAUNCH must be 0, 1 or check, got {_MODE!r}")

_I32_MIN, _I32_MAX, _I64_MAX = -(2**31), 2**31 - 1, 2**63 - 1


class _Unsupported(Exception):
    """An argument the key cannot classify: take Triton's path for this call."""


def _spec_tensor(a):
    # Triton: pointer type from the dtype, "D" when data_ptr % 16 == 0.
    return (a.dtype, a.data_ptr() % 16 == 0)


def _spec_int(a):
    # Triton: i32 / i64 / u64 by range, "D" when a % 16 == 0; some versions also turn 1 into a
    # constexpr. All four facts go in the key.
    return (a == 1, a % 16 == 0, _I32_MIN <= a <= _I32_MAX, a > _I64_MAX)


_SPEC = {
    torch.Tensor: _spec_tensor,
    torch.nn.Parameter: _spec_tensor,
    int: _spec_int,
    bool: lambda a: ("u1", a),
    float: lambda a: "fp32",
    type(None): lambda a: None,
}


def spec_of(a):
    """The part of one runtime argument that Triton's specialisation depends on (see module doc)."""
    f = _SPEC.get(type(a))
    if f is None:
        if isinstance(a, torch.Tensor):
            return _spec_tensor(a)
        raise _Unsupported(type(a).__name__)
    return f(a)


def _specs(args):
    """spec_of over positional runtime arguments, inlined for the common types (this runs on
    every launch). A tensor adds two entries (dtype, aligned), so layouts cannot collide: a
    dtype entry is always followed by its alignment flag."""
    out = []
    for a in args:
        t = type(a)
        if t is torch.Tensor or t is torch.nn.Parameter:
            out.append(a.dtype)
            out.append(a.data_ptr() % 16 == 0)
        elif t is int:
            out.append((a == 1, a % 16 == 0, _I32_MIN <= a <= _I32_MAX, a > _I64_MAX))
        else:
            out.append(spec_of(a))
    return tuple(out)


def _hashable(v):
    try:
        hash(v)
    except TypeError:
        raise _Unsupported(f"unhashable {type(v).__name__}") from None
    return v


class FastKernel:
    """Wraps a Triton kernel (a JITFunction, optionally under @triton.heuristics and, outermost,
    @triton.autotune) so that `kernel[grid](*args, **constexprs)` launches directly once cached.

    Call convention it accelerates (the one every kernel in this package uses): runtime
    arguments positional, constexprs and launch options (num_warps, ...) by keyword. Other
    spellings still work, through Triton's path."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.cache: dict = {}  # base key -> (config kwargs, {heuristic values -> launch entry})
        self.fallbacks: dict[str, int] = {}  # reason -> count of calls that took Triton's path (diagnostics)
        self.hits = 0  # direct launches
        self.enabled = _MODE != "0" and not INTERPRET
        self.tuner = None
        self.heuristics: list = []
        self.jit = None
        self.ready = False  # introspection waits for the first launch: importing must not touch the driver

    def _setup(self):
        self.ready = True
        try:
            self._introspect()
        except Exception as e:  # an unknown Triton layout, no GPU driver: keep Triton's path
            self.enabled = False
            self._note(f"introspection: {e}")

    def _introspect(self):
        from triton.runtime import driver
        from triton.runtime.autotuner import Autotuner, Heuristics
        from triton.runtime.jit import JITFunction

        k = self.kernel
        if isinstance(k, Autotuner):
            self.tuner = k
            k = k.fn
        while isinstance(k, Heuristics):
            self.heuristics.append(k)
            k = k.fn
        if not isinstance(k, JITFunction):
            raise TypeError(f"unsupported kernel wrapper {type(k).__name__}")
        self.jit = k
        self.names = tuple(p.name for p in k.params)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.constexpr = frozenset(p.name for p in k.params if p.is_constexpr)
        self.constexpr_pos = frozenset(i for i, p in enumerate(k.params) if p.is_constexpr)
        self.defaults = {p.name: p.default for p in k.params if p.has_default}
        self.tuner_keys = tuple(self.tuner.keys) if self.tuner is not None and len(self.tuner.configs) > 1 else ()
        self.first_constexpr = min(self.constexpr_pos, default=len(self.names))
        self.kw_ok: set = set()  # keyword-name tuples already validated
        from triton import knobs

        self._runtime_knobs = knobs.runtime  # launch hooks live here (a profiler may install some)
        self._driver = driver
        self._get_device = driver.active.get_current_device
        self._get_stream = driver.active.get_current_stream

    def __getattr__(self, name):  # .fn, .configs, .cache, ... of the wrapped kernel
        if name in ("kernel", "ready", "enabled"):
            raise AttributeError(name)
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def run(self, *args, grid, warmup=False, **kwargs):
        return self.kernel.run(*args, grid=grid, warmup=warmup, **kwargs)

    # -- the launch -----------------------------------------------------------------------------
    def launch(self, grid, args, kwargs):
        if not self.ready and self.enabled:
            self._setup()
        if not self.enabled:
            return self.kernel[grid](*args, **kwargs)
        try:
            base = self._key(args, kwargs)
            try:
                slot = self.cache.get(base)  # hashes the key once (an unhashable keyword value raises here)
            except TypeError:
                raise _Unsupported("unhashable keyword value") from None
            if slot is None:
                return self._first(grid, args, kwargs, base)
            cfg_kw, by_heur = slot
            hv = self._heuristic_values(args, kwargs, cfg_kw) if self.heuristics else ()
        except _Unsupported as e:
            self._note(str(e))
            return self.kernel[grid](*args, **kwargs)
        entry = by_heur.get(hv)
        if entry is None:
            return self._first(grid, args, kwargs, base)
        rt = self._runtime_knobs
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        if _hooked(enter) or _hooked(leave):  # a profiler wants launch metadata: Triton's path
            self._note("launch hooks installed")
            return self.kernel[grid](*args, **kwargs)
        compiled, run, function, packed, tail, jit_kw = entry
        full = args + tail
        if callable(grid):
            grid = grid(dict(zip(self.names, full)))
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        device = base[0]
        if _MODE == "check":
            self._check(compiled, args, full, jit_kw, device)
        self.hits += 1
        run(grid[0], g1, g2, self._get_stream(device), function, packed, None, enter, leave,
            *full)  # fmt: skip
        return compiled

    def _key(self, args, kwargs):
        if self.first_constexpr < len(args):  # a constexpr passed positionally: its value counts
            cpos = self.constexpr_pos
            spec = tuple(_hashable(a) if i in cpos else spec_of(a) for i, a in enumerate(args))
        else:
            spec = _specs(args)
        names = tuple(kwargs)
        if names not in self.kw_ok:
            for name in names:
                i = self.index.get(name)
                if i is not None and (i < len(args) or name not in self.constexpr):
                    raise _Unsupported(f"argument {name!r} passed by keyword")
            self.kw_ok.add(names)
        tk = ()
        if self.tuner_keys:  # the autotuner's own key: values of these arguments
            named = dict(zip(self.names, args))
            named.update(kwargs)
            tk = tuple(_hashable(named.get(k)) for k in self.tuner_keys)
        return (self._get_device(), len(args), spec, tuple(kwargs.items()), tk)

    def _heuristic_values(self, args, kwargs, cfg_kw):
        # Heuristics may read runtime ints (K % BLOCK_K == 0) and the autotuner's choice
        # (BLOCK_K): evaluated per call, their outputs select the compiled kernel.
        named = dict(zip(self.names, args))
        named.update(kwargs)
        named.update(cfg_kw)
        out = []
        for h in self.heuristics:  # outermost first, as Triton applies them
            for name, fn in h.values.items():
                v = _hashable(fn(named))
                named[name] = v
                out.append(v)
        return tuple(out)

    def _first(self, grid, args, kwargs, base):
        """Triton's path; then remember the compiled kernel and the constant tail of arguments."""
        compiled = self.kernel[grid](*args, **kwargs)
        try:
            cfg_kw = {}
            if self.tuner is not None:
                cfg = self.tuner.best_config
                if cfg.pre_hook is not None:
                    raise _Unsupported("config pre_hook")
                cfg_kw = dict(cfg.all_kwargs())
            hv = self._heuristic_values(args, kwargs, cfg_kw) if self.heuristics else ()
            jit_kw = dict(kwargs)
            jit_kw.update(cfg_kw)
            names_h = [n for h in self.heuristics for n in h.values]
            jit_kw.update(zip(names_h, hv))
            tail = []
            for name in self.names[len(args):]:
                if name in jit_kw:
                    tail.append(jit_kw[name])
                elif name in self.defaults:
                    tail.append(self.defaults[name])
                else:
                    raise _Unsupported(f"no value for {name!r}")
            entry = (compiled, compiled.run, compiled.function, compiled.packed_metadata, tuple(tail), jit_kw)
            slot = self.cache.setdefault(base, (cfg_kw, {}))
            slot[1][hv] = entry
        except _Unsupported as e:
            self._note(str(e))
        except AttributeError as e:  # a CompiledKernel without the launcher fields used here
            self.enabled = False
            self._note(f"compiled kernel layout: {e}")
        return compiled

    def _check(self, compiled, args, full, jit_kw, device):
        """TRITONIZE_FAST_LAUNCH=check: Triton's own choice must equal ours, argument for argument."""
        theirs = self.jit.run(*args, grid=(1,), warmup=True, **jit_kw)
        if theirs is not compiled:
            raise AssertionError(f"fast launch of {self.jit.__name__}: Triton would run another compiled kernel")
        binder = self.jit.device_caches[device][-1]
        bound = binder(*args, **jit_kw)[0]
        vals = tuple(bound.values())
        if len(vals) != len(full) or not all(a is b or _same(a, b) for a, b in zip(vals, full)):
            raise AssertionError(f"fast launch of {self.jit.__name__}: argument list differs from Triton's")

    def _note(self, reason):
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1


def _same(a, b):
    try:
        return bool(a == b)
    except Exception:
        return False


def _hooked(h) -> bool:
    if h is None:
        return False
    calls = getattr(h, "calls", None)  # triton >= 3.5: a HookChain, empty unless a profiler added one
    return bool(calls) if calls is not None else True


def fast_launch(kernel) -> FastKernel:
    """Decorator: outermost on a launched kernel (above @triton.autotune / @triton.heuristics)."""
    return FastKernel(kernel)
