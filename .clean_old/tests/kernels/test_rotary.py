"""rotary_embedding: forward and every gradient (dq, dk, and dcos / dsin when they require grad)
three ways (tests/helpers.assert_close3): the kernel, HF's `apply_rotary_pos_emb` formula in plain
torch in the same dtype, and the same formula in fp64 as the reference. Awkward shapes (1- to 5-D,
GQA, half-dims that are not powers of two), transformers' layouts (transposed views, partial-rotary
slices, stride-0 inputs and gradients), cos / sin broadcasts and dtypes, k=None, unused outputs,
empty tensors, the traced path (torch.compile) and the custom op, bad inputs.

cos and sin are random and independent (not cos^2 + sin^2 = 1, and their two halves differ), so a
kernel that mixes up the halves, or cos with sin, cannot pass by symmetry."""

import pytest
import torch

from tests.helpers import assert_close3, dtypes_for, noncontig_rows, stride0_grad, transposed_copy
from tritonize.kernels import rotary_embedding
from tritonize.kernels.rotary import rotary_reference


def _dtypes(device):
    out = dtypes_for(device)  # element-wise: bf16 runs in the interpreter too (its fp32 -> bf16 cast
    return out if torch.bfloat16 in out else out + [torch.bfloat16]  # truncates: within ATOL)


# --- HF's formula, written out here (transformers' apply_rotary_pos_emb, cos / sin unsqueezed) --


def hf_rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_rotary(q, k, cos, sin):
    q_embed = (q * cos) + (hf_rotate_half(q) * sin)
    k_embed = None if k is None else (k * cos) + (hf_rotate_half(k) * sin)
    return q_embed, k_embed


# --- three-way check of outputs and gradients -------------------------------------------------


def _leaves(ins, cast, need):
    """Detached copies of ins (same strides: `detach` is a view) as leaves; cast for the reference."""
    out = {}
    for name, t in ins.items():
        if t is None:
            out[name] = None
            continue
        t = t.detach()
        if cast is not None:
            t = t.to(cast)
        out[name] = t.requires_grad_(name in need)
    return out


def check(q, k, cos, sin, *, grad_cs=False, dy_fn=None, use_k_out=True):
    """rotary_embedding vs HF's formula in the inputs' dtypes vs the formula in fp64: outputs
    (values, dtype, shape, strides == torch.empty_like(input)) and the gradients of q, k (and cos,
    sin if grad_cs) for random upstream gradients (or dy_fn(y)). use_k_out=False leaves k's output
    out of the loss: k must then get no gradient. Returns the kernel's outputs and gradients."""
    ins = {"q": q, "k": k, "cos": cos, "sin": sin}
    need = {"q", "k"} | ({"cos", "sin"} if grad_cs else set())
    need = [n for n in ("q", "k", "cos", "sin") if n in need and ins[n] is not None]
    k_in, t_in, r_in = _leaves(ins, None, need), _leaves(ins, None, need), _leaves(ins, torch.float64, need)
    k_out = rotary_embedding(**k_in)
    t_out = hf_rotary(**t_in)
    r_out = hf_rotary(**r_in)
    assert isinstance(k_out, tuple) and len(k_out) == 2
    if k is None:
        assert k_out[1] is None
    for name, x, y, yt, yr in zip(("q_embed", "k_embed"), (q, k), k_out, t_out, r_out):
        if x is None:
            continue
        assert y.dtype == yt.dtype, f"{name}: dtype {y.dtype} != torch's {yt.dtype}"
        assert y.shape == x.shape, f"{name}: shape {tuple(y.shape)} != input {tuple(x.shape)}"
        # contiguous output (the attention after it runs faster on it: kernels/rotary.py OUT_CONTIGUOUS)
        want = torch.empty(x.shape).stride()
        assert y.stride() == want, f"{name}: strides {y.stride()} != contiguous {want}"
        assert_close3(y, yt, yr, name=name)
    used = [i for i, y in enumerate(k_out) if y is not None and (i == 0 or use_k_out)]
    dys = [(dy_fn or (lambda y: torch.randn(y.shape, dtype=y.dtype, device=y.device)))(k_out[i]) for i in used]
    wrt = need
    gk = torch.autograd.grad([k_out[i] for i in used], [k_in[n] for n in wrt], dys, allow_unused=True)
    gt = torch.autograd.grad([t_out[i] for i in used], [t_in[n] for n in wrt], dys, allow_unused=True)
    gr = torch.autograd.grad([r_out[i] for i in used], [r_in[n] for n in wrt], [d.double() for d in dys],
                             allow_unused=True)  # fmt: skip
    grads = {}
    for n, a, b, c in zip(wrt, gk, gt, gr):
        if n == "k" and not use_k_out:
            assert a is None and b is None, "k's output is unused: k must get no gradient"
            continue
        assert a is not None, f"d{n}: no gradient"
        assert a.dtype == ins[n].dtype, f"d{n}: dtype {a.dtype} != input's {ins[n].dtype}"
        if n in ("q", "k") and ins[n].dim() <= 4 and _dense(ins[n]):
            # gradients come back in the input's own dense layout (no copy in the projections' backward)
            assert a.stride() == ins[n].stride(), f"d{n}: strides {a.stride()} != input's {ins[n].stride()}"
        assert_close3(a, b, c, name=f"d{n}")
        grads[n] = a
    return k_out, grads


def _dense(x):
    return x.numel() > 0 and torch.empty_like(x).stride() == x.stride()


def _cs(shape, dtype, device):
    return (torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))


def _randn(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device)


# (q shape, k shape or None, cos / sin shape)
SHAPES = [
    ((1, 1, 1, 2), (1, 1, 1, 2), (1, 1, 1, 2)),  # D = 2: half 1
    ((2, 3, 7, 16), (2, 3, 7, 16), (2, 1, 7, 16)),
    ((3, 5, 33, 64), (3, 1, 33, 64), (3, 1, 33, 64)),  # GQA: k with fewer heads
    ((2, 4, 5, 96), (2, 2, 5, 96), (1, 1, 5, 96)),  # half 48
    ((4, 9, 6), (2, 9, 6), (9, 6)),  # 3-D (H, T, D), half 3
    ((11, 80), (11, 80), (11, 80)),  # 2-D (T, D), half 40
    ((2, 3, 2, 5, 8), (2, 3, 1, 5, 8), (2, 1, 1, 5, 8)),  # 5-D
    ((2, 3, 7, 16), None, (2, 1, 7, 16)),  # k=None
]


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "q{}-k{}-cs{}".format(*s).replace(" ", ""))
def test_rotary_shapes(device, shapes):
    qs, ks, cs = shapes
    for dtype in _dtypes(device):
        cos, sin = _cs(cs, dtype, device)
        check(_randn(qs, dtype, device), None if ks is None else _randn(ks, dtype, device), cos, sin)


def test_rotary_matches_reference_and_transformers(device):
    """rotary_reference is HF's formula in fp32; and transformers' own apply_rotary_pos_emb (cos /
    sin (B, T, D) unsqueezed at dim 1) agrees with ours to the three-way rule."""
    q, k = _randn((2, 4, 9, 32), torch.float32, device), _randn((2, 2, 9, 32), torch.float32, device)
    cos, sin = _cs((2, 1, 9, 32), torch.float32, device)
    torch.testing.assert_close(rotary_reference(q, cos, sin), hf_rotary(q, None, cos, sin)[0])
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    for dtype in _dtypes(device):
        qd, kd, cd, sd = (t.to(dtype) for t in (q, k, cos, sin))
        want = modeling.apply_rotary_pos_emb(qd, kd, cd.squeeze(1), sd.squeeze(1), unsqueeze_dim=1)
        got = rotary_embedding(qd, kd, cd, sd)
        ref = hf_rotary(q.double(), k.double(), cos.double(), sin.double())
        for g, w, r in zip(got, want, ref):
            assert g.dtype == w.dtype
            assert_close3(g, w, r)


def test_rotary_layouts(device):
    B, H, Hk, T, D = 2, 4, 2, 9, 16
    for dtype in _dtypes(device):
        cos, sin = _cs((B, 1, T, D), dtype, device)
        # transformers' views: (B, T, H, D) projections transposed to (B, H, T, D); the output is
        # contiguous, the gradients come back in the views' layout
        q = _randn((B, T, H * D), dtype, device).view(B, T, H, D).transpose(1, 2)
        k = _randn((B, T, Hk * D), dtype, device).view(B, T, Hk, D).transpose(1, 2)
        out, grads = check(q, k, cos, sin)
        assert out[0].is_contiguous() and out[1].is_contiguous()
        assert grads["q"].stride() == q.stride() and grads["k"].stride() == k.stride()
        # partial rotary: the first `rot` entries of a bigger head dim (row stride > D)
        qb, kb = _randn((B, H, T, D + 8), dtype, device), _randn((B, Hk, T, D + 6), dtype, device)
        check(qb[..., :D], kb[..., :D], cos, sin)
        # the last dim not unit-stride (transposed storage of the last two dims)
        qt = transposed_copy(_randn((B, H, T, D), dtype, device))
        kt = noncontig_rows(_randn((B, Hk, T, D), dtype, device))
        check(qt, kt, cos, sin)
        # stride-0 (expanded) q and k
        q0 = _randn((1, 1, T, D), dtype, device).expand(B, H, T, D)
        k0 = _randn((B, 1, T, D), dtype, device).expand(B, Hk, T, D)
        check(q0, k0, cos, sin)
        # cos / sin as non-contiguous views (a slice of a wider buffer, a transposed copy)
        cw = _randn((B, 1, T, D + 4), dtype, device)[..., 2 : D + 2]
        check(_randn((B, H, T, D), dtype, device), _randn((B, Hk, T, D), dtype, device), cw, transposed_copy(sin))
        # a 5-D slice (leading dims merge: a view); permuted 5-D: test_rotary_5d_permuted_* below
        c5, s5 = _cs((2, 1, 1, 5, 8), dtype, device)
        check(_randn((2, 3, 2, 5, 12), dtype, device)[..., :8], None, c5, s5)
        # stride-0 upstream gradients (y.sum().backward()) and non-contiguous ones
        q, k = _randn((B, H, T, D), dtype, device), _randn((B, Hk, T, D), dtype, device)
        check(q, k, cos, sin, dy_fn=stride0_grad)
        check(q, k, cos, sin, dy_fn=lambda y: noncontig_rows(torch.randn_like(y)))
        check(q, k, cos, sin, dy_fn=lambda y: transposed_copy(torch.randn_like(y)))


def test_rotary_sum_backward(device):
    """Literally `(q_embed.sum() + k_embed.sum()).backward()`: stride-0 gradients, into .grad."""
    for dtype in _dtypes(device):
        q = torch.randn(2, 5, 3, 8, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
        k = torch.randn(2, 1, 5, 8, dtype=dtype, device=device, requires_grad=True)
        cos, sin = _cs((1, 1, 5, 8), dtype, device)
        qe, ke = rotary_embedding(q, k, cos, sin)
        (qe.sum() + ke.sum()).backward()
        # d/dx sum(x * c + rotate_half(x) * s) = c + rotate_half^T(s), rotate_half^T([s1, s2]) = [s2, -s1]
        g = (cos.float() + torch.cat((sin[..., 4:], -sin[..., :4]), -1).float()).to(dtype)
        tol = dict(rtol=2**-7, atol=2**-7) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(q.grad, g.expand_as(q), **tol)
        torch.testing.assert_close(k.grad, g.expand_as(k), **tol)


@pytest.mark.parametrize("cs_shape", ["B1TD", "11TD", "TD", "full"])
def test_rotary_cos_sin_shapes_and_grads(device, cs_shape):
    """cos / sin broadcast as (B, 1, T, D), (1, 1, T, D), (T, D), or given at q's full shape (k
    then the same shape); with and without gradients for cos / sin (summed over what they
    broadcast over, q's and k's contributions added)."""
    B, H, T, D = 2, 3, 7, 12
    Hk = H if cs_shape == "full" else 1
    shape = {"B1TD": (B, 1, T, D), "11TD": (1, 1, T, D), "TD": (T, D), "full": (B, H, T, D)}[cs_shape]
    for dtype in _dtypes(device):
        cos, sin = _cs(shape, dtype, device)
        q, k = _randn((B, H, T, D), dtype, device), _randn((B, Hk, T, D), dtype, device)
        check(q, k, cos, sin)
        _, grads = check(q, k, cos, sin, grad_cs=True)
        assert grads["cos"].shape == cos.shape and grads["sin"].shape == sin.shape
        # only one of them requiring grad
        c_only = cos.detach().requires_grad_()
        qe, ke = rotary_embedding(q, k, c_only, sin)
        (qe.float().square().sum() + ke.float().sum()).backward()
        assert c_only.grad is not None and c_only.grad.shape == cos.shape


def test_rotary_dtype_promotion(device):
    """fp32 cos / sin with half q and k: torch's promotion gives fp32 outputs, so do we; gradients
    come back in each input's own dtype. Mixed q / k dtypes each get their own output dtype."""
    B, H, T, D = 2, 4, 5, 24
    for low in (torch.float16, torch.bfloat16):
        cos, sin = _cs((B, 1, T, D), torch.float32, device)
        q, k = _randn((B, H, T, D), low, device), _randn((B, 2, T, D), low, device)
        out, _ = check(q, k, cos, sin)
        assert out[0].dtype == out[1].dtype == torch.float32
        check(q, k, cos, sin, grad_cs=True)
        # half cos / sin with fp32 q: fp32 again; half q with fp32 k: one half, one fp32 output
        c16, s16 = cos.to(low), sin.to(low)
        check(q.float(), k.float(), c16, s16, grad_cs=True)
        out, _ = check(q, k.float(), c16, s16)
        assert out[0].dtype == low and out[1].dtype == torch.float32
        # cos and sin of different dtypes
        out, _ = check(q, k, c16, sin, grad_cs=True)
        assert out[0].dtype == torch.float32


def test_rotary_k_none_and_unused_outputs(device):
    B, H, T, D = 2, 3, 6, 16
    cos, sin = _cs((B, 1, T, D), torch.float16, device)
    q, k = _randn((B, H, T, D), torch.float16, device), _randn((B, 1, T, D), torch.float16, device)
    check(q, None, cos, sin)
    check(q, None, cos, sin, grad_cs=True)
    # k's output not in the loss: no error, k.grad stays None (and with cos / sin needing grad)
    check(q, k, cos, sin, use_k_out=False)
    check(q, k, cos, sin, use_k_out=False, grad_cs=True)
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    qe, ke = rotary_embedding(ql, kl, cos, sin)
    qe.float().sum().backward()
    assert kl.grad is None and ql.grad is not None
    # and q's output unused, only k's
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    qe, ke = rotary_embedding(ql, kl, cos, sin)
    ke.float().sum().backward()
    assert ql.grad is None and kl.grad is not None
    # no gradients at all (inference): plain tensors out
    with torch.no_grad():
        qe, ke = rotary_embedding(ql, kl, cos, sin)
    assert not qe.requires_grad and not ke.requires_grad
    torch.testing.assert_close(qe, hf_rotary(q, None, cos, sin)[0], rtol=2e-3, atol=2e-3)


def test_rotary_empty(device):
    for q_shape, k_shape, cs in [((2, 3, 0, 8), (2, 1, 0, 8), (2, 1, 0, 8)), ((0, 8), (0, 8), (0, 8)),
                                 ((2, 0, 5, 8), (2, 2, 5, 8), (2, 1, 5, 8))]:  # empty q, non-empty k
        cos, sin = _cs(cs, torch.float32, device)
        check(_randn(q_shape, torch.float32, device), _randn(k_shape, torch.float32, device), cos, sin)
        check(_randn(q_shape, torch.float16, device), _randn(k_shape, torch.float16, device), cos, sin, grad_cs=True)


def test_rotary_torch_compile(device):
    """The traced path (torch.ops.tritonize.rotary under torch.compile, aot_eager): same outputs
    and gradients as the eager fast path (the same kernel, so equal up to dcos / dsin's sum order)."""
    B, H, Hk, T, D = 2, 4, 2, 5, 16

    def fn(q, k, cos, sin):
        qe, ke = rotary_embedding(q, k, cos, sin)
        return qe * 2, ke

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    q = _randn((B, T, H * D), torch.float16, device).view(B, T, H, D).transpose(1, 2)
    k = _randn((B, Hk, T, D), torch.float16, device)
    cos, sin = _cs((B, 1, T, D), torch.float32, device)
    dys = None
    results = []
    for f in (fn, compiled):
        ins = [t.detach().requires_grad_() for t in (q, k, cos, sin)]
        out = f(*ins)
        dys = dys or [torch.randn_like(o) for o in out]
        grads = torch.autograd.grad(out, ins, dys)
        results.append((out, grads))
    (eo, eg), (co, cg) = results
    for a, b in zip(eo, co):
        assert a.dtype == b.dtype == torch.float32 and a.stride() == b.stride()
        assert torch.equal(a, b)
    for name, a, b in zip(("q", "k", "cos", "sin"), eg, cg):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"d{name}: compiled != eager")
    assert torch.equal(eg[0], cg[0]) and torch.equal(eg[1], cg[1])


@pytest.mark.parametrize("triton_path", [True, False], ids=["triton", "torch-fallback"])
def test_rotary_custom_op(device, monkeypatch, triton_path):
    """torch.ops.tritonize.rotary called directly (what graphs call): forward and its registered
    backward, through the Triton launcher and through the plain-torch fallback (where Triton does
    not run), three ways."""
    import importlib

    rot = importlib.import_module("tritonize.kernels.rotary")
    if not triton_path:
        monkeypatch.setattr(rot, "use_triton", lambda t: False)

    def op_fn(q, k, cos, sin):
        return torch.ops.tritonize.rotary(q, cos, sin, False), torch.ops.tritonize.rotary(k, cos, sin, False)

    B, H, T, D = 2, 3, 5, 12
    for dtype in (torch.float32, torch.float16):
        cos, sin = _cs((B, 1, T, D), dtype, device)
        q = _randn((B, T, H, D), dtype, device).transpose(1, 2)
        k = _randn((B, 1, T, D), dtype, device)
        ins = {"q": q, "k": k, "cos": cos, "sin": sin}
        k_in = _leaves(ins, None, ins)
        t_in = _leaves(ins, None, ins)
        r_in = _leaves(ins, torch.float64, ins)
        ko, to, ro = op_fn(**k_in), hf_rotary(**t_in), hf_rotary(**r_in)
        dys = [torch.randn_like(o) for o in ko]
        gk = torch.autograd.grad(ko, list(k_in.values()), dys)
        gt = torch.autograd.grad(to, list(t_in.values()), dys)
        gr = torch.autograd.grad(ro, list(r_in.values()), [d.double() for d in dys])
        for a, b, c in zip(ko, to, ro):
            assert a.dtype == b.dtype
            assert_close3(a, b, c)
        for n, a, b, c in zip(ins, gk, gt, gr):
            assert a.dtype == ins[n].dtype
            assert_close3(a, b, c, name=f"d{n}")


def test_rotary_opcheck(device):
    """Fake (meta) kernel, schema and autograd registration agree with the real op."""
    x = torch.randn(2, 3, 5, 8, device=device, requires_grad=True).transpose(1, 2)
    cos = torch.randn(2, 5, 1, 8, device=device, requires_grad=True)
    sin = torch.randn(2, 5, 1, 8, device=device)
    torch.library.opcheck(torch.ops.tritonize.rotary.default, (x, cos, sin, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.tritonize.rotary.default, (x.half(), cos, sin, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_rotary_bad_input(device):
    q = torch.randn(2, 3, 5, 8, device=device)
    cos = torch.randn(1, 1, 5, 8, device=device)
    with pytest.raises(ValueError, match=r"tritonize\.rotary_embedding.*'q'"):
        rotary_embedding(torch.randn(2, 3, 5, 7, device=device), None, cos[..., :7], cos[..., :7])  # odd D
    with pytest.raises(ValueError, match=r"tritonize\.rotary_embedding.*'q'"):
        rotary_embedding(torch.randn((), device=device), None, cos, cos)  # 0-d
    with pytest.raises(ValueError, match=r"tritonize\.rotary_embedding.*'cos'.*broadcast"):
        rotary_embedding(q, None, torch.randn(1, 1, 6, 8, device=device), cos)  # T mismatch
    with pytest.raises(ValueError, match=r"tritonize\.rotary_embedding.*'sin'.*broadcast"):
        rotary_embedding(q, None, cos, torch.randn(4, 8, device=device))
    with pytest.raises(ValueError, match=r"tritonize\.rotary_embedding.*'cos'"):
        rotary_embedding(q, None, torch.randn(3, 1, 5, 8, device=device), cos)  # B mismatch
    with pytest.raises(ValueError, match=r"tritonize\.rotary_embedding.*'cos'"):
        # broadcasts to k's 3 heads but not to q's 3 -> k with 2 heads: cos (1, 3, 5, 8) fits q only
        rotary_embedding(q, torch.randn(2, 2, 5, 8, device=device), torch.randn(1, 3, 5, 8, device=device), cos)
    with pytest.raises(ValueError, match=r"tritonize\.rotary_embedding.*'k'"):
        rotary_embedding(q, torch.randn(2, 1, 5, 6, device=device), cos, cos)  # k's D != q's
    with pytest.raises(TypeError, match=r"tritonize\.rotary_embedding.*'q'"):
        rotary_embedding(torch.ones(2, 3, 5, 8, dtype=torch.int32, device=device), None, cos, cos)
    with pytest.raises(TypeError, match=r"tritonize\.rotary_embedding.*'k'"):
        rotary_embedding(q, torch.ones(2, 1, 5, 8, dtype=torch.int64, device=device), cos, cos)
    with pytest.raises(TypeError, match=r"tritonize\.rotary_embedding.*'sin'"):
        rotary_embedding(q, None, cos, torch.ones(1, 1, 5, 8, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match=r"tritonize\.rotary_embedding.*'cos'"):
        rotary_embedding(q, None, None, cos)


# --- regressions: cases these tests found in the first version ------------------------------------


@pytest.mark.parametrize("kind", ["dense", "sliced"])
def test_rotary_5d_permuted_forward(device, kind):
    if kind == "dense":
        q = torch.randn(3, 2, 4, 5, 8, device=device).transpose(0, 1)  # (2, 3, 4, 5, 8), not contiguous
    else:
        q = torch.randn(3, 2, 4, 5, 12, device=device).transpose(0, 1)[..., 2:10]
    cos, sin = _cs((4, 5, 8), torch.float32, device)
    check(q, None, cos, sin)


def test_rotary_5d_permuted_backward(device):
    q = torch.randn(2, 3, 4, 5, 8, device=device)
    cos, sin = _cs((4, 5, 8), torch.float32, device)
    check(q, None, cos, sin, dy_fn=lambda y: torch.randn(3, 2, 4, 5, 8, device=device).transpose(0, 1))


def test_rotary_0d_cos_dtype(device):
    q = torch.randn(2, 3, 8, dtype=torch.float16, device=device)
    c, s = torch.tensor(0.6, device=device), torch.tensor(0.8, device=device)
    check(q, None, c, s)
