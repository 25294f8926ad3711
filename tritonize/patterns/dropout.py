"""dropout: F.dropout(x, p, training=True) -> tritonize.kernels.dropout (Philox mask regenerated in
backward, nothing stored). p == 0 and eval-mode dropout are identities and were removed by
normalize. Runs last, so dropout inside attention goes to the attention kernel instead."""

from __future__ import annotations

import torch.nn.functional as F

from tritonize.patterns import Pattern, is_number, register, tensor_problem


@register
class Dropout(Pattern):
    name = "dropout"
    family = "dropout"
    priority = 0
    kernel = ("dropout", "dropout")

    def searches(self):
        def f(x, p):
            return F.dropout(x, p, True, False)

        yield "dropout", {}, f

    def guard(self, m):
        r = tensor_problem("x", m.val("x"))
        if r:
            return r
        p = m["p"]
        if not is_number(p) or not 0.0 <= p <= 1.0:
            return f"p {p!r} is not a number in [0, 1]"
        return None

    def replace(self, m, fn):
        return [m.call(fn, m["x"], float(m["p"]), True)]
