"""transformers models from tiny configs, tritonized: every norm, attention, MLP and the loss fused;
logits, loss and all parameter gradients match eager; generate() with a KV cache gives the same
tokens. Dropout probabilities are 0 so eager and fused runs are comparable."""

import copy

import pytest
import torch
import torch.nn as nn

from tests.fuser.common import DEVICE
from tritonize import tritonize

transformers = pytest.importorskip("transformers")

NORMS = ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm")
ATTN = ("attention", "sdpa")
MLP = ("linear_act", "gated_mlp")


def _count(rep, names):
    return sum(rep.count(n) for n in names)


def _n_norm_modules(model):
    return sum(1 for m in model.modules() if isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__)


def _gpt2(attn):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg), 2, 2


def _llama(attn):
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg), 2, 2


def _bert(attn):
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, vocab_size=128, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation=attn)
    return transformers.BertForMaskedLM(cfg), 2, 3  # + the MLM head's dense+gelu


def _vit(attn):
    cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=4, image_size=16, patch_size=4, num_labels=10,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 attn_implementation=attn)
    return transformers.ViTForImageClassification(cfg), 2, 2


def _batch(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "vit":
        return dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g), labels=torch.randint(0, 10, (2,), generator=g))
    ids = torch.randint(1, 128, (2, 12), generator=g)
    batch = dict(input_ids=ids, labels=ids.clone())
    if kind == "bert":
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0  # padding exercises the mask path
        batch["attention_mask"] = mask
    return batch


CASES = [("gpt2", "eager"), ("gpt2", "sdpa"), ("llama", "eager"), ("llama", "sdpa"), ("bert", "sdpa"), ("vit", "eager")]
BUILD = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "vit": _vit}


@pytest.mark.parametrize("kind,attn", CASES, ids=[f"{k}-{a}" for k, a in CASES])
def test_model_fused_and_matches_eager(kind, attn):
    torch.manual_seed(0)
    model, n_attn, n_mlp = BUILD[kind](attn)
    model = model.to(DEVICE).train()
    ref = copy.deepcopy(model)
    tritonize(model)
    batch = {k: v.to(DEVICE) for k, v in _batch(kind).items()}
    out = model(**batch)
    out_ref = ref(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=2e-5, rtol=2e-5)
    out.loss.backward()
    out_ref.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name}: {m}")
    rep = tritonize.report(model)
    assert _count(rep, NORMS) == _n_norm_modules(model), str(rep)
    assert _count(rep, ATTN) == n_attn, str(rep)
    assert _count(rep, MLP) == n_mlp, str(rep)
    assert rep.count("cross_entropy") + rep.count("linear_cross_entropy") == 1, str(rep)
    if kind in ("gpt2", "llama"):  # causal LMs return the logits with the loss: the LM head still fuses
        assert rep.fused("linear_cross_entropy") == ["lm_head"], str(rep)
    assert rep.fallback is None
    assert not rep.graph_breaks, str(rep)  # transformers' warning_once is ignored inside the capture


def test_generate_with_kv_cache_same_tokens():
    torch.manual_seed(0)
    model, _, _ = _llama("sdpa")
    model = model.to(DEVICE).eval()
    ref = copy.deepcopy(model)
    tritonize(model)
    ids = torch.randint(1, 128, (1, 6), device=DEVICE)
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(ids, **kw)
        want = ref.generate(ids, **kw)
    assert torch.equal(got, want)
    rep = tritonize.report(model)
    assert _count(rep, ATTN) >= 2 and rep.fallback is None, str(rep)


def _gpt2_dropout():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.1,
                                  embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def test_inductor_rest_gpt2_dropout_and_bert_padding():
    """rest="inductor": GPT-2 with dropout 0.1 in train mode (seeds are graph values, no .item(), no
    recapture storm; two steps draw different masks) and BERT with a padding mask (the attention
    op's outputs have the layouts its fake declares). Sites keep their full module paths."""
    torch.manual_seed(0)
    model = _gpt2_dropout().to(DEVICE).train()
    tritonize(model, rest="inductor", strict=True)
    batch = {k: v.to(DEVICE) for k, v in _batch("gpt2").items()}
    out1 = model(**batch)
    out1.loss.backward()
    out2 = model(**batch)
    assert torch.isfinite(out1.loss) and not torch.equal(out1.logits, out2.logits)  # fresh masks per step
    # the returned logits left the compiled graph detached; their gradient is attached outside it
    assert type(out2.logits.grad_fn).__name__ == "_ReturnedLogitsGradBackward", out2.logits.grad_fn
    # our ops are explicit Inductor fallbacks (the implicit path formats the whole IR on torch <= 2.11)
    from torch._inductor.lowering import lowerings

    assert torch.ops.tritonize.layer_norm_fwd.default in lowerings
    rep = tritonize.report(model)
    assert rep.captures <= 2 and rep.fallback is None, str(rep)
    assert _count(rep, ATTN) == 2 and rep.count("dropout") >= 4, str(rep)
    sites = [s.site for s in rep.sites]
    assert all(s.startswith(("transformer.", "lm_head", "<root>")) for s in sites), sites
    assert len(sites) == len(set((s.pattern, s.site, s.fused, s.reason) for s in rep.sites))
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert all(s.startswith(("transformer.", "lm_head", "<root>")) for s in (s.site for s in rep.sites))

    bert, _, _ = _bert("sdpa")
    bert = bert.to(DEVICE).train()
    ref = copy.deepcopy(bert)
    tritonize(bert, rest="inductor", strict=True)
    batch = {k: v.to(DEVICE) for k, v in _batch("bert").items()}
    out, out_ref = bert(**batch), ref(**batch)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=2e-5, rtol=2e-5)
    assert _count(tritonize.report(bert), ATTN) == 2, str(tritonize.report(bert))


def test_llama_drop_logits_in_training():
    """tritonize(drop_logits=True) on an HF causal LM with labels: training returns an empty
    logits tensor with the same loss and gradients as eager; eval returns the logits."""
    model = _llama("sdpa")[0].to(DEVICE)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device=DEVICE)
    tritonize(model, drop_logits=True)
    out, want = model(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    assert out.logits.numel() == 0 and want.logits.shape[-1] == model.config.vocab_size
    out.loss.backward()
    want.loss.backward()
    torch.testing.assert_close(out.loss, want.loss, atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_registered_backend_fuses_lm_head_and_loss():
    """torch.compile(model, backend="tritonize") on an HF causal LM: transformers' warning_once
    in the loss property must not break the graph (it did: the LM head and the loss then sat in
    two graphs and could not fuse). One graph, the LM head fused into the loss, loss and
    gradients as eager."""
    from tritonize.fuser.report import Report

    model, _, _ = _gpt2("sdpa")
    model = model.to(DEVICE).train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 16), device=DEVICE)
    rep = Report("registered backend")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="tritonize", options={"report": rep})
    loss = compiled(input_ids=ids, labels=ids).loss
    loss_ref = ref(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-4)
    loss.backward()
    loss_ref.backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad of {n}: {m}")
    assert rep.captures == 1, str(rep)
    assert rep.count("linear_cross_entropy") == 1, str(rep)
