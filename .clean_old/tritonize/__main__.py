"""`python -m tritonize script.py [args]`: run a script unchanged, every transformers model tritonized.

    python -m tritonize train.py --lr 3e-4              # every PreTrainedModel the script builds
    python -m tritonize --rest inductor train.py ...    # the rest of each graph through Inductor
    python -m tritonize --cudagraphs train.py ...       # rewritten graphs replayed as CUDA graphs
    python -m tritonize -m my_package.train --epochs 1  # a module, like `python -m`
    TRITONIZE=0 python -m tritonize train.py ...        # off: the script runs exactly as without it

The script sees the same `sys.argv` (its own path first), `__name__ == "__main__"` and its own
directory at `sys.path[0]`, as under `python script.py`. At exit (normal, `sys.exit`, or an
exception) a fused/skipped summary of the tritonized models goes to stderr. The hook itself is in
`tritonize/launcher.py`.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

USAGE = "python -m tritonize [--rest eager|inductor] [--cudagraphs] [--drop-logits] [--strict] [--report] [--no-summary] (script.py | -m module) [args ...]"


def _parse(argv: list[str]):
    p = argparse.ArgumentParser(
        prog="python -m tritonize",
        usage=USAGE,
        description="Run a Python script with every transformers model it builds tritonized.",
        epilog="TRITONIZE=0 in the environment turns the hook off.",
    )
    p.add_argument("--rest", choices=("eager", "inductor"), default=None,
                   help="how the unfused rest of each graph runs (default: tritonize's default, eager)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="replay each rewritten graph as a CUDA graph (see tritonize(cudagraphs=True))")
    p.add_argument("--drop-logits", action="store_true",
                   help="training with labels: return empty logits, as Liger does (see tritonize(drop_logits=True))")
    p.add_argument("--no-defer-logits", action="store_true",
                   help="return computed logits, not logits computed on first read (see tritonize(defer_logits=False))")
    p.add_argument("--strict", action="store_true", help="raise where a model cannot be captured")
    p.add_argument("--report", action="store_true", help="print each model's full report at exit")
    p.add_argument("--no-summary", action="store_true", help="print nothing at exit")
    p.add_argument("-m", dest="module", default=None, help="run a library module as a script")
    # Everything from the script path on belongs to the script: stop parsing at the first
    # positional argument (or after -m MODULE).
    ours, rest = [], list(argv)
    while rest:
        a = rest[0]
        if a == "--":
            rest.pop(0)
            break
        if a == "-m":
            ours += rest[:2]
            rest = rest[2:]
            break
        if a.startswith("-"):
            ours.append(rest.pop(0))
            if a == "--rest" and rest:
                ours.append(rest.pop(0))
            continue
        break
    args = p.parse_args(ours)
    if args.module is None and not rest:
        p.error("a script to run is required")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    from . import launcher

    options = {}
    if args.rest is not None:
        options["rest"] = args.rest
    if args.strict:
        options["strict"] = True
    if args.cudagraphs:
        options["cudagraphs"] = True
    if args.drop_logits:
        options["drop_logits"] = True
    if args.no_defer_logits:
        options["defer_logits"] = False
    active = launcher.install(**options)
    if not active:
        print("tritonize: disabled (TRITONIZE=0); running the script unchanged", file=sys.stderr, flush=True)

    if args.module is not None:
        sys.argv = [args.module] + rest
        target = lambda: runpy.run_module(args.module, run_name="__main__", alter_sys=True)  # noqa: E731
    else:
        script = rest[0]
        if not os.path.exists(script):
            print(f"python -m tritonize: can't open file {script!r}: no such file", file=sys.stderr)
            return 2
        sys.argv = list(rest)
        # Like `python script.py`: the script's directory first on sys.path, not ours.
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        target = lambda: runpy.run_path(script, run_name="__main__")  # noqa: E731

    code = 0
    try:
        target()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    finally:
        if active and not args.no_summary:
            try:
                launcher.print_summary(verbose=args.report)
            except Exception as e:  # the summary must never mask the script's own outcome
                print(f"tritonize: summary unavailable ({type(e).__name__}: {e})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
