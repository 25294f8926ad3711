"""dropout: F.dropout(x, p, training=True) -> tritonize.kernels.dropout (Philox mask regenerated in
backward, nothing stored). p == 0 and eval-mode dropout are identities and were removed by
normalize. Runs last, so dropout inside attention goes to the attention kernel instead.

Seed: drawn IN the graph (`torch.randint(0, 2**31 - 1, (), dtype=int64)`, a 0-d CPU tensor node)
and passed to the kernel's custom op, so a captured graph draws a fresh mask every step and
Inductor (`rest="inductor"`) never sees an `.item()` of a seed."""

from __future__ import annotations

import torch.nn.functional as F

import torch

from tritonize.patterns import Pattern, is_number, register, tensor_problem

SEED_HIGH = 2**31 - 1


def seed_node(m):
    """A fresh 0-d int64 CPU seed tensor drawn in the graph (torch's default generator)."""
    return m.call(torch.randint, 0, SEED_HIGH, (), dtype=torch.int64)


def _seeded_dropout(x, p, seed):
    """dropout(x, p) with the graph's seed tensor (the public op takes it as is)."""
    from tritonize.kernels import dropout

    return dropout(x, p, True, seed=seed)


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

    def kernel_function(self):
        super().kernel_function()  # import errors decline the pattern
        return _seeded_dropout

    def replace(self, m, fn):
        return [m.call(fn, m["x"], float(m["p"]), seed_node(m))]
