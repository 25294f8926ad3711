"""tritonize under `transformers.Trainer`: one short CPU training run.

A tiny GPT-2 (2 layers, d64, dropout off) trains for a few steps on a tiny in-memory dataset, once
untouched and once tritonized, from the same weights with the same seed, data order and optimizer
(Trainer's default AdamW with a linear schedule). The tritonized run must actually run fused (the
report says so), its parameters must move, its loss must fall, and its per-step losses and final
parameters must track the eager run's.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

STEPS = 6


class MotifData(torch.utils.data.Dataset):
    """16 sequences, each one of 4 fixed 8-token motifs repeated: learnable in a few steps."""

    def __init__(self, vocab=96, T=16):
        g = torch.Generator().manual_seed(0)
        motifs = torch.randint(0, vocab, (4, 8), generator=g)
        self.ids = motifs[torch.arange(16) % 4].repeat(1, T // 8)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(model, out_dir):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=MotifData())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == STEPS, trainer.state.log_history
    return trainer, losses


def test_trainer_tritonized_matches_eager(tmp_path):
    from tritonize import tritonize

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    start = {k: v.clone() for k, v in base.state_dict().items()}

    eager = copy.deepcopy(base)
    _, eager_losses = _train(eager, tmp_path / "eager")

    model = tritonize(copy.deepcopy(base))
    trainer, losses = _train(model, tmp_path / "tritonized")

    # It ran fused: the Trainer called the tritonized module (not a copy, not a bypass).
    rep = tritonize.report(model)
    assert rep.fallback is None, rep.fallback
    assert rep.count() > 0, f"nothing fused under Trainer:\n{rep}"
    assert rep.count("attention") + rep.count("sdpa") > 0 and rep.count("add_layer_norm") + rep.count("layer_norm") > 0, str(rep)
    assert trainer.model is model

    # It trained: the parameters moved and the loss fell.
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert len(moved) >= len([k for k in start if "h.0." in k]), "too few parameters changed"
    assert losses[-1] < losses[0] - 0.1, losses

    # Same trajectory as eager (fp32; kernels differ from torch only in summation order).
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=2e-3, atol=2e-3)
    eager_sd = eager.state_dict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, eager_sd[k], rtol=1e-3, atol=2e-4, msg=lambda m, k=k: f"{k}: {m}")
