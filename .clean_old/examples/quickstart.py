"""Quickstart: tritonize a small transformer, train one step, print what fused where.

    python examples/quickstart.py

Builds a small GPT-2 from a config (random weights, no download), tritonizes it — the same module
object comes back, its forward now runs fused Triton kernels — runs a forward and backward, checks
the loss against the untouched model, and prints the report. On a machine without a GPU it still
runs: each fused op takes its plain-PyTorch reference path (set TRITON_INTERPRET=1 to run the Triton
kernels themselves in Triton's CPU interpreter, slowly).
"""

import copy
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tritonize import tritonize


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=128,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(device)
    eager = copy.deepcopy(model)  # the reference: the same weights, untouched

    model = tritonize(model)  # same object back

    ids = torch.randint(0, config.vocab_size, (2, 64), device=device)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss  # first call: capture + rewrite + run
    loss.backward()
    first = time.perf_counter() - t0
    ref = eager(input_ids=ids, labels=ids).loss
    ref.backward()

    grad_err = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), eager.parameters()))
    print(f"device {device}: loss {loss.item():.5f} (eager {ref.item():.5f}), "
          f"max |grad - eager grad| {grad_err:.2e}, first call {first:.1f}s")
    print(tritonize.report(model))


if __name__ == "__main__":
    main()
