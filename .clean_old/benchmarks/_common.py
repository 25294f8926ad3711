"""Shared benchmark plumbing: timing, memory, ceilings, JSON lines and a markdown table.

Benchmarks are scripts, not tests: they never assert a timing. Each measurement prints one JSON
line (so a log can be parsed later) and each script ends with a markdown table.

    from benchmarks._common import Bench
    b = Bench("rowwise")                       # measures copy bandwidth / matmul ceiling on demand
    ms = b.time(fn)                            # median ms over CUDA events (triton.testing.do_bench)
    peak = b.peak_memory(fn)                   # peak bytes allocated during fn, above the baseline
    b.row(op="layer_norm", impl="tritonize", shape="8192x4096", ms=ms, gbps=...)
    b.table(columns=[...])                     # markdown table of every row
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def host_probe_us(n: int = 2000) -> float:
    """Microseconds of host time per tiny eager op (an in-place add on a 1-element tensor).

    The device tool may lend a different host per start, and host speed moves every host-bound
    figure (whole models: up to 1.5x between two H100 hosts). Recorded with every benchmark so
    runs can be compared for it; ratios are still only meaningful within one run."""
    import time

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(1, device=dev)
    for _ in range(100):
        x.add_(1)
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    us = (time.perf_counter() - t) / n * 1e6
    if dev == "cuda":
        torch.cuda.synchronize()
    return round(us, 2)


def versions() -> dict:
    import triton

    out = {"torch": torch.__version__, "triton": triton.__version__, "device": device_name(),
           "host_probe_us": host_probe_us()}
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version

        out["liger_kernel"] = version("liger-kernel")
    except Exception:
        pass
    return out


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401

        return True
    except Exception:
        return False


def time_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of `fn()` (CUDA events; warmup/rep in ms as do_bench takes them)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def peak_memory_bytes(fn) -> int:
    """Peak bytes allocated while `fn()` runs, above what was allocated before it started."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Dense matmul ceiling on random data (never zeros: they run faster than real data)."""
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def try_compile(fn):
    """torch.compile(fn), or None if compilation is unavailable (reported, not fatal)."""
    try:
        return torch.compile(fn)
    except Exception as e:  # pragma: no cover - depends on the installation
        print(f"# torch.compile unavailable: {e}", file=sys.stderr)
        return None


class Bench:
    """Collects rows; prints each as a JSON line at once and all as a markdown table at the end."""

    def __init__(self, name: str):
        self.name = name
        self.rows: list[dict] = []
        self.meta = versions()
        print(json.dumps({"bench": name, **self.meta}), flush=True)

    def row(self, **fields) -> dict:
        fields = {"bench": self.name, **fields}
        for k, v in fields.items():
            if isinstance(v, float):
                fields[k] = round(v, 4)
        self.rows.append(fields)
        print(json.dumps(fields), flush=True)
        return fields

    def table(self, columns: list[str], title: str | None = None, out: str | None = None) -> str:
        """Print (and return) the markdown table of every row; also write it to `out` if given."""
        head = (f"### {title or self.name} — {self.meta['device']}, torch {self.meta['torch']}, triton "
                f"{self.meta['triton']}, host probe {self.meta.get('host_probe_us', '?')} us/op\n\n")
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in self.rows:
            cells = []
            for c in columns:
                v = r.get(c, "")
                cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        text = head + "\n".join(lines) + "\n"
        print(text, flush=True)
        if out:
            with open(out, "w") as f:
                f.write(text)
        return text


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (smoke run)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    return p
