"""tritonize under DistributedDataParallel: 2 processes, gloo on CPU (NCCL on 2+ GPUs).

Each rank builds the same tiny GPT-2 (same seed, dropout off), tritonizes it, wraps it in DDP and
runs two training steps (SGD) on its half of a batch. DDP averages the gradients across ranks, so:
  - the gradients after all-reduce are identical on both ranks, and
  - they equal the gradients of a single-process eager model on the concatenated batch (each
    rank's loss is a mean over the same number of tokens, so the mean of the two means is the
    mean over the whole batch);
and after the steps both ranks hold the same parameters as the single-process eager run.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import assert_close3

transformers = pytest.importorskip("transformers")

B_PER_RANK, T, STEPS, LR = 2, 16, 2, 0.5


def _config():
    return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=T,
                                   bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0)


def _model(dtype):
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(_config()).to(dtype)


def _batches(world):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (B_PER_RANK * world, T), generator=g) for _ in range(STEPS)]


def _worker(rank, world, backend, dtype, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tritonize import tritonize

    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = tritonize(_model(dtype).to(device))
        ddp = DDP(model, device_ids=[rank] if device.type == "cuda" else None)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        grads = []
        for ids in _batches(world):
            local = ids[rank * B_PER_RANK:(rank + 1) * B_PER_RANK].to(device)
            loss = ddp(input_ids=local, labels=local).loss
            loss.backward()
            grads.append({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad(set_to_none=True)
        rep = tritonize.report(model)
        torch.save({"grads": grads, "params": {n: p.detach().cpu() for n, p in model.named_parameters()},
                    "fused": rep.count(), "fallback": rep.fallback, "report": str(rep)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(dtype, device, world):
    """Eager, one process, the whole batch: gradients of each step, final parameters."""
    model = _model(dtype).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for ids in _batches(world):
        ids = ids.to(device)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads, {n: p.detach().cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_ddp_two_ranks(backend, tmp_path):
    world = 2
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL run needs 2 GPUs")
    # CPU (gloo): fp32; GPUs (nccl): bf16, judged against the fp32 eager run by the three-way rule.
    dtype = torch.bfloat16 if backend == "nccl" else torch.float32
    init_file = str(tmp_path / "rendezvous")  # file:// rendezvous: a path that does not exist yet
    mp.spawn(_worker, args=(world, backend, dtype, init_file, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for r in ranks:
        assert r["fallback"] is None, r["fallback"]
        assert r["fused"] > 0, f"nothing fused under DDP:\n{r['report']}"

    # 1. All-reduced gradients are the same on every rank (bit for bit: DDP averages one buffer).
    for step in range(STEPS):
        for n, g0 in ranks[0]["grads"][step].items():
            assert torch.equal(g0, ranks[1]["grads"][step][n]), f"step {step} {n}: grads differ across ranks"

    # 2. They equal a single-process eager run on the concatenated batch.
    device = "cuda" if backend == "nccl" else "cpu"
    ref_grads, ref_params = _single_process(torch.float32, device, world)
    if dtype == torch.float32:
        for step in range(STEPS):
            for n, g in ranks[0]["grads"][step].items():
                torch.testing.assert_close(g, ref_grads[step][n], rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=n, s=step: f"step {s} {n}: {m}")
        for n, p in ranks[0]["params"].items():
            torch.testing.assert_close(p, ref_params[n], rtol=1e-4, atol=1e-5)
    else:
        same_dtype_grads, _ = _single_process(dtype, device, world)
        for n, g in ranks[0]["grads"][0].items():  # first step: same weights everywhere
            assert_close3(g.float(), same_dtype_grads[0][n].float(), ref_grads[0][n], name=f"grad {n}")
