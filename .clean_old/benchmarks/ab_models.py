"""Interleaved A/B of whole train steps in ONE process: ratios that survive host-speed drift.

    python -m benchmarks.ab_models --model gpt2 --impls torch.compile,tritonize+inductor
    python -m benchmarks.ab_models --model llama --impls tritonize,tritonize+logits --rounds 8
    python -m benchmarks.ab_models --model gpt2 --impls "tritonize,tritonize:exclude=norm"

An implementation may carry tritonize options after a colon: `IMPL:key=value;key=v1+v2` (values
are Python literals where they parse, `+` makes a tuple: `tritonize:exclude=norm+linear_act`).

Why: on the lent H100 machines the host's speed drifts within one process (a 20000-op probe moved
between 7.3 and 10.5 us/op from one 12-step window to the next, session 6). A host-bound step
follows it, a GPU-bound one does not, so two rows of `bench_models` measured a minute apart can
differ by 1.5x for reasons unrelated to the code. Here every implementation wraps its own copy of
the same model (same weights, same batch) in one process, and the rounds alternate: each round
times `--steps` steps of every implementation back to back (order rotated per round), and the
ratio of each implementation to the first one is taken per round, then the median over rounds.
Per round the host probe is printed too, so a drift is visible. Peak memory is not measured here
(the copies share the process): `bench_models` measures it, one implementation per process.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import statistics
import sys
import time

import torch

from benchmarks._common import host_probe_us
from benchmarks.bench_models import FULL, build_train_model, make_runner, train_step


def _literal(text: str):
    """A Python literal where `text` parses as one (False, 3, 'x'), else the text itself (norm)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_impl(spec: str):
    """'tritonize:exclude=norm+linear_act;defer_logits=False' -> ('tritonize', {...})."""
    impl, _, opts = spec.partition(":")
    options = {}
    for item in (o for o in opts.split(";") if o):
        key, _, value = item.partition("=")
        parts = value.split("+")
        tuple_valued = len(parts) > 1 or key in ("exclude", "patterns")
        options[key] = tuple(_literal(x) for x in parts) if tuple_valued else _literal(value)
    if options and not impl.startswith("tritonize"):
        raise ValueError(f"options apply to tritonize rows only: {spec!r}")
    return impl, options


def warm_steps(impls, base, ids, dev) -> dict:
    """{impl: train-step function} on a copy of `base` each, every one run 3 times (compile /
    capture / autotune, then warm); the time of those first steps goes to stderr."""
    steps = {}
    for impl in impls:
        model = copy.deepcopy(base)
        name, options = parse_impl(impl)
        steps[impl] = train_step(make_runner(model, name, **options), model, ids, dev)
        t0 = time.perf_counter()
        for _ in range(3):
            steps[impl]()
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"# {impl}: first 3 steps {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", choices=sorted(k for k, v in FULL.items() if v["task"] == "train"))
    p.add_argument("--impls", required=True, help="comma list of bench_models implementations; ratios are to the first")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=8, help="timed steps per implementation per round")
    p.add_argument("--quick", action="store_true", help="tiny model (CPU smoke run)")
    args = p.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    if len(impls) < 2:
        p.error("--impls needs at least two implementations")
    if any(parse_impl(i)[0] == "liger" for i in impls):
        p.error("liger patches transformers' classes process-wide: measure it with bench_models")

    base, ids, dev = build_train_model(args.model, args.quick)
    B, T = ids.shape

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    steps = warm_steps(impls, base, ids, dev)
    del base

    per_round = {impl: [] for impl in impls}
    for r in range(args.rounds):
        order = impls[r % len(impls):] + impls[: r % len(impls)]  # rotate: no fixed position in a round
        probe = host_probe_us(20000)
        for impl in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[impl]()
            sync()
            per_round[impl].append((time.perf_counter() - t0) * 1e3 / args.steps)
        cells = "  ".join(f"{i} {per_round[i][-1]:.2f}" for i in impls)
        print(f"round {r}: probe {probe:.2f} us/op  ms/step: {cells}", flush=True)

    ref = impls[0]
    print(f"\n### A/B {args.model} B{B} T{T}, {args.rounds} rounds x {args.steps} steps, interleaved in one process"
          + (f" — {torch.cuda.get_device_name()}" if dev == "cuda" else ""))
    print(f"| impl | median ms/step | ktok/s | x {ref} (median of per-round ratios) | min..max ratio |")
    print("|---|---|---|---|---|")
    for impl in impls:
        ms = statistics.median(per_round[impl])
        ratios = [a / b for a, b in zip(per_round[ref], per_round[impl])]  # >1: faster than ref
        print(f"| {impl} | {ms:.2f} | {B * T / ms:.0f} | {statistics.median(ratios):.3f} | "
              f"{min(ratios):.3f}..{max(ratios):.3f} |")
        print("# " + json.dumps({"bench": "ab_models", "model": args.model, "impl": impl, "ref": ref,
                                 "ms_rounds": [round(x, 3) for x in per_round[impl]],
                                 "ratio_median": statistics.median(ratios)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
