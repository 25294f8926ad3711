"""`python -m tritonize script.py [args]`: every transformers model a script builds is tritonized.

The script below knows nothing of tritonize's launcher: it builds a tiny GPT-2 from a config (an
LM head model with a nested GPT2Model), saves it and loads it back with `from_pretrained`, runs a
forward and backward on each, and prints what it sees. Run through the launcher, both models are
tritonized (only the outermost: the nested GPT2Model is not), their forwards run fused, and a
summary goes to stderr at exit. With TRITONIZE=0 the same command runs the script untouched.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from tritonize.fuser.api import is_tritonized
    import tritonize


    def main():  # the models are locals: gone before exit, the summary must still cover them
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        built = GPT2LMHeadModel(config)
        built.save_pretrained(sys.argv[1])
        loaded = AutoModelForCausalLM.from_pretrained(sys.argv[1])

        ids = torch.randint(0, 64, (2, 8))
        info = {"argv": sys.argv[1:], "name": __name__}
        for tag, m in (("built", built), ("loaded", loaded)):
            out = m(input_ids=ids, labels=ids)
            out.loss.backward()
            info[tag] = {
                "tritonized": is_tritonized(m),
                "inner_tritonized": is_tritonized(m.transformer),
                "loss": out.loss.item(),
                # distinct (pattern, site) pairs, as the exit summary counts them
                "fused": len({(s.pattern, s.site) for s in tritonize.report(m).sites if s.fused})
                if is_tritonized(m) else 0,
            }
        print("INFO " + json.dumps(info))


    if __name__ == "__main__":
        main()
        gc.collect()
    """
)


def _run(tmp_path, env_extra):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-m", "tritonize", str(script), str(tmp_path / "saved"), "--flag", "x"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("INFO ")]
    assert len(lines) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(lines[0][5:]), p.stderr


def test_launcher_tritonizes_every_model(tmp_path):
    info, err = _run(tmp_path, {})
    # The script got its own arguments and ran as __main__.
    assert info["argv"] == [str(tmp_path / "saved"), "--flag", "x"]
    assert info["name"] == "__main__"
    for tag in ("built", "loaded"):  # direct construction and from_pretrained
        assert info[tag]["tritonized"], (tag, info, err[-3000:])
        assert not info[tag]["inner_tritonized"], f"{tag}: the nested GPT2Model must not be tritonized separately"
        assert info[tag]["fused"] > 0, f"{tag}: nothing fused in a GPT-2 ({info[tag]}); stderr: {err[-3000:]}"
    # Same weights (saved, reloaded): same loss.
    assert abs(info["built"]["loss"] - info["loaded"]["loss"]) < 1e-5
    # The exit summary names both models with their fused counts.
    assert "tritonize: 2 model(s) tritonized" in err, err[-3000:]
    assert err.count("GPT2LMHeadModel: ") == 2, err[-3000:]
    assert f"GPT2LMHeadModel: {info['built']['fused']} site(s) fused" in err


def test_launcher_off_with_TRITONIZE_0(tmp_path):
    info, err = _run(tmp_path, {"TRITONIZE": "0"})
    assert info["argv"] == [str(tmp_path / "saved"), "--flag", "x"]
    for tag in ("built", "loaded"):
        assert not info[tag]["tritonized"]
        assert not info[tag]["inner_tritonized"]
    assert "disabled (TRITONIZE=0)" in err
    assert "model(s) tritonized" not in err


def test_launcher_exit_code_and_missing_script(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('ran')\nsys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "tritonize", str(script)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 3 and p.stdout.strip() == "ran"
    assert "no transformers model was built" in p.stderr
    p = subprocess.run([sys.executable, "-m", "tritonize", str(tmp_path / "nope.py")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 2 and "can't open file" in p.stderr
