"""Shared fixtures. Kernel tests run on every device where the Triton kernel itself runs:

- "cpu": only when Triton's interpreter is on. On a machine with no GPU this file turns it on
  (TRITON_INTERPRET=1, before any kernel module is imported), which is how CI tests kernels.
- "cuda": whenever a GPU is present (there, the interpreter stays off unless you set it).

A CPU run without the interpreter would compare the reference path with itself, so it is not a
device here; the reference path is covered by the fuser and model tests.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Numerics tests run dozens of odd shapes: one config per kernel instead of tuning each shape
# (which compiles every candidate config per shape). Benchmarks keep autotuning on.
os.environ.setdefault("TRITONIZE_AUTOTUNE", "0")
# On a GPU the sdpa pattern keeps torch's fused SDPA by default (patterns/attention.py); the
# tests replace it so our attention kernel runs inside the model tests too. The default is
# tested on its own (tests/fuser/test_attention.py).
os.environ.setdefault("TRITONIZE_SDPA", "replace")
# Likewise small CUDA LayerNorm / linear -> activation sites stay torch's by default in
# rest="eager" (patterns/__init__.py EAGER_MIN_ELEMENTS); the tests' shapes are all small and are
# there to check our kernels inside models. The rule is tested on its own (tests/fuser/test_api.py).
os.environ.setdefault("TRITONIZE_SIZE_POLICY", "0")

import pytest  # noqa: E402

from tests.helpers import DEVICES, dtypes_for  # noqa: E402


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return (
        f"tritonize devices: {DEVICES}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}; "
        f"dtypes on the first: {[str(d) for d in dtypes_for(DEVICES[0])] if DEVICES else []}"
    )
