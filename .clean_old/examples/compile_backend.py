"""`torch.compile(model, backend="tritonize")`: the backend is registered, no import needed.

    python examples/compile_backend.py

tritonize registers a `torch_dynamo_backends` entry point, so any code that calls torch.compile can
pick it by name — this script never imports tritonize before compiling. Options go through
`options=`: `rest="inductor"` hands the graph around the fused kernels to Inductor (the kernels
stay opaque custom ops inside it), `patterns=`/`exclude=` choose what to fuse.

(`tritonize(model)` does the same thing but returns the same module object and keeps one report
per model; `torch.compile(...)` returns a wrapper, and its sites go to a process-wide report.)
"""

import copy

import torch
from transformers import BertConfig, BertModel


def main():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                        vocab_size=1000, max_position_embeddings=128)
    model = BertModel(config).to(device).eval()
    eager = copy.deepcopy(model)

    compiled = torch.compile(model, backend="tritonize")  # by name: tritonize is not imported yet
    ids = torch.randint(0, config.vocab_size, (2, 48), device=device)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0  # padding in the second sequence: the attention mask is honoured
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    print(f"backend='tritonize': max |out - eager| = {(out - ref).abs().max().item():.2e}")

    # The rest of the graph through Inductor (needs a C++ compiler on CPU, Triton on GPU).
    try:
        compiled2 = torch.compile(copy.deepcopy(eager), backend="tritonize", options={"rest": "inductor"})
        with torch.no_grad():
            out2 = compiled2(input_ids=ids, attention_mask=mask).last_hidden_state
        print(f"backend='tritonize', rest='inductor': max |out - eager| = {(out2 - ref).abs().max().item():.2e}")
    except Exception as e:  # e.g. no C++ compiler for Inductor's CPU code; printed, not hidden
        print(f"backend='tritonize', rest='inductor' FAILED: {type(e).__name__}: {str(e).splitlines()[0]}")

    import tritonize  # only now, to read the report

    print(tritonize.report(compiled))


if __name__ == "__main__":
    main()
