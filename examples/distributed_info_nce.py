"""Distributed negatives under torchrun: supervised SimCSE on SNLI triples, 2 CPU ranks (gloo).

    pip install --no-build-isolation -e .        # builds fastcse._C
    torchrun --nproc_per_node=2 examples/distributed_info_nce.py

Each rank encodes its shard of the global batch (31 triples: 16 on rank 0, 15 on rank 1) and
calls ``info_nce(..., process_group=dist.group.WORLD)``: its anchors score the positives and
hard negatives of every rank. Rank 0 also runs the single-process loss on the whole batch with
a copy of the model and prints both; after the steps it prints how far the DDP-trained model is
from the single-process one, which shows the gradient recipe ``(loss * world).backward()``.
The encoder is deliberately tiny (hashed bag of words, EmbeddingBag + Linear) so this runs in
seconds; swap in any transformer encoder.
"""

from __future__ import annotations

import argparse
import copy
import csv
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastcse
from fastcse.distributed import exit_worker
from fastcse.evaluation import shared_dir

SHARED = shared_dir()  # $FASTCSE_SHARED, else ../shared beside the checkout
BUCKETS = 1 << 14


class BagOfWords(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(BUCKETS, dim, mode="mean")
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids, offsets):
        return self.proj(self.embed(ids, offsets))


def tokenize(sentences):
    """Hashed lower-cased words (crc32: the same ids in every process) as EmbeddingBag input."""
    ids, offsets = [], []
    for sentence in sentences:
        offsets.append(len(ids))
        ids.extend(zlib.crc32(word.encode()) % BUCKETS for word in sentence.lower().split())
    return torch.tensor(ids), torch.tensor(offsets)


def encode_triples(model, rows):
    """One forward for anchors, positives and hard negatives (DDP wants one forward per backward)."""
    texts = [r["sent0"] for r in rows] + [r["sent1"] for r in rows] + [r["hard_neg"] for r in rows]
    return model(*tokenize(texts)).split(len(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "data/nli/snli-dev-triples.csv")
    parser.add_argument("--batch-size", type=int, default=31, help="global batch (triples over all ranks)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--temperature", type=float, default=0.05)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
    model = BagOfWords(args.dim)
    single = copy.deepcopy(model) if rank == 0 else None
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    single_optimizer = torch.optim.SGD(single.parameters(), lr=args.lr) if rank == 0 else None
    with open(args.data, newline="") as f:
        triples = list(csv.DictReader(f))
    options = dict(temperature=args.temperature, hard_negative_weight=0.0)

    for step in range(args.steps):
        batch = triples[step * args.batch_size:(step + 1) * args.batch_size]
        shard = _shards(batch, world)[rank]
        anchor, positive, negative = encode_triples(ddp, shard)
        loss = fastcse.info_nce(anchor, positive, negative, process_group=dist.group.WORLD, **options)
        optimizer.zero_grad()
        # DDP averages gradients over ranks; each rank holds the gradient of its own rows, so
        # scaling by the world size makes the average the single-process gradient.
        (loss * world).backward()
        optimizer.step()
        if rank == 0:
            single_loss = fastcse.info_nce(*encode_triples(single, batch), **options)
            single_optimizer.zero_grad()
            single_loss.backward()
            single_optimizer.step()
            sizes = "+".join(str(len(s)) for s in _shards(batch, world))
            print(f"step {step}  batch {sizes}  distributed loss ({world} ranks) {loss.item():.7f}  "
                  f"single process {single_loss.item():.7f}")
    if rank == 0:
        gap = max((a - b).abs().max().item() for a, b in zip(ddp.module.parameters(), single.parameters()))
        print(f"after {args.steps} SGD steps: max |DDP parameter - single-process parameter| = {gap:.2e}")
    dist.destroy_process_group()


def _shards(batch, world):
    """Contiguous shards, the first ones one larger when the batch does not divide evenly."""
    base, extra = divmod(len(batch), world)
    shards, start = [], 0
    for r in range(world):
        size = base + (r < extra)
        shards.append(batch[start:start + size])
        start += size
    return shards


if __name__ == "__main__":
    main()
    exit_worker()  # not the interpreter's shutdown, which gloo's threads can abort: see its docstring
