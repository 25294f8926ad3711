"""A Llama whose LM head and cross-entropy fuse into one kernel: the logits are never stored.

    python examples/llama_fused_loss.py

With a 128k vocabulary the logits of a 4 x 2048 batch are 8192 x 128256 values — 2.1 GB in bf16,
and eager cross-entropy keeps several such buffers alive (the fp32 upcast, the softmax, the
gradient). tritonize rewrites `lm_head -> cross_entropy` into `linear_cross_entropy`, which walks
the vocabulary in chunks, computes the loss and the gradients of the hidden states and of the head
weight on the fly, and never materialises the logits.

The loss is written the way a training loop writes it: a small module that returns only the loss
(if the logits were also returned to the caller they would have to exist, and the fuser leaves the
pair alone — it never changes what a model returns). Next to it, the model's own `labels=` path.

On a GPU: Llama with 4 layers, d1024, 16 heads / 8 kv heads, vocab 128256, bf16, B4 T2048, and the
peak memory of one train step eager vs tritonized. On a CPU: a tiny Llama (same code path).
"""

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tritonize import tritonize


class NextTokenLoss(nn.Module):
    """Mean next-token cross-entropy of a causal LM; returns the loss only."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state  # (B, T, d)
        logits = self.lm.lm_head(hidden[:, :-1]).float()  # (B, T-1, V): each next token, fp32 as HF's loss
        targets = input_ids[:, 1:].reshape(-1)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets)


def train_step(module, ids, cuda):
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = module(ids)
    loss.backward()
    value = loss.item()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else float("nan")
    return value, peak, time.perf_counter() - t0


def main():
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        config = LlamaConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048)
        B, T, dtype = 4, 2048, torch.bfloat16
    else:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)
        B, T, dtype = 2, 32, torch.float32
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    with torch.device(device):
        lm = LlamaForCausalLM(config)
    lm.to(dtype)
    ids = torch.randint(0, config.vocab_size, (B, T), device=device)

    eager = NextTokenLoss(copy.deepcopy(lm))
    fused = tritonize(NextTokenLoss(lm))
    train_step(fused, ids, cuda)  # first call: capture + compile
    lm.zero_grad(set_to_none=True)
    for name, module in (("eager", eager), ("tritonize", fused)):
        loss, peak, sec = train_step(module, ids, cuda)
        mem = f", peak memory above the weights {peak:.2f} GB" if cuda else ""
        print(f"{name:10s} loss {loss:.5f}  step {sec * 1e3:.0f} ms{mem}")
    print(tritonize.report(fused))

    # The model's own loss (`labels=`): HF returns the logits too, so here they must exist.
    tritonize(lm)
    out = lm(input_ids=ids, labels=ids)
    print(f"LlamaForCausalLM(labels=...) loss {out.loss.item():.5f}; logits returned: {tuple(out.logits.shape)}")


if __name__ == "__main__":
    main()
