"""Measure the two ceilings every benchmark is judged against: copy bandwidth and bf16 matmul."""

import json

from benchmarks._common import copy_bandwidth_gbps, matmul_tflops, versions

if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        print("ceilings: needs a CUDA GPU; nothing measured")
    else:
        print(json.dumps({**versions(), "copy_gbps": round(copy_bandwidth_gbps(), 1),
                          "bf16_matmul_tflops_8192": round(matmul_tflops(8192), 1)}))
