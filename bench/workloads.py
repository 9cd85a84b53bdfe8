"""The workloads the loss benchmarks time and measure: each factory returns (setup, run).

- floor: the three matrix products no InfoNCE can avoid (scores, and the two gradient
  products: 6 B N d FLOPs), on preallocated inputs: the physical floor on this machine.
- fastcse: fastcse.info_nce forward + backward.
- plain: the plain PyTorch loss (F.normalize, matmul, F.cross_entropy) forward + backward,
  i.e. fastcse.info_nce_reference.
"""

from __future__ import annotations

import torch

import fastcse


def _inputs(batch: int, dim: int, num_neg: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=gen).requires_grad_()
    positive = torch.randn(batch, dim, generator=gen).requires_grad_()
    negative = torch.randn(batch, num_neg, dim, generator=gen).requires_grad_() if num_neg else None
    return anchor, positive, negative


def zero_grads(tensors):
    for t in tensors:
        if t is not None:
            t.grad = None


def random_triplets(batch: int, dim: int, seed: int = 0):
    """anchor, positive, one hard negative per anchor: [B, d] each, leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=gen).requires_grad_() for _ in range(3)]


def backward_step(loss_of):
    """A workload's run step: clears the inputs' gradients, then ``loss_of(*state)`` forward and
    backward; returns the loss (the memory probe reports its value)."""

    def run(state):
        zero_grads(state)
        loss = loss_of(*state)
        loss.backward()
        return loss

    return run


def floor(batch: int, dim: int, num_neg: int):
    candidates = batch * (1 + num_neg)

    def setup():
        gen = torch.Generator().manual_seed(0)
        return torch.randn(batch, dim, generator=gen), torch.randn(candidates, dim, generator=gen)

    def run(state):
        a, c = state
        scores = a @ c.T
        grad_a = scores @ c
        grad_c = scores.T @ a
        return grad_a, grad_c

    return setup, run


def _loss(fn, batch, dim, num_neg):
    def setup():
        return _inputs(batch, dim, num_neg)

    return setup, backward_step(fn)


def fastcse_loss(batch: int, dim: int, num_neg: int):
    return _loss(fastcse.info_nce, batch, dim, num_neg)


def plain_loss(batch: int, dim: int, num_neg: int):
    return _loss(fastcse.info_nce_reference, batch, dim, num_neg)


FACTORIES = {"floor": floor, "fastcse": fastcse_loss, "plain": plain_loss}
