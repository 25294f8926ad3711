"""Does a model's step time follow the host's speed? Step time per 12-step window next to a tiny-op probe.

    python -m benchmarks.host_drift --model gpt2 --impl tritonize

Session 6 used it to find what session 5 had called a stall: the same tritonized GPT-2 step ran
26-40 ms on one H100 machine, in step with a 20000-op probe moving between 7.3 and 10.5 us/op,
while torch.compile's GPU-bound step stayed at 27.2-27.5 ms. It also tries the two usual suspects
of host waits — a shorter GIL switch interval, autograd on the calling thread — so their effect
(none consistent there) is measured, not guessed. CUDA only.
"""
import argparse
import os
import sys
import threading
import time

import torch
from benchmarks.bench_models import build_train_model, make_runner, train_step


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", default="tritonize")
    p.add_argument("--model", default="gpt2")
    a = p.parse_args()
    model, ids, _ = build_train_model(a.model, False)
    runner = make_runner(model, a.impl)
    step = train_step(runner, model, ids, "cuda")
    for _ in range(3):
        step()
    torch.cuda.synchronize()

    def probe(n=20000):
        x = torch.empty(8, device="cuda")
        t0 = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        dt = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        return dt

    def timed(label, n=12):
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        print(f"{label:40s} median {ts[n//2]:6.2f} ms  min {ts[0]:6.2f}  probe {probe():5.2f} us/op", flush=True)

    print("threads:", [t.name for t in threading.enumerate()], "affinity:", sorted(os.sched_getaffinity(0)), "switchinterval", sys.getswitchinterval())
    timed("baseline")
    sys.setswitchinterval(1e-4)
    timed("switchinterval 1e-4")
    sys.setswitchinterval(0.005)
    with torch.autograd.set_multithreading_enabled(False):
        timed("autograd on the calling thread")
    timed("baseline again")
    print("threads:", [t.name for t in threading.enumerate()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
