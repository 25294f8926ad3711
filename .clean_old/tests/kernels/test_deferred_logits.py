"""tritonize.kernels.deferred_logits vs plain F.linear (CPU, fp32 unless said): values after every
kind of read, in-place ops and views, gradients of h, w, b (also only some requiring grad, stride-0
and non-contiguous upstream gradients, gradcheck), nothing computed before the first read (also
loss-only training), the staleness error, pickle / torch.save / deepcopy, deferred dtype casts
and autocast, unsupported ops failing clearly, bad arguments."""

import copy
import gc
import io
import pickle
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import stride0_grad
from tritonize.kernels.deferred_logits import STALE_MESSAGE, DeferredLogits, deferred_linear, materialize

N, H, V = 5, 7, 11

SHAPES = [pytest.param((N,), id="rank2"), pytest.param((2, N), id="rank3")]
BIAS = [pytest.param(True, id="bias"), pytest.param(False, id="nobias")]


def _inputs(lead, bias, dtype=torch.float32):
    h = torch.randn(*lead, H, dtype=dtype)
    w = torch.randn(V, H, dtype=dtype)
    b = torch.randn(V, dtype=dtype) if bias else None
    return h, w, b


def _leaves(tensors, requires=(True, True, True)):
    return [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip(tensors, requires)]


def _assert_untouched(logits):
    assert isinstance(logits, DeferredLogits)
    assert not logits.is_materialized
    assert logits._cache is None  # no (N, V) storage anywhere yet


def _run(make, loss_fn, tensors, requires=(True, True, True)):
    """loss_fn(make(h, w, b)).backward() on fresh leaves: (loss, [grad or None per input])."""
    leaves = _leaves(tensors, requires)
    loss = loss_fn(make(*leaves))
    loss.backward()
    return loss.detach(), [None if x is None else x.grad for x in leaves]


def _check_grads(loss_fn, tensors, requires=(True, True, True)):
    ours = _run(deferred_linear, loss_fn, tensors, requires)
    ref = _run(F.linear, loss_fn, tensors, requires)
    torch.testing.assert_close(ours[0], ref[0])
    for name, got, want, r in zip("hwb", ours[1], ref[1], requires):
        if want is None:
            assert got is None, f"d{name} should be None"
        else:
            assert r
            torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d{name}: {m}")


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("lead", SHAPES)
def test_metadata_without_computing(lead, bias):
    h, w, b = _leaves(_inputs(lead, bias))
    logits = deferred_linear(h, w, b)
    _assert_untouched(logits)
    assert logits.shape == (*lead, V) and logits.dtype == h.dtype and logits.device == h.device
    assert logits.stride() == F.linear(h, w, b).stride() and logits.is_contiguous()
    assert logits.requires_grad and logits.grad_fn is not None and not logits.is_leaf
    assert len(logits) == lead[0] and logits.dim() == len(lead) + 1 and logits.numel() == np.prod(lead) * V
    logits.retain_grad()
    logits.register_hook(lambda g: None)
    _assert_untouched(logits)
    # ops that only need the metadata do not compute the logits either
    assert torch.zeros_like(logits).shape == logits.shape and torch.empty_like(logits).dtype == logits.dtype
    assert torch.count_nonzero(torch.zeros_like(logits)) == 0
    assert logits.new_zeros(3).shape == (3,) and logits.new_full((2,), 1.5).tolist() == [1.5, 1.5]
    assert logits.to(logits.dtype) is logits and logits.contiguous() is logits
    _assert_untouched(logits)


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("lead", SHAPES)
def test_values(lead, bias):
    h, w, b = _leaves(_inputs(lead, bias))
    ref = F.linear(h, w, b).detach()
    x = torch.randn(*lead, V)

    def fresh():
        logits = deferred_linear(h, w, b)
        _assert_untouched(logits)
        return logits

    torch.testing.assert_close(fresh(), ref)  # the tensor itself
    logits = fresh()
    torch.testing.assert_close(logits.detach(), ref)
    assert logits.is_materialized
    torch.testing.assert_close(logits.detach(), ref)  # cached: read again
    torch.testing.assert_close(fresh().float(), ref)
    torch.testing.assert_close(fresh()[0], ref[0])
    torch.testing.assert_close(fresh()[..., 2:5], ref[..., 2:5])
    torch.testing.assert_close(fresh().argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(fresh() * x + 1, ref * x + 1)
    torch.testing.assert_close(x - fresh(), x - ref)
    torch.testing.assert_close(torch.cat([fresh(), x, fresh()], dim=-1), torch.cat([ref, x, ref], dim=-1))
    torch.testing.assert_close(torch.stack([fresh(), fresh()]), torch.stack([ref, ref]))
    torch.testing.assert_close(fresh().view(-1, V), ref.view(-1, V))
    torch.testing.assert_close(fresh().softmax(-1), ref.softmax(-1))
    assert torch.equal(fresh(), ref)
    assert fresh().tolist() == ref.tolist()
    assert fresh()[(0,) * len(lead) + (3,)].item() == ref[(0,) * len(lead) + (3,)].item()
    np.testing.assert_array_equal(fresh().detach().numpy(), ref.numpy())
    np.testing.assert_array_equal(fresh().numpy(force=True), ref.numpy())
    torch.testing.assert_close(materialize(fresh()), ref)
    assert type(materialize(fresh())) is torch.Tensor and materialize(ref) is ref


def test_noncontiguous_hidden_states():
    base = torch.randn(N, 2, H)
    h = base.transpose(0, 1)  # (2, N, H), not contiguous
    w = torch.randn(V, H)
    logits = deferred_linear(h, w)
    assert logits.is_contiguous()
    torch.testing.assert_close(logits.view(-1, V), F.linear(h, w).reshape(-1, V))


def test_numpy_and_friends():
    h, w, b = _leaves(_inputs((N,), True))
    ref = F.linear(h, w, b).detach()
    logits = deferred_linear(h, w, b)
    with pytest.raises(RuntimeError, match="Can't call numpy\\(\\) on Tensor that requires grad"):
        logits.numpy()  # as a real logits tensor
    with pytest.raises(RuntimeError, match="Can't call numpy\\(\\) on Tensor that requires grad"):
        np.asarray(logits)
    with torch.no_grad():
        plain = deferred_linear(h, w, b)
    np.testing.assert_array_equal(plain.numpy(), ref.numpy())
    np.testing.assert_array_equal(np.asarray(plain), ref.numpy())
    plain = deferred_linear(h.detach(), w.detach(), b.detach())
    assert plain.data_ptr() != 0 and plain.data_ptr() == materialize(plain).data_ptr()
    assert plain.untyped_storage().nbytes() == N * V * 4
    plain.share_memory_()
    assert plain.is_shared() and materialize(plain).is_shared()
    # .data: reading gives the values; assigning replaces them (sharing x's memory, as torch does)
    other = deferred_linear(h, w, b)
    assert type(other.data) is torch.Tensor and torch.equal(other.data, ref)
    x = torch.zeros(N, V)
    other = deferred_linear(h, w, b)
    other.data = x
    assert torch.equal(other, x) and other.data_ptr() == x.data_ptr() and other.grad_fn is not None
    with pytest.raises(NotImplementedError, match="logits.data = x"):
        other.data = torch.zeros(3)
    torch.testing.assert_close(torch.from_dlpack(deferred_linear(h.detach(), w.detach(), b.detach())), ref)
    text = repr(logits)
    assert text.startswith("DeferredLogits(") and "grad_fn=<_DeferredLinearBackward>" in text
    assert logits.is_materialized
    assert f"{ref[0, 0].item():.4f}" in text and f"{ref[-1, -1].item():.4f}" in text
    assert str(deferred_linear(h, w, b)) == text
    assert f"{deferred_linear(h, w, b)[0, 0]:.3f}" == f"{ref[0, 0]:.3f}"


# --- in-place ops and views -------------------------------------------------------------------


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("lead", SHAPES)
def test_inplace_ops_then_reads(lead, bias):
    h, w, b = _leaves(_inputs(lead, bias))
    ref = F.linear(h, w, b).detach().clone()
    logits = deferred_linear(h, w, b)
    assert logits.div_(2) is logits  # identity, as for a real tensor
    ref.div_(2)
    logits[0] = 0
    ref[0] = 0
    logits[..., 3] += 1
    ref[..., 3] += 1
    logits.clamp_(min=-0.5)
    ref.clamp_(min=-0.5)
    assert isinstance(logits, DeferredLogits)
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(logits.sum(), ref.sum())
    # writes through views (which are views of the computed values) show in the tensor
    v = logits.view(-1, V)
    v[:, 0] = 7.0
    ref.view(-1, V)[:, 0] = 7.0
    torch.testing.assert_close(logits, ref)
    logits.detach()[..., 1] = -3.0  # detach() shares the values, as for a real tensor
    ref[..., 1] = -3.0
    torch.testing.assert_close(logits, ref)
    materialize(logits).mul_(2)
    ref.mul_(2)
    torch.testing.assert_close(logits, ref)
    # in-place ops that read the deferred logits as the source
    x = torch.zeros(*lead, V)
    x.copy_(logits)
    torch.testing.assert_close(x, ref)
    x.add_(logits)
    torch.testing.assert_close(x, 2 * ref)


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("lead", SHAPES)
def test_inplace_ops_gradients(lead, bias):
    tensors = _inputs(lead, bias)
    g = torch.randn(*lead, V)

    def make(h, w, b, linear):
        z = linear(h, w, b)
        z.div_(2)
        z[0] = 0
        z[..., 1:3].mul_(3)
        return z

    loss, grads = _run(lambda h, w, b: make(h, w, b, deferred_linear), lambda z: (z * g).sum(), tensors)
    ref_loss, ref_grads = _run(lambda h, w, b: make(h, w, b, F.linear), lambda z: (z * g).sum(), tensors)
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_inplace_after_save_is_refused_like_a_real_tensor():
    h, w, b = _leaves(_inputs((N,), True))
    g = torch.randn(N, V, requires_grad=True)
    for make in (deferred_linear, F.linear):
        z = make(h, w, b)
        y = (z * g).sum()  # saves z for g's gradient
        z.detach().mul_(2)  # bumps z's version: autograd must notice, for the deferred one too
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()


def test_metadata_changing_inplace_ops_are_refused():
    h, w, b = _inputs((N,), True)
    logits = deferred_linear(h, w, b)
    for op in (lambda z: z.unsqueeze_(0), lambda z: z.t_(), lambda z: z.resize_(3), lambda z: z.squeeze_()):
        with pytest.raises(NotImplementedError, match="changes the deferred logits' shape/strides in place"):
            op(logits)
    assert logits.shape == (N, V)
    torch.testing.assert_close(logits, F.linear(h, w, b))  # still usable
    out = torch.add(torch.ones(N, V), 1, out=logits)  # out= of the same shape: fine
    assert out is logits
    torch.testing.assert_close(logits, torch.full((N, V), 2.0))
    with pytest.raises(RuntimeError, match="resized the deferred logits' values"), pytest.warns(UserWarning):
        torch.add(torch.ones(3), 1, out=logits)  # torch warns that it resizes the out= tensor
    with pytest.raises(RuntimeError, match="resized the deferred logits' values"):
        logits.sum()  # the wrapper stays refused, never silently inconsistent


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("lead", SHAPES)
@pytest.mark.parametrize("loss", ["weighted_sum", "sum", "cross_entropy", "twice"])
def test_gradients(lead, bias, loss):
    tensors = _inputs(lead, bias)
    g = torch.randn(*lead, V)
    t = torch.randint(0, V, (int(np.prod(lead)),))
    t[1] = -100
    loss_fn = {
        "weighted_sum": lambda z: (z * g).sum(),
        "sum": lambda z: z.sum(),  # upstream gradient expanded from a scalar: every stride 0
        "cross_entropy": lambda z: F.cross_entropy(z.view(-1, V).float(), t),
        "twice": lambda z: (z * g).sum() + z.float().pow(2).mean() + z[0].sum(),
    }[loss]
    _check_grads(loss_fn, tensors)


SOME = [(True, False, False), (False, True, False), (False, False, True), (True, True, False), (False, True, True)]


@pytest.mark.parametrize("bias, requires", [(bias, req) for req in SOME for bias in (True, False) if bias or not req[2]])
def test_gradients_of_some_inputs(requires, bias):
    tensors = _inputs((2, N), bias)
    g = torch.randn(2, N, V)
    _check_grads(lambda z: (z * g).sum(), tensors, requires)


def test_no_input_requires_grad():
    h, w, b = _inputs((N,), True)
    logits = deferred_linear(h, w, b)
    _assert_untouched(logits)
    assert not logits.requires_grad and logits.grad_fn is None
    with torch.no_grad():
        logits = deferred_linear(*_leaves((h, w, b)))
    assert not logits.requires_grad and logits.grad_fn is None
    torch.testing.assert_close(logits, F.linear(h, w, b))


@pytest.mark.parametrize("grad_kind", ["stride0", "noncontig", "deferred"])
def test_upstream_gradient_layouts(grad_kind):
    h, w, b = _leaves(_inputs((2, N), True))
    if grad_kind == "stride0":
        go = stride0_grad(torch.empty(2, N, V))
    elif grad_kind == "noncontig":
        go = torch.randn(V, N, 2).permute(2, 1, 0)
        assert not go.is_contiguous()
    else:  # the gradient is itself a DeferredLogits
        go = deferred_linear(torch.randn(2, N, 3), torch.randn(V, 3))
    ours = torch.autograd.grad(deferred_linear(h, w, b), (h, w, b), go)
    ref = torch.autograd.grad(F.linear(h, w, b), (h, w, b), go)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want)


def test_gradcheck_and_double_backward():
    h, w, b = (t.double().requires_grad_() for t in _inputs((2, 3), True))
    assert torch.autograd.gradcheck(deferred_linear, (h, w, b))
    assert torch.autograd.gradgradcheck(deferred_linear, (h, w, b))


def test_loss_only_training_never_computes_the_logits():
    h, w, b = _leaves(_inputs((2, N), True))
    t = torch.randint(0, V, (2 * N,))
    logits = deferred_linear(h, w, b)  # returned next to the loss, as by the fused model
    loss = F.cross_entropy(F.linear(h, w, b).view(-1, V), t)  # the loss, computed without them
    loss.backward()
    assert all(x.grad is not None for x in (h, w, b))
    _assert_untouched(logits)  # neither the forward nor the backward of the loss touched them
    torch.testing.assert_close(logits, F.linear(h, w, b))  # still readable afterwards


def test_freed_by_reference_count():
    """No reference cycle (wrapper <-> autograd graph): dropping the logits frees their values at
    once, without waiting for the garbage collector."""
    h, w, b = _leaves(_inputs((N,), True))
    logits = deferred_linear(h, w, b)
    logits.sum()
    refs = weakref.ref(logits), weakref.ref(logits._cache)
    gc.disable()
    try:
        del logits
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


# --- staleness --------------------------------------------------------------------------------


@pytest.mark.parametrize("changed", ["h", "w", "b"])
def test_stale_read_raises(changed):
    h, w, b = _leaves(_inputs((N,), True))
    logits = deferred_linear(h, w, b)
    with torch.no_grad():  # bumps the version counter (`.data.add_` would not: see the module docs)
        {"h": h, "w": w, "b": b}[changed].add_(1)
    for read in (lambda z: z + 0, lambda z: z.argmax(-1), lambda z: z.tolist(), repr, lambda z: z.double(),
                 materialize, lambda z: pickle.dumps(z)):  # fmt: skip
        with pytest.raises(RuntimeError) as info:
            read(logits)
        assert STALE_MESSAGE in str(info.value)
        assert "optimizer.step()" in str(info.value) and "defer_logits=False" in str(info.value)
    _assert_untouched(logits)


def test_stale_after_optimizer_step_but_fine_when_read_before():
    head = torch.nn.Linear(H, V)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    h = torch.randn(2, N, H, requires_grad=True)
    t = torch.randint(0, V, (2 * N,))

    def step():
        logits = deferred_linear(h, head.weight, head.bias)
        F.cross_entropy(head(h).view(-1, V), t).backward()
        return logits, head(h).detach()

    logits, ref = step()
    opt.step()
    with pytest.raises(RuntimeError, match="the returned logits were deferred"):
        logits.argmax(-1)

    logits, ref = step()
    preds = logits.argmax(-1)  # read before the update: computed and cached now
    opt.step()
    torch.testing.assert_close(logits, ref)  # later changes of the weight do not matter
    torch.testing.assert_close(preds, ref.argmax(-1))
    assert logits._h is None and logits._w is None  # the inputs are released once cached


# --- serialisation and copies -----------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [True, False])
def test_pickle_and_torch_save(requires_grad):
    h, w, b = _leaves(_inputs((2, N), True), (requires_grad,) * 3)
    ref = F.linear(h, w, b).detach()
    for roundtrip in ("pickle", "torch.save", "copy"):
        logits = deferred_linear(h, w, b)
        if roundtrip == "pickle":
            back = pickle.loads(pickle.dumps(logits))
        elif roundtrip == "copy":
            back = copy.copy(logits)
        else:
            buf = io.BytesIO()
            torch.save({"logits": logits, "twice": [logits, logits]}, buf)
            buf.seek(0)
            loaded = torch.load(buf)  # weights_only: a plain tensor is all it holds
            assert loaded["twice"][0].data_ptr() == loaded["twice"][1].data_ptr()
            back = loaded["logits"]
        assert type(back) is torch.Tensor, roundtrip
        assert back.requires_grad == requires_grad and back.is_leaf
        torch.testing.assert_close(back.detach(), ref)


def test_deepcopy():
    h, w, b = _leaves(_inputs((N,), True))
    with pytest.raises(RuntimeError, match="graph leaves"):  # as for a real non-leaf tensor
        copy.deepcopy(deferred_linear(h, w, b))
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(F.linear(h, w, b))
    with torch.no_grad():
        logits = deferred_linear(h, w, b)
    copied = copy.deepcopy({"a": logits, "b": logits})
    assert type(copied["a"]) is torch.Tensor and copied["a"] is copied["b"]
    torch.testing.assert_close(copied["a"], F.linear(h, w, b).detach())
    copied["a"].zero_()  # a copy: the original is untouched
    torch.testing.assert_close(logits, F.linear(h, w, b).detach())


# --- dtype casts, autocast, inference mode ----------------------------------------------------


def test_deferred_dtype_cast():
    h, w, b = _leaves(_inputs((2, N), True, torch.bfloat16))
    g = torch.randn(2, N, V)
    logits = deferred_linear(h, w, b)
    as_fp32 = logits.float()  # accelerate's convert_outputs_to_fp32 does this to every bf16 output
    assert isinstance(as_fp32, DeferredLogits) and as_fp32.dtype == torch.float32
    assert as_fp32.grad_fn is not None
    _assert_untouched(logits)
    _assert_untouched(as_fp32)
    ref = F.linear(h, w, b)
    assert torch.equal(as_fp32, ref.float())
    assert not logits.is_materialized
    logits.mul_(2)  # a later write to the source does not reach the copy
    assert torch.equal(as_fp32, ref.float()) and torch.equal(logits, ref * 2)
    _check_grads(lambda z: (z.float() * g).sum(), (h, w, b))


def test_autocast():
    h, w, b = _leaves(_inputs((2, N), True))
    g = torch.randn(2, N, V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = deferred_linear(h, w, b)
        ref = F.linear(h, w, b)
        assert logits.dtype == ref.dtype == torch.bfloat16
    _assert_untouched(logits)
    assert torch.equal(logits, ref)  # read outside autocast: same dtype and values
    plain = deferred_linear(h, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.detach().dtype == torch.float32  # read inside autocast: still its own dtype

    def under_autocast(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return deferred_linear(*args)

    ours = _run(under_autocast, lambda z: (z.float() * g).sum(), (h, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _run(F.linear, lambda z: (z.float() * g).sum(), (h, w, b))
    for got, want in zip(ours[1], ref[1]):
        torch.testing.assert_close(got, want)


def test_inference_mode_computes_at_once():
    with torch.inference_mode():
        h, w, b = _inputs((N,), True)  # inference tensors: no version counter to guard with
        logits = deferred_linear(h, w, b)
        assert type(logits) is torch.Tensor
        torch.testing.assert_close(logits, F.linear(h, w, b))


# --- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, exc, arg",
    [
        pytest.param(lambda h, w, b: ([1.0] * H, w, b), TypeError, "h", id="h-not-tensor"),
        pytest.param(lambda h, w, b: (h, None, b), TypeError, "w", id="w-none"),
        pytest.param(lambda h, w, b: (h, w, 3.0), TypeError, "b", id="b-not-tensor"),
        pytest.param(lambda h, w, b: (h.long(), w.long(), b.long()), TypeError, "h", id="h-int"),
        pytest.param(lambda h, w, b: (h, w.double(), b), TypeError, "w", id="w-dtype"),
        pytest.param(lambda h, w, b: (h, w, b.half()), TypeError, "b", id="b-dtype"),
        pytest.param(lambda h, w, b: (h.sum(), w, b), ValueError, "h", id="h-scalar"),
        pytest.param(lambda h, w, b: (h, w[0], b), ValueError, "w", id="w-1d"),
        pytest.param(lambda h, w, b: (h, w[:, :-1], b), ValueError, "w", id="w-hidden-size"),
        pytest.param(lambda h, w, b: (h, w, b[:-1]), ValueError, "b", id="b-shape"),
        pytest.param(lambda h, w, b: (h, w.to("meta"), b), ValueError, "w", id="w-device"),
    ],
)
def test_bad_arguments(args, exc, arg):
    with pytest.raises(exc, match="tritonize.deferred_linear") as info:
        deferred_linear(*args(*_inputs((N,), True)))
    assert arg in str(info.value)
