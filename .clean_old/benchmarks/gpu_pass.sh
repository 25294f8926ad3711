#!/usr/bin/env bash
# One batched pass on a GPU machine: environment, GPU test suite, benchmarks. Logs go to $OUT.
#   bash benchmarks/gpu_pass.sh [tests|bench|all] [bench names...]
# e.g. bash benchmarks/gpu_pass.sh all rowwise attention
#      bash benchmarks/gpu_pass.sh bench models        (bench_models: ~9 min for every row; see --models)
# Carried wheels in .whl/ (liger-kernel) are installed to /tmp/site first when present.
# Timings from the H100 sessions: the whole test suite takes ~2.5-3 min with -n 14 (pytest-xdist is on the
# image; almost all of it is Triton compiling), bench_rowwise ~3.5 min, bench_attention ~3 min,
# bench_cross_entropy ~2.5 min, bench_linear_act ~2.5 min cold. One command may run 10 minutes.
set -uo pipefail
OUT=${OUT:-$PWD/.out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
what=${1:-all}; shift || true
benches=${*:-"rowwise linear_act attention cross_entropy"}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# Editable install without build isolation (no network there) so the torch_dynamo_backends entry
# point resolves; fall back to PYTHONPATH when it cannot be installed.
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || { echo "editable install failed:"; tail -5 /tmp/install.log; } >>"$OUT/env.log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import liger_kernel; print('liger ok')" 2>&1 | tail -1
} 2>&1 | tee -a "$OUT/env.log"

if [ "$what" = tests ] || [ "$what" = all ]; then
  # check: every direct kernel launch is cross-checked against Triton's own binding (kernels/_launch.py)
  TRITONIZE_FAST_LAUNCH=${TRITONIZE_FAST_LAUNCH:-check} \
    timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -rf -n ${TEST_WORKERS:-14} ${TEST_PATHS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -30
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for b in $benches; do
    echo "=== bench_$b"
    timeout ${BENCH_TIMEOUT:-300} python3 -m benchmarks.bench_$b ${BENCH_ARGS:-} --out "/tmp/table_$b.md" > "$OUT/bench_$b.log" 2>&1
    echo "exit $?"; tail -40 "$OUT/bench_$b.log"
  done
fi
