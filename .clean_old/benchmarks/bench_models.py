"""End-to-end models: eager (SDPA) vs torch.compile vs Liger vs tritonize, side by side.

    python -m benchmarks.bench_models                      # H100: the full table (< 9 minutes)
    python -m benchmarks.bench_models --quick              # tiny models, runs on CPU too (smoke)
    python -m benchmarks.bench_models --models gpt2,llama --impls eager,tritonize
    python -m benchmarks.bench_models --out docs/models.md --plot docs/models.png

Rows (implementations), in this order in the table:
  eager             the transformers model as is, attn_implementation="sdpa"
  torch.compile     torch.compile(model)
  liger             Liger's monkey patch for the model type (before the model is built), where
                    Liger supports it (Llama yes; GPT-2 and BERT: no, reported as unsupported)
  tritonize         tritonize(model) (since session 6 the returned logits are deferred: computed
                    only if read, see tritonize(defer_logits=))
  tritonize+logits  tritonize(model, defer_logits=False): the logits computed every step (the
                    session-5 default; the A/B row for deferral)
  tritonize+inductor  tritonize(model, rest="inductor") (that mode leaves plain linear ->
                    activation (since session 5) and the norms (since session 6) to Inductor;
                    gated MLPs, the LM head + loss and attention stay ours)
  compile(tritonize)  torch.compile(model, backend="tritonize")
  tritonize+cudagraphs  tritonize(model, cudagraphs=True): rewritten graphs replayed as CUDA graphs
  tritonize+inductor+cudagraphs  tritonize(model, rest="inductor", cudagraphs=True)
  compile+cudagraphs  torch.compile(model, mode="reduce-overhead"): torch.compile with CUDA graphs,
                    the like-for-like row for the two above
  tritonize+drop_logits  tritonize(model, drop_logits=True): training returns empty logits, as
                    Liger's patched forward does (the like-for-like row for Liger's memory)
  tritonize+inductor-lean  tritonize(model, rest="inductor", patterns=("cross_entropy",
                    "attention")): only the LM head + loss and attention are ours, norms and
                    activations are left to Inductor (which fuses them with their neighbours)

Models:
  gpt2   GPT-2 124M, training, B8 T1024
  llama  Llama 12 layers, d1024, 16 heads / 8 kv heads, ffn 3584, vocab 128256, training, B4 T2048
  bert   BERT-base inference latency, B1 T128 and B32 T128
All in bf16 on the GPU (weights bf16, fused AdamW), random weights from a fixed seed, built from a
config (no download). Training columns measure a full step: forward with labels (HF's loss),
backward, AdamW step, zero_grad.

Columns:
  ktok_s      thousands of tokens per second (training: B*T per train step; inference: B*T per forward)
  ms          one train step, or one forward (inference: median of CUDA events)
  x eager     tok/s relative to the eager row of the same model and shape
  peak GB     peak memory allocated during the timed steps ABOVE the resting state (weights and
              optimizer state; gradients are set to None between steps) — activations, grads and
              temporaries; `total GB` is the absolute peak including the resting state
  first s     wall time of the very first call (capture, compile, autotune included)
  loss        loss of the first train step (same seed and weights in every row: a sanity check
              that every implementation computes the same model)
  fused       sites tritonize fused (from tritonize.report), for the tritonize rows

Steps: training runs 3 untimed steps (the first one timed alone: `first s`), then 10 timed steps
between two CUDA events; inference times one forward with CUDA events (median).

Every configuration runs in a fresh subprocess, in a fixed order (Liger last within a model: it
patches transformers' classes globally; a fresh process also gives a clean memory high-water
mark). Compile caches: one fresh cache per run, shared by its configurations (`--cache run`, the
default): a kernel is compiled by the first configuration that needs it, and later ones in the same
run may find it compiled (e.g. the tritonize kernels in `compile(tritonize)`), which keeps the run
inside its budget; `--cache config` makes every first call fully cold. A configuration that fails
or runs out of time is a row with an `error`, never a crash that loses the other rows. `--budget`
(seconds, default 520) bounds the whole run: configurations that would start after it are rows
saying so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

IMPLS = ["eager", "torch.compile", "liger", "tritonize", "tritonize+inductor", "compile(tritonize)",
         "compile+cudagraphs", "tritonize+cudagraphs", "tritonize+inductor+cudagraphs", "tritonize+drop_logits",
         "tritonize+inductor-lean", "tritonize+logits"]
# Process order: Liger last (global class patching; also isolated by its own subprocess).
RUN_ORDER = ["eager", "tritonize", "torch.compile", "tritonize+cudagraphs", "compile+cudagraphs",
             "tritonize+inductor", "tritonize+inductor+cudagraphs", "compile(tritonize)", "tritonize+drop_logits",
             "tritonize+inductor-lean", "tritonize+logits", "liger"]
# (most important rows first: if the budget runs out, what is skipped is the end of the list)
MODELS = ["gpt2", "llama", "bert"]

FULL = {
    "gpt2": {"task": "train", "shapes": [(8, 1024)]},
    "llama": {"task": "train", "shapes": [(4, 2048)]},
    "bert": {"task": "infer", "shapes": [(1, 128), (32, 128)]},
}
QUICK = {
    "gpt2": {"task": "train", "shapes": [(2, 32)]},
    "llama": {"task": "train", "shapes": [(2, 32)]},
    "bert": {"task": "infer", "shapes": [(1, 16), (4, 16)]},
}
WARMUP_STEPS, TIMED_STEPS = 3, 10  # training: first call + (WARMUP_STEPS-1) more, then timed
QUICK_WARMUP, QUICK_TIMED = 2, 2


# ---------------------------------------------------------------------------------------------
# Worker: one (model, impl) in this process; prints one line "RESULT {json}" per shape
# ---------------------------------------------------------------------------------------------


def build_config(name: str, quick: bool, max_t: int):
    import transformers as tf

    if name == "gpt2":
        if quick:
            return tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=max_t,
                                 bos_token_id=0, eos_token_id=0)
        # GPT-2 small, 124M (12 layers, d768). Dropout off in every row, as in modern pretraining
        # recipes (nanoGPT's default), so every row times the same computation.
        return tf.GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if name == "llama":
        if quick:
            return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                  max_position_embeddings=max_t, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return tf.LlamaConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=12,
                              num_attention_heads=16, num_key_value_heads=8, vocab_size=128256,
                              max_position_embeddings=max_t, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if name == "bert":
        if quick:
            return tf.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, vocab_size=512, max_position_embeddings=64)
        return tf.BertConfig()  # bert-base: 12 layers, d768, 12 heads, ffn 3072
    raise ValueError(f"unknown model {name!r}")


def _model_class(name: str):
    import transformers as tf

    return {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "bert": tf.BertModel}[name]


def _fused_count(model, impl: str) -> int | None:
    """Distinct sites fused (tritonize rows only; compile(tritonize) reads the backend's report)."""
    if "tritonize" not in impl:
        return None
    try:
        from tritonize import launcher, report

        return launcher._counts(report(model))[0]
    except Exception:
        return None


def _cudagraph_notes(model, impl: str) -> list | None:
    """The report's per-graph CUDA graph lines (on, or why not) for the tritonize+cudagraphs rows."""
    if "tritonize+" not in impl or "cudagraphs" not in impl:
        return None
    from tritonize import report

    return report(model).cudagraphs


def _sync(dev):
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


# What wraps the model in each tritonize row (tritonize's options).
TRITONIZE_OPTIONS = {
    "tritonize": {},
    "tritonize+inductor": {"rest": "inductor"},
    "tritonize+cudagraphs": {"cudagraphs": True},
    "tritonize+inductor+cudagraphs": {"rest": "inductor", "cudagraphs": True},
    "tritonize+drop_logits": {"drop_logits": True},
    "tritonize+inductor-lean": {"rest": "inductor", "patterns": ("cross_entropy", "attention")},
    "tritonize+logits": {"defer_logits": False},
}


def make_runner(model, impl: str, **tritonize_options):
    """The callable a row runs: the model itself, torch.compile of it, or the tritonized model
    (`tritonize_options` override the row's own, e.g. profile_model's --exclude)."""
    import torch

    if impl in ("eager", "liger"):  # Liger patches the classes before the model is built
        return model
    if impl == "torch.compile":
        return torch.compile(model)
    if impl == "compile+cudagraphs":
        return torch.compile(model, mode="reduce-overhead")
    if impl == "compile(tritonize)":
        return torch.compile(model, backend="tritonize")
    if impl in TRITONIZE_OPTIONS:
        from tritonize import tritonize

        return tritonize(model, **{**TRITONIZE_OPTIONS[impl], **tritonize_options})
    raise ValueError(f"unknown impl {impl!r}")


def build_train_model(name: str, quick: bool):
    """(model, ids, dev) for profile_model, ab_models and host_drift: the training model of `name`
    in bf16 on the GPU (fp32 on CPU), train mode, SDPA attention, seed 0, and its input batch."""
    import torch

    spec = (QUICK if quick else FULL)[name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    B, T = spec["shapes"][0]
    config = build_config(name, quick, T)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = _model_class(name)(config)
    model.to(dtype).train()
    ids = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1)).to(dev)
    return model, ids, dev


def train_step(runner, model, ids, dev):
    """One train step as every training row times it: forward with labels (HF's loss), backward,
    fused AdamW, zero_grad(set_to_none). Returns the step function (it returns the loss)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=(dev == "cuda"))

    def step():
        loss = runner(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def worker(name: str, impl: str, quick: bool) -> None:
    import torch

    spec = (QUICK if quick else FULL)[name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    max_t = max(t for _, t in spec["shapes"])
    config = build_config(name, quick, max_t)
    config._attn_implementation = "sdpa"
    base = {"model": name, "impl": impl}

    def emit(**fields):
        fields = {k: v for k, v in fields.items() if v is not None}
        print("RESULT " + json.dumps({**base, **fields}), flush=True)

    if impl == "liger":
        if dev != "cuda":
            emit(error="unsupported: Liger's kernels need CUDA")
            return
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(config.model_type)
        if fn is None:
            emit(error=f"unsupported: Liger has no kernels for model type {config.model_type!r}")
            return
        fn()  # patches transformers' classes: must run before the model is built

    torch.manual_seed(0)
    with torch.device(dev):
        model = _model_class(name)(config)
    model.to(dtype)
    if spec["task"] == "infer":
        model.eval()
    else:
        model.train()

    t_build = time.perf_counter()
    runner = make_runner(model, impl)
    wrap_s = time.perf_counter() - t_build

    g = torch.Generator(device="cpu").manual_seed(1)
    if spec["task"] == "train":
        (B, T) = spec["shapes"][0]
        ids = torch.randint(0, config.vocab_size, (B, T), generator=g).to(dev)
        step = train_step(runner, model, ids, dev)

        t0 = time.perf_counter()
        loss0 = float(step().detach().float())  # .float() forces the sync that ends the first call
        _sync(dev)
        first_s = time.perf_counter() - t0 + wrap_s
        n_warm, n_timed = (QUICK_WARMUP, QUICK_TIMED) if quick else (WARMUP_STEPS, TIMED_STEPS)
        for _ in range(n_warm - 1):
            step()
        _sync(dev)
        mem = {}
        if dev == "cuda":
            resting = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n_timed):
                last = step()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / n_timed
            peak = torch.cuda.max_memory_allocated()
            mem = {"peak_gb": (peak - resting) / 1e9, "total_gb": peak / 1e9}
        else:
            t1 = time.perf_counter()
            for _ in range(n_timed):
                last = step()
            ms = (time.perf_counter() - t1) * 1e3 / n_timed
        emit(shape=f"B{B} T{T}", task="train", tok_s=B * T / (ms * 1e-3), ms=ms, first_s=first_s,
             loss=loss0, loss_last=float(last.detach().float()), fused=_fused_count(model, impl),
             cudagraphs=_cudagraph_notes(model, impl), **mem)
        return

    # Inference: latency of one forward per shape, the first call timed on its own.
    for i, (B, T) in enumerate(spec["shapes"]):
        ids = torch.randint(0, config.vocab_size, (B, T), generator=g).to(dev)
        mask = torch.ones_like(ids)

        def fwd():
            with torch.no_grad():
                return runner(input_ids=ids, attention_mask=mask).last_hidden_state

        t0 = time.perf_counter()
        out = fwd()
        checksum = float(out.float().abs().mean())
        _sync(dev)
        first_s = time.perf_counter() - t0 + (wrap_s if i == 0 else 0.0)
        mem = {}
        if dev == "cuda":
            from benchmarks._common import peak_memory_bytes, time_ms

            ms = time_ms(fwd, warmup=25, rep=100 if quick else 300)
            peak = peak_memory_bytes(fwd)
            mem = {"peak_gb": peak / 1e9, "total_gb": torch.cuda.max_memory_allocated() / 1e9}
        else:
            fwd()
            reps = 3
            t1 = time.perf_counter()
            for _ in range(reps):
                fwd()
            ms = (time.perf_counter() - t1) * 1e3 / reps
        emit(shape=f"B{B} T{T}", task="infer", tok_s=B * T / (ms * 1e-3), ms=ms, first_s=first_s,
             out_mean=checksum, fused=_fused_count(model, impl), cudagraphs=_cudagraph_notes(model, impl), **mem)


def worker_main(name: str, impl: str, quick: bool) -> int:
    try:
        worker(name, impl, quick)
    except Exception as e:  # one line, the parent turns it into an error row
        import traceback

        traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print("RESULT " + json.dumps({"model": name, "impl": impl, "error": msg}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: run each configuration in a subprocess, gather rows, print the table
# ---------------------------------------------------------------------------------------------


def run_config(name, impl, quick, timeout, env):
    cmd = [sys.executable, "-m", "benchmarks.bench_models", "--worker", name, impl] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    # Own process group: on a timeout the worker AND its compile workers (Inductor's pool) go.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        err, rc = f"timeout after {timeout:.0f}s", None
    wall = time.perf_counter() - t0
    rows = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    if not rows:
        tail = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
        why = err if rc is None else f"exit {rc}: {tail[-1] if tail else 'no output'}"
        rows = [{"model": name, "impl": impl, "error": why[:300]}]
    elif rc is None:
        rows.append({"model": name, "impl": impl, "error": err})
    for r in rows:
        r["wall_s"] = wall
    if any("error" in r for r in rows) and err and rc not in (None, 0):
        sys.stderr.write(err[-3000:])
    return rows


def plot(rows, path, title=""):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"# --plot skipped: matplotlib unavailable ({e})", file=sys.stderr)
        return
    groups = []
    for r in rows:
        key = (r["model"], r.get("shape", ""))
        if key not in groups and "tok_s" in r:
            groups.append(key)
    if not groups:
        print("# --plot skipped: no successful rows", file=sys.stderr)
        return
    fig, axes = plt.subplots(2, len(groups), figsize=(3.6 * len(groups), 6.5), squeeze=False)
    colors = dict(zip(IMPLS, ["#888888", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#17becf",
                              "#e377c2", "#8c564b", "#bcbd22"]))
    for j, (model, shape) in enumerate(groups):
        sel = [r for r in rows if r["model"] == model and r.get("shape", "") == shape and "tok_s" in r]
        names = [r["impl"] for r in sel]
        for i, (key, label) in enumerate((("tok_s", "tokens/s"), ("peak_gb", "peak GB (above resting)"))):
            ax = axes[i][j]
            vals = [r.get(key) or 0 for r in sel]
            bars = ax.bar(range(len(sel)), vals, color=[colors.get(n, "k") for n in names])
            if i == 0:  # speed relative to eager above each bar
                for b, r in zip(bars, sel):
                    if r.get("x_eager") is not None:
                        ax.annotate(f"{r['x_eager']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                    ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(sel)))
            ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel(label, fontsize=8)
            if i == 0:
                task = sel[0].get("task", "")
                ax.set_title(f"{model} {shape} ({task})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"# plot written to {path}", file=sys.stderr)


def main(argv=None) -> int:
    from benchmarks._common import parser

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    p.add_argument("--plot", default=None, help="write a PNG of the table (matplotlib)")
    p.add_argument("--budget", type=float, default=520.0, help="seconds for the whole run (rows that would start later are skipped)")
    p.add_argument("--config-timeout", type=float, default=200.0, help="seconds for one configuration")
    p.add_argument("--cache", choices=("run", "config", "user"), default="run",
                   help="compile caches (Inductor, Triton): 'run' (default) one fresh cache for the whole run, "
                        "shared by its configurations; 'config' a fresh cache per configuration (every "
                        "first call fully cold; slower); 'user' the usual caches, warm from earlier runs")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "IMPL"), help=argparse_suppress())
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker[0], args.worker[1], args.quick)

    import torch

    if not torch.cuda.is_available() and not args.quick:
        print("bench_models: needs a GPU (bf16, CUDA events); run with --quick for a CPU smoke run. No rows.")
        return 0
    models = [m for m in args.models.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {MODELS}")
    for i in impls:
        if i not in IMPLS:
            p.error(f"unknown impl {i!r}; choose from {IMPLS}")

    from benchmarks._common import Bench

    bench = Bench("models")
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("TRITON_INTERPRET", None)  # the benchmark measures real kernels (or the CPU reference path)
    cache = None
    if args.cache != "user":
        cache = tempfile.mkdtemp(prefix="bench_models_cache_")

    def use_cache(sub):
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, sub, "inductor")
        env["TRITON_CACHE_DIR"] = os.path.join(cache, sub, "triton")

    if args.cache == "run":
        use_cache("run")
    deadline = time.perf_counter() + args.budget
    results = []
    for m in models:
        for impl in [i for i in RUN_ORDER if i in impls]:
            left = deadline - time.perf_counter()
            if left < 15:
                rows = [{"model": m, "impl": impl, "error": f"skipped: time budget ({args.budget:.0f}s) used up"}]
            else:
                if args.cache == "config":
                    use_cache(f"{m}-{impl}")
                rows = run_config(m, impl, args.quick, min(left, args.config_timeout), env)
            results.extend(rows)
            for r in rows:
                print("# " + json.dumps(r), file=sys.stderr, flush=True)

    # Table rows in the order: per model, per shape, IMPLS order; speedup vs eager.
    shapes = {}
    for r in results:
        shapes.setdefault(r["model"], [])
        s = r.get("shape")
        if s and s not in shapes[r["model"]]:
            shapes[r["model"]].append(s)
    ordered = []
    for m in models:
        for s in shapes.get(m) or [None]:
            eager = next((r for r in results if r["model"] == m and r["impl"] == "eager" and r.get("shape") == s and "tok_s" in r), None)
            for impl in impls:
                for r in results:
                    if r["model"] != m or r["impl"] != impl:
                        continue
                    if s is not None and r.get("shape") not in (s, None):
                        continue
                    if r.get("shape") is None and s is not None and s != shapes[m][0]:
                        continue  # an error row for the whole config: show it once
                    if eager and "tok_s" in r:
                        r["x_eager"] = r["tok_s"] / eager["tok_s"]
                    ordered.append(r)
    for r in ordered:
        if "tok_s" in r:
            r["ktok_s"] = r["tok_s"] / 1e3
        bench.row(**r)
    cols = ["model", "shape", "impl", "ktok_s", "ms", "x_eager", "peak_gb", "total_gb", "first_s", "loss", "fused", "error"]
    text = bench.table(cols, title="models (train: fwd+bwd+AdamW step; infer: forward latency)")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.plot:
        meta = bench.meta
        plot(ordered, args.plot, title=f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}"
             + (f", liger {meta['liger_kernel']}" if "liger_kernel" in meta else "") + (" (--quick)" if args.quick else ""))
    if cache:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    return 0


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
