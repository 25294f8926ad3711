#!/bin/bash
# One GPU pass for the row-wise kernels: tests, dropout diagnostic, launch sweep, benchmark.
# Logs under $OUT (default ./gpu_out); a summary at the end. Each step is time-boxed.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
T_TESTS=${T_TESTS:-80}; T_SWEEP=${T_SWEEP:-60}; T_BENCH=${T_BENCH:-100}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
timeout 15 python3 -m benchmarks.diag_dropout > "$OUT/diag_dropout.log" 2>&1
TRITONIZE_AUTOTUNE=0 timeout $T_TESTS python3 -m pytest -q -rf --durations=8 \
  tests/kernels/test_dropout.py tests/kernels/test_softmax.py tests/kernels/test_layer_norm.py tests/kernels/test_rms_norm.py \
  > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"
timeout $T_SWEEP python3 -m benchmarks.bench_rowwise --sweep > "$OUT/sweep.log" 2>&1; echo "sweep rc=$?" >> "$OUT/sweep.log"
timeout $T_BENCH python3 -m benchmarks.bench_rowwise --shapes 4096x8192,4096x32768,8192x4096 --impls torch,tritonize,liger,torch.compile \
  > "$OUT/bench.log" 2>&1; echo "bench rc=$?" >> "$OUT/bench.log"
echo "=== summary"; cat "$OUT/gpu.txt"; cat "$OUT/diag_dropout.log" | tail -16; tail -12 "$OUT/tests.log"
grep -c '"gpu_ms"' "$OUT/sweep.log"; tail -1 "$OUT/sweep.log"
grep '"tritonize"' "$OUT/bench.log" | grep fwd+bwd | cut -c1-260; tail -1 "$OUT/bench.log"
