"""tritonize()/untritonize()/report(), the registered backend, strict mode, dynamic shapes, the
fx path and TRITONIZE_LOG."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from tests.fuser.common import DEVICE
from tritonize import tritonize, untritonize


def _mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8)).to(DEVICE)


def test_backend_name_from_a_clean_interpreter():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU())\n"
        "x = torch.randn(3, 4)\n"
        "assert 'tritonize' not in sys.modules\n"
        "y = torch.compile(m, backend='tritonize', options={'rest': 'eager'})(x)\n"
        "torch.testing.assert_close(y, m(x))\n"
        "from tritonize.fuser.backend import GLOBAL_REPORT\n"
        "print('FUSED', GLOBAL_REPORT.count('linear_act'))\n"
    )
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FUSED 1" in res.stdout


def test_same_object_state_dict_modes_and_untritonize():
    m = _mlp()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 8, device=DEVICE)
    ref = m(x)
    assert tritonize(m) is m
    assert tritonize(m) is m  # twice: a no-op
    compiled = m._compiled_call_impl
    tritonize(m, rest="inductor")
    assert m._compiled_call_impl is compiled
    assert m.state_dict().keys() == sd.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    torch.testing.assert_close(m(x), ref)
    rep = tritonize.report(m)
    assert rep.count("linear_act") == 1 and rep.count("layer_norm") == 1
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), ref)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), ref)
    d = rep.to_dict()
    assert d["patterns"]["linear_act"]["fused"] and "linear_act" in str(rep)
    captures = rep.captures
    assert untritonize(m) is m and m._compiled_call_impl is None
    torch.testing.assert_close(m(x), ref)
    assert rep.captures == captures  # no capture after untritonize


def test_varying_sequence_lengths_do_not_recapture_per_length():
    m = tritonize(_mlp())
    for t in (3, 5, 7, 9, 11):
        x = torch.randn(2, t, 8, device=DEVICE)
        m(x)
    rep = tritonize.report(m)
    assert rep.captures <= 2, rep.captures  # automatic dynamic: static, then one symbolic capture
    # one site however many captures; the symbolic graph fused too (the site was seen in every capture)
    site, = [s for s in rep.sites if s.pattern == "linear_act"]
    assert rep.count("linear_act") == 1 and site.captures == rep.captures, rep.to_dict()
    assert rep.to_dict()["patterns"]["linear_act"]["fused"] == [{"site": site.site, "n": 1, "captures": rep.captures}]


def test_transformers_warning_once_is_not_a_graph_break():
    transformers = pytest.importorskip("transformers")
    logger = transformers.utils.logging.get_logger("tritonize_test")

    class Warns(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            logger.warning_once("a one-time warning inside forward")
            return torch.relu(self.lin(x))

    m = tritonize(Warns().to(DEVICE))
    m(torch.randn(2, 4, device=DEVICE))
    rep = tritonize.report(m)
    assert rep.graph_breaks == [] and rep.captures == 1 and rep.count("linear_act") == 1, str(rep)


class Uncapturable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @torch.compiler.disable
    def forward(self, x):
        return torch.relu(self.lin(x))


def test_uncapturable_model_warns_and_runs_or_raises_when_strict():
    x = torch.randn(2, 4, device=DEVICE)
    m = Uncapturable().to(DEVICE)
    ref = m(x)
    tritonize(m)
    with pytest.warns(UserWarning, match="runs unmodified"):
        out = m(x)
    torch.testing.assert_close(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only
        torch.testing.assert_close(m(x), ref)
    assert tritonize.report(m).fallback
    s = tritonize(Uncapturable().to(DEVICE), strict=True)
    with pytest.raises(RuntimeError, match="strict"):
        s(x)


def test_patterns_and_exclude_options():
    m = tritonize(_mlp(), exclude=("norm",))
    m(torch.randn(2, 8, device=DEVICE))
    rep = tritonize.report(m)
    assert rep.count("linear_act") == 1 and rep.count("layer_norm") == 0
    m = tritonize(_mlp(), patterns=["layer_norm"])
    m(torch.randn(2, 8, device=DEVICE))
    rep = tritonize.report(m)
    assert rep.count("linear_act") == 0 and rep.count("layer_norm") == 1
    with pytest.raises(ValueError, match="unknown pattern"):
        tritonize(_mlp(), patterns=["nope"])


def test_debug_log_prints_graphs(monkeypatch, capfd):
    monkeypatch.setenv("TRITONIZE_LOG", "debug")
    m = tritonize(_mlp())
    m(torch.randn(2, 8, device=DEVICE))
    err = capfd.readouterr().err
    assert "before" in err and "after" in err and "tritonize_kernels" in err


def test_symbolic_trace_path():
    from tritonize.fuser.api import tritonize_fx

    m = _mlp()
    x = torch.randn(3, 8, device=DEVICE)
    gm = tritonize_fx(m, x)
    torch.testing.assert_close(gm(x), m(x))
    assert tritonize.report(gm).count("linear_act") == 1 and tritonize.report(gm).count("layer_norm") == 1


def test_config_logging_never_raises_under_the_logger_patch(monkeypatch):
    """torch <= 2.11 dumps Dynamo's config (with our ignore_logger_methods patch: a function) to
    JSON at each compile and logged an ERROR when that raised: the dump now yields None instead."""
    import torch._dynamo.utils as dutils

    from tritonize.fuser import api

    def raising():
        raise TypeError("Object of type _lru_cache_wrapper is not JSON serializable")

    monkeypatch.setattr(dutils, "_get_dynamo_config_for_logging", raising)
    monkeypatch.setattr(api, "_JSON_SAFE", [False])  # as in a fresh process
    api._json_safe_config_logging()
    assert dutils._get_dynamo_config_for_logging() is None
    api._json_safe_config_logging()  # idempotent: wraps once
    assert dutils._get_dynamo_config_for_logging.__closure__[0].cell_contents is raising


def test_bad_options_raise_naming_the_option():
    """tritonize's boolean options reject other values with a TypeError naming the option."""
    import pytest
    import torch.nn as nn

    from tritonize import tritonize

    with pytest.raises(TypeError, match="tritonize: drop_logits must be True or False"):
        tritonize(nn.Linear(2, 2), drop_logits="yes")
    with pytest.raises(TypeError, match="tritonize: gqa_fold must be True, False or None"):
        tritonize(nn.Linear(2, 2), gqa_fold=1)
    with pytest.raises(TypeError, match="tritonize: expected an nn.Module"):
        tritonize(lambda x: x)


def test_small_cuda_sites_stay_torch_in_eager_rest(monkeypatch):
    """rest="eager" on CUDA: LayerNorm / linear -> activation sites below EAGER_MIN_ELEMENTS keep
    torch's op (the report says why); large ones, other patterns and CPU sites are unaffected;
    naming the pattern in patterns= fuses them anyway. Fake CUDA tensors: runs without a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tritonize.patterns import EAGER_MIN_ELEMENTS, small_site_reason

    with FakeTensorMode():
        small = torch.empty(8192, 768, device="cuda", dtype=torch.bfloat16)
        wide = torch.empty(4096, 8192, device="cuda", dtype=torch.bfloat16)
        mlp = torch.empty(8192, 3072, device="cuda", dtype=torch.bfloat16)
        big_mlp = torch.empty(8192, 16384, device="cuda", dtype=torch.bfloat16)
    assert "kept torch's" in small_site_reason("layer_norm", small)
    assert "kept torch's" in small_site_reason("add_layer_norm", small)
    assert small_site_reason("layer_norm", wide) is None  # 2^25 elements: ours
    assert "kept torch's" in small_site_reason("linear_act", mlp)
    assert small_site_reason("linear_act", big_mlp) is None
    assert small_site_reason("rms_norm", small) is None  # HF's RMSNorm is many torch ops: always ours
    assert small_site_reason("layer_norm", torch.empty(8, 768)) is None  # CPU: no host-cost rule
    assert set(EAGER_MIN_ELEMENTS) == {"layer_norm", "add_layer_norm", "linear_act"}
    if torch.cuda.is_available():
        monkeypatch.setenv("TRITONIZE_SIZE_POLICY", "1")
        m = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)).cuda()
        x = torch.randn(4, 64, device="cuda")
        ref = m(x)
        tritonize(m)
        torch.testing.assert_close(m(x), ref)
        rep = tritonize.report(m)
        assert rep.count("layer_norm") == 0 and any("kept torch's" in r for _, r in rep.skipped("layer_norm")), str(rep)
        m2 = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)).cuda()
        tritonize(m2, patterns=("norm",))
        m2(x)
        assert tritonize.report(m2).count("layer_norm") == 1
