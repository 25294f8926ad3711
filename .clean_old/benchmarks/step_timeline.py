"""Per-step timeline of training steps, implementations interleaved in blocks: where slow windows
come from (host stalls, garbage collection, the CUDA caching allocator).

    python -m benchmarks.step_timeline --model llama --impls "tritonize,compile(tritonize)" --blocks 10 --steps 10

One JSON line per (block, implementation): wall ms per step (synchronised at the block's ends),
per step the host time to issue it and the CUDA-event time between consecutive steps, milliseconds
spent in Python's garbage collector during the block (gc.callbacks) and the number of collections,
and the caching allocator's retries / device mallocs / frees during the block. A diagnostic, not a
benchmark table (bench_models and ab_models are those). CUDA only.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from benchmarks.ab_models import warm_steps
from benchmarks.bench_models import FULL, build_train_model


class _GcClock:
    """Milliseconds spent in garbage collection (gc.callbacks)."""

    def __init__(self):
        self.ms, self._t = 0.0, 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.ms += (time.perf_counter() - self._t) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama", choices=sorted(k for k, v in FULL.items() if v["task"] == "train"))
    p.add_argument("--impls", required=True, help="comma list of bench_models implementations (ab_models syntax)")
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps", type=int, default=10, help="steps per implementation per block")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a GPU (CUDA events and allocator counters)")
    impls = [i for i in args.impls.split(",") if i]
    base, ids, dev = build_train_model(args.model, False)
    clock = _GcClock()
    steps = warm_steps(impls, base, ids, dev)
    del base
    for b in range(args.blocks):
        for impl in impls:
            torch.cuda.synchronize()
            st0, gc0 = torch.cuda.memory_stats(), clock.ms
            n_gc0 = sum(s["collections"] for s in gc.get_stats())
            events = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
            host = []
            t0 = time.perf_counter()
            events[0].record()
            for i in range(args.steps):
                h0 = time.perf_counter()
                steps[impl]()
                host.append(round((time.perf_counter() - h0) * 1e3, 1))
                events[i + 1].record()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3 / args.steps
            st1 = torch.cuda.memory_stats()

            def delta(key):
                return st1.get(key, 0) - st0.get(key, 0)

            print(json.dumps({
                "block": b, "impl": impl, "wall_ms": round(wall, 2), "host_ms": host,
                "event_ms": [round(events[i].elapsed_time(events[i + 1]), 1) for i in range(args.steps)],
                "gc_ms": round(clock.ms - gc0, 2), "gc_collections": sum(s["collections"] for s in gc.get_stats()) - n_gc0,
                "alloc_retries": delta("num_alloc_retries"), "cuda_mallocs": delta("num_device_alloc"),
                "cuda_frees": delta("num_device_free"),
            }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
