"""Tile/schedule sweep for tritonize.kernels.attention, to choose `_TILE_SPEC` and `_SCHED`.

    python -m benchmarks.sweep_attention [--workers 10] [--out DIR]

1. Compile: every candidate (kernel, tile, schedule) for D in {64, 128} x causal in {no, yes}
   is compiled by `--workers` subprocesses in parallel (Triton's on-disk cache is shared), so the
   timing phase only loads kernels.
2. Time: bf16 B8 H16, T in {512, 2048}; each kernel's launcher is timed on the GPU alone (CUDA
   graph of back-to-back launches, so Python launch cost is not in the figure): forward per fwd
   tile; backward (preprocess + dk/dv + dq) per dk/dv tile with dq fixed, then per dq tile with the
   best dk/dv tile. Prints the best tile per class and a `_TILE_SPEC` to paste.
3. End to end: with the chosen tiles applied, forward and forward+backward through the public
   `attention` (do_bench, Python included) vs SDPA flash, the custom-op path vs the eager fast
   path at T=512, and the CPU time per call of each path at a tiny shape.
Needs a GPU (exits 0 with a message otherwise). Not a test; prints JSON lines and tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import torch

CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
            (64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 32, 4, 3)],
    "dkdv": [(32, 128, 4, 3), (32, 128, 4, 4), (32, 128, 4, 5), (64, 128, 8, 3), (64, 128, 8, 2),
             (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 4, 3), (16, 128, 4, 4)],
    "dq": [(128, 32, 4, 3), (128, 32, 4, 4), (128, 32, 4, 5), (128, 64, 8, 3), (128, 64, 8, 2),
           (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4)],
}
DEFAULT = {"fwd": (128, 64, 4, 3), "dkdv": (32, 128, 4, 3), "dq": (128, 32, 4, 3)}
VARIANTS = [(D, causal) for D in (64, 128) for causal in (False, True)]
B, H = 8, 16


def _set(attn, tiles: dict, sched: dict | None = None):
    """Force one tile per kernel for every class (and the grid order); the shared-memory estimate
    is switched off so that a tile over it is really tried (Triton says if it does not fit)."""
    attn._SMEM_BUDGET = 1 << 30
    for kind, tile in tiles.items():
        for key in attn._TILE_SPEC[kind]:
            attn._TILE_SPEC[kind][key] = [tile]
    if sched:
        attn._SCHED_FORCE.update(sched)
    attn._candidates.cache_clear()


def _inputs(T, D, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    return q, k, v, do


def _jobs():
    jobs = []
    for kind in ("fwd", "dkdv", "dq"):
        for D, causal in VARIANTS:
            for tile in CANDIDATES[kind]:
                jobs.append((kind, D, causal, tile, 1))
            jobs.append((kind, D, causal, DEFAULT[kind], 0))
    return jobs


def _run_job(attn, job, T):
    kind, D, causal, tile, sched = job
    tiles = dict(DEFAULT)
    tiles[kind] = tile
    _set(attn, tiles, {"fwd": 1, "dkdv": 1, "dq": 1, kind: sched})
    q, k, v, do = _inputs(T, D)
    out, lse = attn.attention_forward(q, k, v, causal=causal)
    if kind != "fwd":
        attn.attention_backward(do, q, k, v, out, lse, causal=causal)
    torch.cuda.synchronize()


def worker(index: int, count: int):
    attn = importlib.import_module("tritonize.kernels.attention")

    errors = {}
    for i, job in enumerate(_jobs()):
        if i % count != index:
            continue
        try:
            _run_job(attn, job, 512)
        except Exception as e:  # out of resources etc.: recorded, skipped when timing
            errors[json.dumps(job)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(json.dumps({"worker": index, "errors": errors}))


def gpu_ms(fn, target_ms: float = 5.0) -> float:
    """GPU time of fn() in ms: a CUDA graph of n back-to-back calls, min over 3 replays."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    n = max(2, min(40, int(target_ms / max(s.elapsed_time(e), 1e-3))))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / n)
    del g
    return best


def sweep(errors: dict):
    attn = importlib.import_module("tritonize.kernels.attention")

    results = []  # dicts
    best = {}  # (kind, D, T, causal) -> [(ms, tile)] sorted

    def bad(kind, D, causal, tile, sched):
        return json.dumps([kind, D, causal, list(tile), sched]) in errors

    for T in (512, 2048):
        for D, causal in VARIANTS:
            q, k, v, do = _inputs(T, D)
            _set(attn, DEFAULT, {"fwd": 1, "dkdv": 1, "dq": 1})
            out, lse = attn.attention_forward(q, k, v, causal=causal)
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            for kind in ("fwd", "dkdv", "dq"):
                rows = []
                tiles_for = list(CANDIDATES[kind]) + ["sched0"]
                for tile in tiles_for:
                    sched = 0 if tile == "sched0" else 1
                    tile = DEFAULT[kind] if tile == "sched0" else tile
                    if bad(kind, D, causal, tile, sched):
                        results.append(dict(kind=kind, T=T, D=D, causal=causal, tile=tile, sched=sched, error="compile"))
                        continue
                    tiles = dict(DEFAULT)
                    if kind == "dq":  # dq swept with the best dk/dv tile of this class
                        tiles["dkdv"] = best[("dkdv", D, T, causal)][0][1]
                    tiles[kind] = tile
                    _set(attn, tiles, {"fwd": 1, "dkdv": 1, "dq": 1, kind: sched})
                    try:
                        if kind == "fwd":
                            ms = gpu_ms(lambda: attn.attention_forward(q, k, v, causal=causal))
                        else:
                            ms = gpu_ms(lambda: attn.attention_backward(do, q, k, v, out, lse, causal=causal))
                    except Exception as e:
                        results.append(dict(kind=kind, T=T, D=D, causal=causal, tile=tile, sched=sched,
                                            error=f"{type(e).__name__}: {str(e)[:120]}"))
                        continue
                    tf = flops * (1.0 if kind == "fwd" else 2.5) / ms * 1e-9
                    r = dict(kind=kind, T=T, D=D, causal=causal, tile=tile, sched=sched, ms=round(ms, 4),
                             tflops=round(tf, 1))
                    results.append(r)
                    print(json.dumps(r), flush=True)
                    if sched == 1:
                        rows.append((ms, tile))
                rows.sort()
                best[(kind, D, T, causal)] = rows
            del q, k, v, do, out, lse
            torch.cuda.empty_cache()
    return results, best


def attn_est(kind, tile, D):
    attn = importlib.import_module("tritonize.kernels.attention")
    return attn._smem_bytes(kind, tile[0], tile[1], D, tile[3], 2)


def spec_from(best):
    """_TILE_SPEC from the sweep: short class = best at T=512; long = best two at T=2048."""
    spec = {}
    for kind in ("fwd", "dkdv", "dq"):
        spec[kind] = {}
        for D in (64, 128):
            for causal in (False, True):
                short = best[(kind, D, 512, causal)]
                long = best[(kind, D, 2048, causal)]
                spec[kind][(D, False, causal)] = [short[0][1]]
                # a second candidate only when within 3% (else tuning just costs compile time)
                lst = [long[0][1]] + [t for ms, t in long[1:2] if ms <= 1.03 * long[0][0]]
                spec[kind][(D, True, causal)] = lst
    return spec


def end_to_end(spec, sched):
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    attn_mod = importlib.import_module("tritonize.kernels.attention")
    from tritonize.kernels import attention

    for kind, d in spec.items():
        for key, lst in d.items():
            attn_mod._TILE_SPEC[kind][key] = list(lst)
    attn_mod._SCHED_FORCE.clear()  # the module's own rule (sched printed above is per kind, for reference)
    attn_mod._candidates.cache_clear()
    rows = []

    def sdpa(q, k, v, causal):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def ours(q, k, v, causal):
        return attention(q, k, v, causal=causal)

    def t(fn):
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    for T, D, causal in [(512, 64, False), (512, 64, True), (512, 128, False), (512, 128, True),
                         (1024, 64, True), (2048, 64, False), (2048, 64, True), (2048, 128, False),
                         (2048, 128, True), (8192, 64, True)]:
        q, k, v = (x.requires_grad_(True) for x in _inputs(T, D)[:3])
        do = torch.randn_like(q)
        flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
        impls = [("tritonize", ours, True), ("sdpa_flash", sdpa, True)]
        if T <= 1024:
            impls.insert(1, ("tritonize_customop", ours, False))
        for name, fn, fast in impls:
            attn_mod.EAGER_FAST_PATH = fast
            try:
                def fwd():
                    with torch.no_grad():
                        return fn(q, k, v, causal)

                def fb():
                    return torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)

                ms_f, ms_fb = t(fwd), t(fb)
                gpu_fb = None
                if name == "tritonize":  # launchers only, no autograd: the GPU time of our fwd+bwd
                    def launch():
                        o, lse = attn_mod.attention_forward(q, k, v, causal=causal)
                        return attn_mod.attention_backward(do, q, k, v, o, lse, causal=causal)

                    gpu_fb = gpu_ms(launch)
                r = dict(e2e=name, shape=f"B{B} H{H} T{T} D{D}", causal=causal, fwd_ms=round(ms_f, 4),
                         fwd_bwd_ms=round(ms_fb, 4), fwd_bwd_tflops=round(3.5 * flops / ms_fb * 1e-9, 1),
                         gpu_only_fwd_bwd_ms=round(gpu_fb, 4) if gpu_fb else None)
            except Exception as e:
                r = dict(e2e=name, shape=f"B{B} H{H} T{T} D{D}", causal=causal, error=f"{type(e).__name__}: {str(e)[:160]}")
            attn_mod.EAGER_FAST_PATH = True
            rows.append(r)
            print(json.dumps(r), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()

    # CPU time per call (tiny shape: the GPU is idle most of the time, so this is Python + launch)
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    for fast in (True, False):
        attn_mod.EAGER_FAST_PATH = fast
        for what, fn in (("fwd_nograd", lambda: attention(q.detach(), k.detach(), v.detach(), causal=True)),
                         ("fwd_bwd", lambda: torch.autograd.grad(attention(q, k, v, causal=True), (q, k, v), do))):
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(100):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            r = dict(cpu_us_per_call=round((t1 - t0) / 100 * 1e6, 1), path="fast" if fast else "customop", what=what)
            rows.append(r)
            print(json.dumps(r), flush=True)
    attn_mod.EAGER_FAST_PATH = True
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", default=None, help="internal: i/n")
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--compile-only", action="store_true", help="phase 1 only; errors to OUT/compile_errors.json")
    ap.add_argument("--no-compile", action="store_true", help="phases 2-3, reading OUT/compile_errors.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_attention needs a CUDA GPU; none found, nothing measured.", file=sys.stderr)
        return 0
    if args.worker:
        i, n = map(int, args.worker.split("/"))
        worker(i, n)
        return 0
    t0 = time.time()
    err_path = os.path.join(args.out, "compile_errors.json")
    if args.no_compile:
        errors = json.load(open(err_path)) if os.path.exists(err_path) else {}
    else:
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.sweep_attention", "--worker", f"{i}/{args.workers}"],
                                  stdout=subprocess.PIPE, text=True) for i in range(args.workers)]
        errors = {}
        for p in procs:
            out, _ = p.communicate()
            for line in out.splitlines():
                if line.startswith("{"):
                    errors.update(json.loads(line)["errors"])
        with open(err_path, "w") as f:
            json.dump(errors, f)
        print(json.dumps({"phase": "compile", "s": round(time.time() - t0, 1), "errors": errors}), flush=True)
        if args.compile_only:
            return 0
    t1 = time.time()
    results, best = sweep(errors)
    spec = spec_from(best)
    # schedule: per kind, sum over classes of sched0 vs sched1 time for the default tile
    sched = {}
    for kind in ("fwd", "dkdv", "dq"):
        tot = {0: 0.0, 1: 0.0}
        for r in results:
            if r["kind"] == kind and tuple(r["tile"]) == DEFAULT[kind] and "ms" in r:
                tot[r["sched"]] += r["ms"]
        sched[kind] = 0 if tot[0] < tot[1] else 1
        print(json.dumps({"sched_total_ms": kind, "sched0": round(tot[0], 3), "sched1": round(tot[1], 3)}))
    print(json.dumps({"phase": "sweep", "s": round(time.time() - t1, 1)}), flush=True)
    print("\n### best tiles (ms, tile) per class, top 3")
    for key, rows in sorted(best.items()):
        print(key, [(round(ms, 4), t, f"{attn_est(key[0], t, key[1]) // 1024}KB") for ms, t in rows[:3]],
              "worst", rows[-1:] and (round(rows[-1][0], 4), rows[-1][1]))
    print("\n### _TILE_SPEC (D64/D128 rows) and _SCHED chosen")
    for kind, d in spec.items():
        print(f'    "{kind}": {{')
        for key, lst in sorted(d.items()):
            print(f"        {key}: {lst},")
        print("    },")
    print("_SCHED =", sched, flush=True)
    with open(os.path.join(args.out, "sweep_attention.json"), "w") as f:
        json.dump({"results": results, "spec": {k: {str(kk): vv for kk, vv in d.items()} for k, d in spec.items()},
                   "sched": sched}, f)
    if not args.skip_e2e:
        t2 = time.time()
        rows = end_to_end(spec, sched)
        print(json.dumps({"phase": "e2e", "s": round(time.time() - t2, 1)}))
        print("\n### end to end (bf16 B8 H16)")
        for r in rows:
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
