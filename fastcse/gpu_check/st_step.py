"""The st_step section: a sentence-transformers training step (forward + backward, no optimizer)
on a random-weight MiniLM-L6 (no hub, no checkpoint on the GPU machine): MultipleNegativesRankingLoss
and CachedMultipleNegativesRankingLoss against fastcse's InfoNCELoss, first the same loss and
gradients with dropout off, then the time and peak memory of each."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from fastcse import testing
from fastcse.gpu_check.results import Outcome, Skip
from fastcse.gpu_check.speed import extra_peak_bytes, median_seconds

# all-MiniLM-L6-v2's architecture, with random weights (no hub, no checkpoint on the GPU machine).
MINILM_L6 = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
ST_BATCH = {"quick": 1024, "full": 1024}
ST_MINI_BATCH = 128
ST_LOSSES = ("mnrl", "fastcse", "cached_mnrl", "fastcse_cached")
# (fastcse's loss, sentence-transformers' counterpart): same batch, dropout off, same values and gradients.
ST_PAIRS = (("fastcse", "mnrl"), ("fastcse_cached", "cached_mnrl"))
# The step's gradients pass through six layers whose fp32 sums run in other orders: looser than the loss's.
ST_GRAD_TOL = 1e-3


def _sentence_transformers_modules():
    """The classes, importable on sentence-transformers 6.0 and later (losses moved under sentence_transformer/)."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                       MultipleNegativesRankingLoss)
    except ImportError:
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
    from fastcse.integrations.sentence_transformers import InfoNCELoss

    return SentenceTransformer, MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss, InfoNCELoss


def write_random_model_folder(tokenizer_dir: Path, folder: Path, sizes: dict, seed: int = 0,
                              max_seq_length: int = 64) -> None:
    """A SentenceTransformer folder as all-MiniLM-L6-v2's (Transformer at the root, mean Pooling in
    1_Pooling/): a BertModel of ``sizes`` with random weights and the given tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line per section in the log, not bars
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **sizes)
    BertModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": sizes["hidden_size"], "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def random_sentences(vocab: Iterable[str], count: int, seed: int, words: tuple[int, int] = (6, 24)) -> list[str]:
    """Sentences of whole vocabulary words (no data set on the GPU machine), lengths spread like NLI's."""
    import random

    words_list = sorted(w for w in vocab if w.isascii() and w.isalpha())
    rng = random.Random(seed)
    return [" ".join(rng.choices(words_list, k=rng.randint(*words))) for _ in range(count)]


@dataclass
class StBench:
    """A model, its tokenized (anchor, positive, hard negative) columns, and the losses over it."""

    model: object
    features: list[dict]
    losses: dict[str, object]

    def step(self, name: str) -> torch.Tensor:
        """One training step minus the optimizer: the loss's forward and backward."""
        self.model.zero_grad(set_to_none=True)
        loss = self.losses[name]([dict(f) for f in self.features], None)
        loss.backward()
        return loss.detach()

    def embedding_grad(self) -> torch.Tensor:
        weight = next(p for n, p in self.model.named_parameters() if n.endswith("word_embeddings.weight"))
        return weight.grad.detach().clone()


def build_st_bench(tokenizer_dir: Path, folder: Path, sizes: dict, batch: int, mini_batch: int,
                   device: torch.device) -> StBench:
    SentenceTransformer, MNRL, CachedMNRL, InfoNCELoss = _sentence_transformers_modules()
    write_random_model_folder(tokenizer_dir, folder, sizes)
    model = SentenceTransformer(str(folder), device=str(device))
    vocab = model.tokenizer.get_vocab()
    preprocess = getattr(model, "preprocess", None) or model.tokenize  # 6.x name, older name
    features = []
    for column in range(3):
        tokens = preprocess(random_sentences(vocab, batch, seed=column))
        features.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()})
    losses = {"mnrl": MNRL(model), "fastcse": InfoNCELoss(model),
              "cached_mnrl": CachedMNRL(model, mini_batch_size=mini_batch),
              "fastcse_cached": InfoNCELoss(model, mini_batch_size=mini_batch)}
    return StBench(model, features, losses)


def check_st_agreement(bench: StBench, ours: str, theirs: str) -> Outcome:
    """Dropout off, the same batch: fastcse's loss and the word-embedding gradient equal sentence-transformers'."""
    bench.model.eval()
    try:
        loss_theirs, grad_theirs = bench.step(theirs), bench.embedding_grad()
        loss_ours, grad_ours = bench.step(ours), bench.embedding_grad()
    finally:
        bench.model.train()
    loss_tol = testing.TOL[torch.float32]
    loss = testing.agreement(loss_ours, loss_theirs.double(), loss_tol, floor=1.0)
    grad = testing.agreement(grad_ours, grad_theirs.double(), ST_GRAD_TOL)
    reasons = [testing.agreement_reason(n, r, t) for n, r, t in (("loss", loss, loss_tol),
                                                                 ("d word embeddings", grad, ST_GRAD_TOL)) if not r.ok]
    return Outcome(not reasons, {"loss": float(loss_ours), "loss_error": loss.error, "worst_grad": "word_embeddings",
                                 "worst_grad_error": grad.error, "tol": loss_tol}, "; ".join(reasons))


def measure_st_step(bench: StBench, name: str, device: torch.device, mini_batch: int) -> Outcome:
    """Train mode (dropout on): median step time and the step's extra peak memory."""
    bench.model.train()
    seconds, reps = median_seconds(lambda: bench.step(name), device, warmup=1, target_s=1.0, reps=(3, 5))
    bench.model.zero_grad(set_to_none=True)  # the parameters' gradients are part of the step's peak
    peak = extra_peak_bytes(lambda: bench.step(name), device)
    bench.model.zero_grad(set_to_none=True)
    rows = len(bench.features[0]["input_ids"])
    return Outcome(True, {"loss_name": name, "mini_batch": mini_batch if "cached" in name else None,
                          "batch": rows, "ms": seconds * 1e3, "reps": reps,
                          "peak_mib": peak / 2**20 if peak is not None else None})


def st_step_plan(tokenizer_dir: Path, scratch: Path, sizes: dict, batch: int, mini_batch: int):
    """(name, case) pairs sharing one bench, built by the first case that runs."""
    built: dict[str, object] = {}

    def bench(device):
        if "error" in built:  # a bench that could not be built is not retried by every case
            raise built["error"]
        if "bench" not in built:
            try:
                _st_preconditions(tokenizer_dir)
                built["bench"] = build_st_bench(tokenizer_dir, scratch / "minilm-random", sizes, batch, mini_batch,
                                                device)
            except Exception as error:
                built["error"] = error
                raise
        return built["bench"]

    def agreement_case(ours, theirs, device):
        return check_st_agreement(bench(device), ours, theirs)

    def timing_case(name, device):
        return measure_st_step(bench(device), name, device, mini_batch)

    planned = [(f"agrees/{ours}-vs-{theirs}", partial(agreement_case, ours, theirs)) for ours, theirs in ST_PAIRS]
    planned += [(f"time/{name}", partial(timing_case, name)) for name in ST_LOSSES]
    return planned


def _st_preconditions(tokenizer_dir: Path) -> None:
    for module in ("sentence_transformers", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise Skip(f"{module} is not installed on this machine")
    if not (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        raise Skip(f"no tokenizer in {tokenizer_dir}: run `bash scripts/fetch_gpu_wheels.sh` (it copies MiniLM's "
                   f"tokenizer into .gpu_kit/tokenizer) and carry .gpu_kit along")


# ============================================================================================
