"""Train GPT-2 with tritonize: a plain PyTorch training loop, one extra line.

    python examples/train_gpt2.py                 # GPT-2 124M, bf16, B8 T1024 on a GPU; tiny on CPU
    python examples/train_gpt2.py --steps 50 --eager   # the same loop without tritonize, to compare

The data is synthetic and learnable (each sequence repeats one of 32 fixed 16-token motifs), so the loss
falls quickly and visibly. The model is built from a config (random weights, no download).
On a GPU: GPT-2 small (124M), bf16 weights, fused AdamW, batch 8 x 1024 tokens. On a CPU: a tiny
GPT-2 (2 layers, d128) so the example finishes in well under a minute.
"""

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tritonize import tritonize


def batch(motifs, B, T, device, gen):
    """B sequences, each one of a fixed set of 16-token motifs repeated: learnable in a few steps."""
    pick = motifs[torch.randint(0, len(motifs), (B,), generator=gen)]
    return pick.repeat(1, T // 16).to(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 30 GPU / 20 CPU)")
    p.add_argument("--eager", action="store_true", help="do not tritonize (the baseline)")
    p.add_argument("--lr", type=float, default=None)
    args = p.parse_args()

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        config = GPT2Config(n_positions=1024)  # GPT-2 small: 12 layers, d768, 124M parameters
        B, T, dtype, steps, lr = 8, 1024, torch.bfloat16, args.steps or 30, args.lr or 6e-4
    else:
        config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=512, n_positions=128,
                            bos_token_id=0, eos_token_id=0)
        B, T, dtype, steps, lr = 8, 64, torch.float32, args.steps or 20, args.lr or 3e-3
    with torch.device(device):
        model = GPT2LMHeadModel(config)
    model.to(dtype).train()
    if not args.eager:
        model = tritonize(model)  # the one extra line
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=cuda)

    gen = torch.Generator().manual_seed(0)
    motifs = torch.randint(0, config.vocab_size, (32, 16), generator=gen)
    t_start, tokens = None, 0
    for step in range(steps):
        ids = batch(motifs, B, T, device, gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            loss_v = loss.item()  # syncs: the first step includes capture and kernel compilation
            print(f"step 0: loss {loss_v:.4f}  (first step {time.perf_counter() - t0:.1f}s incl. capture/compile)")
            t_start = time.perf_counter()
            continue
        tokens += B * T
        if step % 5 == 0 or step == steps - 1:
            loss_v = loss.item()
            rate = tokens / (time.perf_counter() - t_start)
            print(f"step {step}: loss {loss_v:.4f}  {rate / 1e3:.1f}k tokens/s")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB")
    if not args.eager:
        print(tritonize.report(model))


if __name__ == "__main__":
    main()
