"""Supervised SimCSE with ``fastcse.info_nce`` inside a ``transformers.Trainer``.

The one fastcse-specific piece is ``compute_loss``: embed (anchor, positive, hard negative),
call ``fastcse.info_nce``. Everything else is the stock Trainer.

    python examples/hf_trainer.py --max-steps 200 --batch-size 64          # all-MiniLM-L6-v2
    python examples/hf_trainer.py --tiny --max-steps 20 --batch-size 16    # small random BERT, seconds

Data: the NLI triples ``sent0,sent1,hard_neg`` under ``$FASTCSE_SHARED`` (default ``../shared``
beside the project root). Prints one JSON line: the training loss of every step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, Trainer, TrainingArguments

import fastcse
from fastcse.evaluation import shared_dir

SHARED = shared_dir()  # $FASTCSE_SHARED, else ../shared beside the checkout
COLUMNS = ("sent0", "sent1", "hard_neg")  # anchor, positive, hard negative


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TripleCollator:
    """Tokenizes a batch of triples as ONE batch (anchors, then positives, then negatives), so
    the encoder runs a single forward per step."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        texts = [row[column] for column in COLUMNS for row in rows]
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))


class InfoNCETrainer(Trainer):
    def __init__(self, *args, temperature: float = 0.05, hard_negative_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.hard_negative_weight = hard_negative_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        embeddings = mean_pool(output.last_hidden_state, inputs["attention_mask"])
        anchor, positive, negative = embeddings.chunk(len(COLUMNS))
        loss = fastcse.info_nce(anchor, positive, negative, temperature=self.temperature,
                                hard_negative_weight=self.hard_negative_weight)
        return (loss, {}) if return_outputs else loss


def build_encoder(model_path: Path, tiny: bool):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tiny:  # a small random BERT with the real tokenizer: for tests and quick demos
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, max_position_embeddings=128)
        model = BertModel(config)
    else:
        model = AutoModel.from_pretrained(model_path)
    # Mean pooling never uses BERT's [CLS] head: drop it, since parameters without a gradient
    # make DistributedDataParallel fail at the next step.
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model, tokenizer


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "nli" / "snli-dev-triples.csv")
    parser.add_argument("--tiny", action="store_true", help="train a small random BERT (the --model's tokenizer)")
    parser.add_argument("--rows", type=int, default=None, help="use the first ROWS triples")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--hard-negative-weight", type=float, default=0.0)
    parser.add_argument("--output-dir", type=Path, default=None, help="save the trained encoder here")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model, tokenizer = build_encoder(args.model, args.tiny)
    dataset = load_dataset("csv", data_files=str(args.data), split="train")
    if args.rows is not None:
        dataset = dataset.select(range(min(args.rows, len(dataset))))

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=str(args.output_dir or scratch), max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size, learning_rate=args.lr, logging_steps=1,
            save_strategy="no", report_to=[], seed=args.seed, disable_tqdm=True,
            dataloader_drop_last=True,  # in-batch negatives: keep every batch full
            remove_unused_columns=False,  # the collator reads the text columns
        )
        trainer = InfoNCETrainer(model=model, args=training_args, train_dataset=dataset,
                                 data_collator=TripleCollator(tokenizer, args.max_length),
                                 temperature=args.temperature, hard_negative_weight=args.hard_negative_weight)
        trainer.train()
    if args.output_dir is not None:
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"losses": losses}))
    return losses


if __name__ == "__main__":
    main()
