"""Supervised SimCSE in a plain PyTorch loop under DistributedDataParallel, with distributed negatives.

    torchrun --nproc_per_node=2 examples/ddp_loop.py --steps 100 --global-batch 128       # gloo on CPU
    torchrun --nproc_per_node=2 examples/ddp_loop.py --tiny --steps 10 --global-batch 16  # seconds

The recipe (see docs/design.md, "Distributed negatives: exact gradients"):

    loss = fastcse.info_nce(anchor, positive, negative, process_group=dist.group.WORLD)
    (loss * world_size).backward()

With ``process_group`` every rank scores its own anchors against the positives and negatives of
ALL ranks (the global batch), and ``loss`` is the global-batch loss on every rank. Each rank's
graph carries only its own rows, so its gradient is its share of the global one; DDP averages
gradients over ranks, hence ``* world_size`` to get back the single-process gradient of the
whole global batch. Run with ``--local-negatives`` for the plain alternative, each rank's
anchors against its own batch only (what DDP gives without fastcse's gather).

Each step takes the next ``--global-batch`` NLI triples; rank r trains on its contiguous share,
so the run is comparable with a single process on the same global batches. Rank 0 prints one
JSON line: the loss of every step (the global-batch loss; with --local-negatives, the mean of
the ranks' local losses).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

import fastcse
from fastcse.distributed import exit_worker
from fastcse.evaluation import shared_dir

SHARED = shared_dir()  # $FASTCSE_SHARED, else ../shared beside the checkout


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def build_encoder(model_path: Path, tiny: bool, dropout: float | None):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    overrides = {} if dropout is None else dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if tiny:  # a small random BERT with the real tokenizer: for tests and quick demos
        torch.manual_seed(0)  # every rank builds the same weights (DDP also broadcasts rank 0's)
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=128, **overrides)
        model = BertModel(config)
    else:
        model = AutoModel.from_pretrained(model_path, **overrides)
    # Mean pooling never uses BERT's [CLS] head: drop it, since parameters without a gradient
    # make DistributedDataParallel fail at the next step.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model, tokenizer


def read_triples(path: Path) -> list[tuple[str, str, str]]:
    with open(path, newline="") as f:
        return [(row["sent0"], row["sent1"], row["hard_neg"]) for row in csv.DictReader(f)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "nli" / "snli-dev-triples.csv")
    parser.add_argument("--tiny", action="store_true", help="train a small random BERT (the --model's tokenizer)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--global-batch", type=int, default=64, help="triples per step over all ranks")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="sgd makes each update proportional to the gradient (used to check the recipe)")
    parser.add_argument("--dropout", type=float, default=None, help="override the encoder's dropout")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--local-negatives", action="store_true",
                        help="no distributed negatives: each rank's anchors see only its own batch")
    parser.add_argument("--log-json", type=Path, default=None, help="rank 0 also writes the losses here")
    args = parser.parse_args(argv)

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world_size:
        raise SystemExit(f"--global-batch ({args.global_batch}) must be a multiple of the world size ({world_size})")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")

    encoder, tokenizer = build_encoder(args.model, args.tiny, args.dropout)
    model = DistributedDataParallel(encoder.to(device))
    optimizer = (torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD)(model.parameters(), lr=args.lr)
    triples = read_triples(args.data)
    local_batch = args.global_batch // world_size
    if args.steps * args.global_batch > len(triples):
        raise SystemExit(f"--steps x --global-batch = {args.steps * args.global_batch} triples, "
                         f"but {args.data} has {len(triples)}")

    losses = []
    model.train()
    for step in range(args.steps):
        start = step * args.global_batch + rank * local_batch
        rows = triples[start:start + local_batch]
        texts = [row[column] for column in range(3) for row in rows]  # anchors, positives, negatives
        batch = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length,
                          return_tensors="pt").to(device)
        embeddings = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        anchor, positive, negative = embeddings.chunk(3)
        if args.local_negatives:
            loss = fastcse.info_nce(anchor, positive, negative, temperature=args.temperature)
            loss.backward()  # DDP's average of per-rank gradients = gradient of the mean of local losses
            reported = loss.detach().clone()
            dist.all_reduce(reported)
            reported /= world_size
        else:
            loss = fastcse.info_nce(anchor, positive, negative, temperature=args.temperature,
                                    process_group=dist.group.WORLD)
            (loss * world_size).backward()  # undo DDP's averaging: see the module docstring
            reported = loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(reported.item())

    if rank == 0:
        print(json.dumps({"world_size": world_size, "local_negatives": args.local_negatives, "losses": losses}))
        if args.log_json is not None:
            args.log_json.write_text(json.dumps(losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_worker()  # not the interpreter's shutdown, which gloo's threads can abort: see its docstring
