"""Replays test_dropout_shapes_dtypes[cuda]'s random draws (torch.manual_seed(0), x then dy per
(dtype, shape)) and reports, for each case, where the backward mask differs from the forward
mask, whether dy is exactly 0 there, and whether the kernel's mask is the same for x, dy and ones.

    python -m benchmarks.diag_dropout
"""

import sys

import torch

from tritonize.kernels.dropout import dropout, dropout_backward, dropout_forward

SHAPES = [(1, 1), (7, 3), (3, 7, 1023), (1823, 781), (2, 5, 4096)]


def main():
    if not torch.cuda.is_available():
        print("diag_dropout needs a CUDA GPU; none found.")
        return 0
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for i, shape in enumerate(SHAPES):
            seed = 100 + i
            x = torch.randn(shape, device="cuda", dtype=dtype)
            x_zeros = int((x == 0).sum())
            x[x == 0] = 1.0
            xk = x.detach().requires_grad_()
            y = dropout(xk, 0.3, seed=seed)
            keep = y != 0
            dy = torch.randn(x.shape, dtype=dtype, device="cuda")
            y.backward(dy)
            diff = (xk.grad != 0) != keep
            nd = int(diff.sum())
            dy0 = int((dy == 0).sum())
            ones = torch.ones(shape, device="cuda", dtype=dtype)
            m_ones = dropout_forward(ones, 0.3, seed) != 0
            m_bwd_ones = dropout_backward(ones, 0.3, seed) != 0
            same = torch.equal(m_ones, keep) and torch.equal(m_bwd_ones, keep)
            print(f"{str(dtype):15s} {str(shape):14s} seed={seed} mask-diffs={nd} dy==0:{dy0} at-diffs:"
                  f"{int((diff & (dy == 0)).sum())} x==0:{x_zeros} kernel-mask(x)==mask(ones):{same}"
                  + (f" first={diff.nonzero()[:4].tolist()}" if nd else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
