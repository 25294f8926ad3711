"""Where a training step's memory goes: every tensor autograd saves for backward, by shape.

    python -m benchmarks.memory_breakdown --model llama --impl tritonize+drop_logits   # H100
    python -m benchmarks.memory_breakdown --model llama --impl liger
    python -m benchmarks.memory_breakdown --model llama --impl eager --quick            # CPU smoke

One forward of the bench_models model (same config, bf16 on the GPU) under
`torch.autograd.graph.saved_tensors_hooks`: each saved tensor's storage is counted once (views of
one buffer share it), parameters are left out, and the table groups the bytes by (dtype, shape).
On the GPU it also prints the memory held after the forward and the peaks of the forward and of
the backward, above the resting state (weights; gradients set to None).

This is how session 4 found why tritonize(drop_logits=True) held more than Liger on Llama 12L
B4 T2048: the gated MLP's product (the down projection's input, 8192 x 3584 per layer) and
transformers' repeat_kv copies of k and v — now `gated_mlp` and the repeat_kv fold.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch


def breakdown(name: str, impl: str, quick: bool, top: int = 25) -> None:
    import transformers as tf

    from benchmarks.bench_models import FULL, QUICK, build_config, make_runner

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if impl == "liger":
        if dev != "cuda":
            raise SystemExit("liger needs CUDA")
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        MODEL_TYPE_TO_APPLY_LIGER_FN[{"gpt2": "gpt2", "llama": "llama"}[name]]()
    spec = (QUICK if quick else FULL)[name]
    if spec["task"] != "train":
        raise SystemExit(f"{name} is an inference model here: nothing is saved for backward")
    B, T = spec["shapes"][0]
    cfg = build_config(name, quick, T)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM}[name](cfg)
    model.to(torch.bfloat16 if dev == "cuda" else torch.float32).train()
    runner = make_runner(model, impl)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    for _ in range(2):  # capture, compile, autotune outside the measured step
        runner(input_ids=ids, labels=ids).loss.backward()
        for p in model.parameters():
            p.grad = None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple] = {}

    def pack(t):
        try:
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except Exception:  # a tensor without storage (fake, nested): not counted
            return t
        if key not in seen and key not in params:
            seen[key] = (str(t.dtype).replace("torch.", ""), tuple(t.shape), nbytes)
        return t

    cuda = dev == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = runner(input_ids=ids, labels=ids)
    loss = out.loss
    del out
    if cuda:
        torch.cuda.synchronize()
        held, fwd_peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
    loss.backward()
    groups, counts = collections.Counter(), collections.Counter()
    for dt, shape, nbytes in seen.values():
        groups[(dt, shape)] += nbytes
        counts[(dt, shape)] += 1
    total = sum(groups.values())
    head = f"{name} {impl} B{B} T{T} on {dev}: saved for backward (non-parameter, distinct storages) {total / 1e9:.3f} GB"
    if cuda:
        torch.cuda.synchronize()
        bwd_peak = torch.cuda.max_memory_allocated() - base
        head += f"; held after forward {held / 1e9:.3f} GB, forward peak {fwd_peak / 1e9:.3f}, backward peak {bwd_peak / 1e9:.3f}"
    print(head)
    print("| MB | tensors | dtype | shape |\n|---|---|---|---|")
    for (dt, shape), nbytes in groups.most_common(top):
        print(f"| {nbytes / 1e6:.1f} | {counts[(dt, shape)]} | {dt} | {shape} |")


def main(argv=None) -> int:
    from benchmarks.bench_models import IMPLS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama", choices=["gpt2", "llama"])
    p.add_argument("--impl", default="tritonize", choices=IMPLS)
    p.add_argument("--quick", action="store_true", help="the tiny config (CPU smoke run)")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)
    breakdown(a.model, a.impl, a.quick, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
