"""Gradient caching (GradCache, Gao et al. 2021): an effective contrastive batch larger than
what one forward with graph fits in memory, with the gradients of the full batch.

1. Encode each mini-batch chunk without graph, saving the RNG state before it.
2. Concatenate the embeddings, compute the loss once over the whole batch and back-propagate to
   the embeddings: their gradient is the cache.
3. Re-encode each chunk with graph from its saved RNG state and back-propagate its slice of the
   cache; the parameter gradients accumulate.

Restoring the RNG state makes the replay draw the dropout masks of the first pass. For
unsupervised SimCSE the dropout *is* the augmentation (both views of a sentence are in the same
forward), so without it the replayed embeddings would not be the ones the loss was computed on.

Memory: activations of one chunk at a time, plus the [B, views, d] embeddings. Time: one extra
forward per chunk (the no-graph pass).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class RandomState:
    """A snapshot of the RNG streams a forward pass draws dropout from: the CPU generator and,
    when CUDA tensors are involved, the CUDA generators of the given devices."""

    def __init__(self, cuda_devices: Sequence[torch.device | int] = ()):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


def cuda_devices_of(module: torch.nn.Module) -> list[torch.device]:
    return sorted({p.device for p in module.parameters() if p.device.type == "cuda"}, key=str)


Encode = Callable[[Any], torch.Tensor]
LossFn = Callable[[torch.Tensor], torch.Tensor]


def uncached_step(encode: Encode, chunks: Sequence[Any], loss_fn: LossFn) -> torch.Tensor:
    """Encodes the chunks in order with graph, computes the loss on their concatenation and
    back-propagates. One chunk is the plain full-batch step. Returns the detached loss."""
    embeddings = torch.cat([encode(chunk) for chunk in chunks])
    loss = loss_fn(embeddings)
    loss.backward()
    return loss.detach()


def cached_step(encode: Encode, chunks: Sequence[Any], loss_fn: LossFn, *,
                cuda_devices: Sequence[torch.device | int] = ()) -> torch.Tensor:
    """The gradients of :func:`uncached_step` over the same chunks, with the activations of one
    chunk alive at a time. ``encode(chunk)`` must return embeddings whose first dim indexes the
    chunk's examples; ``loss_fn`` takes their concatenation. Returns the detached loss.

    Draws the same random numbers as :func:`uncached_step` and leaves the generators where
    it would, so a cached run and an uncached one stay in step.
    """
    if len(chunks) == 0:
        raise ValueError("chunks must hold at least one mini-batch")
    states, pieces = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandomState(cuda_devices))
            pieces.append(encode(chunk))
    embeddings = torch.cat(pieces).detach().requires_grad_()
    loss = loss_fn(embeddings)
    loss.backward()
    cache = embeddings.grad.split([p.shape[0] for p in pieces])
    del pieces, embeddings
    for chunk, state, grad in zip(chunks, states, cache):
        state.restore()
        replayed = encode(chunk)
        # Same as (replayed * grad).sum().backward(): the chain rule through the cached dL/de.
        replayed.backward(grad)
    return loss.detach()


def split_chunks(items: Sequence[Any], mini_batch_size: int | None) -> list[Sequence[Any]]:
    """Consecutive chunks of at most ``mini_batch_size`` items (all of them if None)."""
    if mini_batch_size is None or mini_batch_size >= len(items):
        return [items]
    return [items[i:i + mini_batch_size] for i in range(0, len(items), mini_batch_size)]
