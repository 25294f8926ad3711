"""tritonize(model, cudagraphs=True): rewritten graphs replayed as CUDA graphs (torch's CUDA graph
trees over the AOTAutograd forward/backward of the rewritten graph), or run uncaptured with the
reason in the report."""

import copy

import pytest
import torch

import tritonize.fuser.capture as capture
from tritonize import report, tritonize

tf = pytest.importorskip("transformers")


def _llama(device, dtype=torch.float32):
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _train(model, ids, steps):
    """Losses and final parameters of `steps` SGD steps (a replayed graph must see the updates)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, [p.detach().clone() for p in model.parameters()]


def test_bad_option_type():
    with pytest.raises(TypeError, match="cudagraphs"):
        tritonize(torch.nn.Linear(2, 2), cudagraphs="yes")


def test_cpu_graph_runs_uncaptured_and_says_why():
    m = _llama("cpu")
    ref = copy.deepcopy(m)
    ids = torch.randint(0, 512, (2, 16))
    tritonize(m, cudagraphs=True)
    out = m(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-5)
    notes = report(m).cudagraphs
    assert notes and all("no CUDA graphs" in n and "cpu" in n for n in notes), notes
    assert "cudagraphs:" in str(report(m))


def test_dropout_seed_blocks_capture():
    """A graph that draws a dropout seed on the CPU must not be frozen into a graph (the same mask
    every step): the blocker names it, whatever the device."""
    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.0)
    m = tf.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 128, (2, 8))
    tritonize(m, cudagraphs=True, patterns=["dropout"])
    m(input_ids=ids, labels=ids).loss.backward()
    notes = report(m).cudagraphs
    assert notes and "dropout seed" in notes[0], notes


def test_aot_path_numerics_on_cpu(monkeypatch):
    """The path taken on a GPU (AOTAutograd over the rewritten graph, our custom ops with their
    registered autograd) forced on CPU, where torch's backend itself declines to record and runs
    the split graphs as they are: losses and parameters equal the plain tritonize path's."""
    ids = torch.randint(0, 512, (2, 16))
    plain = _llama("cpu")
    want = _train(tritonize(plain), ids, 3)
    monkeypatch.setattr(capture, "cudagraph_blocker", lambda gm: None)
    m = tritonize(_llama("cpu"), cudagraphs=True)
    got = _train(m, ids, 3)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    notes = report(m).cudagraphs
    # forced on CPU: our check said yes, torch's own check declines (cpu device) and says so
    assert notes and all("torch declined" in n and "cpu" in n for n in notes), notes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rest", ["eager", "inductor"])
def test_replayed_training_matches_uncaptured(rest):
    """Six SGD steps (CUDA graph trees: warm-up, record, then replays): every loss and the final
    parameters equal those of the same rewrite run uncaptured, and of eager within fp32 tolerance."""
    from torch._dynamo.utils import counters

    ids = torch.randint(0, 512, (2, 16), device="cuda")
    eager = _train(_llama("cuda"), ids, 6)
    plain = _train(tritonize(_llama("cuda"), rest=rest), ids, 6)
    skips = counters["inductor"]["cudagraph_skips"]
    m = tritonize(_llama("cuda"), rest=rest, cudagraphs=True)
    got = _train(m, ids, 6)
    notes = report(m).cudagraphs
    assert notes and all(n.endswith("CUDA graphs on") for n in notes), notes
    assert counters["inductor"]["cudagraph_skips"] == skips, "torch declined to record the graph"
    torch.testing.assert_close(got[0], plain[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[0], eager[0], rtol=2e-3, atol=2e-3)
    for a, b in zip(got[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _gpt2(device):
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(cfg).to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replayed_training_with_bias_grad_kernel():
    """GPT-2's MLP (linear_act with a bias: db finished inside the element-wise backward kernel,
    with a per-call zeroed buffer of partials and tickets) under CUDA graph trees: torch records
    and replays the graphs (its pool checks reject allocations that outlive a call) and six SGD
    steps match the uncaptured rewrite."""
    from torch._dynamo.utils import counters

    ids = torch.randint(0, 256, (2, 16), device="cuda")
    plain = _train(tritonize(_gpt2("cuda"), rest="eager"), ids, 6)
    skips = counters["inductor"]["cudagraph_skips"]
    m = tritonize(_gpt2("cuda"), rest="eager", cudagraphs=True)
    got = _train(m, ids, 6)
    rep = report(m)
    assert any(s.pattern == "linear_act" and s.fused for s in rep.sites), str(rep)
    assert rep.cudagraphs and all(n.endswith("CUDA graphs on") for n in rep.cudagraphs), rep.cudagraphs
    assert counters["inductor"]["cudagraph_skips"] == skips, "torch declined to record the graph"
    torch.testing.assert_close(got[0], plain[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
