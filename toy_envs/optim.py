"""SGD and Adam over parameters batched by seed, able to skip individual seeds.

Every parameter has the seed dimension first. Seeds are independent replicates, so a step in
which one seed has nothing to train on (e.g. Entrocraft rejected all its samples) must leave
that seed's parameters *and* its optimiser state untouched, while the other seeds step. The
arithmetic is that of ``torch.optim.SGD`` / ``torch.optim.Adam`` (no weight decay).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SeedOptimizer", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam")


#: elements per block of the in-place SGD update (256 KiB of float32, cache-resident)
SGD_BLOCK_ELEMENTS = 1 << 16


def _sgd_step_blocks(param: Tensor, grad: Tensor, lr: float) -> None:
    """``param -= lr * grad`` in place, block by block of :data:`SGD_BLOCK_ELEMENTS` (contiguous tensors).

    The same two roundings per element as ``param.sub_(lr * grad)`` (product, then difference), without a
    temporary the size of the parameter."""
    flat_p, flat_g = param.view(-1), grad.view(-1)
    for a in range(0, flat_p.numel(), SGD_BLOCK_ELEMENTS):
        flat_p[a : a + SGD_BLOCK_ELEMENTS].sub_(flat_g[a : a + SGD_BLOCK_ELEMENTS] * lr)


class SeedOptimizer:
    """Plain SGD or Adam with a per-seed ``active`` mask.

    Parameters
    ----------
    params : tensors with ``requires_grad`` and the seed dimension first.
    kind : ``"sgd"`` or ``"adam"``.
    lr : learning rate.
    betas, eps : Adam's constants (torch defaults).
    """

    def __init__(
        self, params: list[Tensor], kind: str, lr: float,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    ) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {kind!r}; expected one of {OPTIMIZERS}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.params, self.kind, self.lr, self.betas, self.eps = list(params), kind, float(lr), betas, eps
        n_seeds = self.params[0].shape[0]
        self.steps = torch.zeros(n_seeds)
        if kind == "adam":
            self.m = [torch.zeros_like(p) for p in self.params]
            self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Tensor | None = None) -> None:
        """Update the seeds with ``active[s]`` (all if ``None``); others keep params and state."""
        n_seeds = self.params[0].shape[0]
        act = torch.ones(n_seeds, dtype=torch.bool) if active is None else active.to(torch.bool)
        if not bool(act.any()):
            return
        self.steps += act.float()
        all_active = bool(act.all())
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            shape = (n_seeds,) + (1,) * (p.ndim - 1)
            a = act.reshape(shape)
            g = p.grad
            if self.kind == "sgd":
                if all_active and p.is_contiguous() and g.is_contiguous():
                    _sgd_step_blocks(p, g, self.lr)
                else:
                    p.sub_(torch.where(a, self.lr * g, torch.zeros_like(g)))
                continue
            b1, b2 = self.betas
            m = torch.where(a, b1 * self.m[i] + (1 - b1) * g, self.m[i])
            v = torch.where(a, b2 * self.v[i] + (1 - b2) * g * g, self.v[i])
            self.m[i], self.v[i] = m, v
            t = self.steps.clamp(min=1).reshape(shape)
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            p.sub_(torch.where(a, self.lr * m_hat / (v_hat.sqrt() + self.eps), torch.zeros_like(p)))
