"""Guided false negatives in a sentence-transformers training step: CachedGISTEmbedLoss against
fastcse's ``InfoNCELoss(guide=..., mini_batch_size=...)``, on the CPU.

Run (the lead's measurement; a loaded machine gives meaningless numbers)::

    FASTCSE_BENCH_JSON=bench/gist.json nice pytest bench/test_bench_gist.py --benchmark-json=bench/gist_steps.json
    FASTCSE_BENCH_QUICK=1 pytest bench/test_bench_gist.py     # smoke test of this file only

Two measurements, both with the same model, the same guide and the same mini-batch size:

- ``test_gist_training_step``: the time of one step (the loss's forward on pre-tokenized
  (anchor, positive, hard negative) NLI triples, then ``loss.backward()``, whose hook replays
  the mini-batches), per batch size: process CPU seconds (``cpu_s``, comparable on a shared
  machine with one thread) and wall seconds, from the fastest of ROUNDS rounds.
- ``test_gist_largest_batch``: the largest batch whose step fits FASTCSE_BENCH_GIST_BUDGET_MIB
  of extra peak RSS (activations, embeddings, the loss's temporaries; not the weights),
  each probe one step in a fresh process (``bench/memory.py``): doubling from START_BATCH, then
  bisection to within 1/8 of the answer. CachedGISTEmbedLoss builds [m, N, d] products
  (``CosineSimilarity`` of broadcast rows) per mini-batch of m anchors against every candidate,
  for the model and for the guide; fastcse's loss holds O((B + N)(d + d_g)).

The model and the guide are both ``../shared/models/all-MiniLM-L6-v2`` (the only encoder there;
two separate copies, the guide in eval mode as loaded), the model in train mode. The fastcse
loss runs with ``sort_by_length=False`` (CachedGISTEmbedLoss's mini-batches, so the same seed
gives the same first loss, which the step test checks) and with the default sorting
(``fastcse_sorted``: fewer padded tokens, the same loss up to dropout draws).
"""

from __future__ import annotations

import copy
import csv
import os

import pytest
import torch
from conftest import QUICK, pedantic_cpu_seconds, save_summary
from memory import extra_peak_mib

from fastcse.evaluation import shared_dir

pytest.importorskip("sentence_transformers")

SHARED = shared_dir()  # $FASTCSE_SHARED, else ../shared beside the checkout
MODEL = SHARED / "models" / "all-MiniLM-L6-v2"
NLI = SHARED / "data" / "nli" / "snli-dev-triples.csv"
LOSSES = ("cached_gist", "fastcse", "fastcse_sorted")
# FASTCSE_BENCH_GIST_BATCHES="64,256,1024" overrides the timed batch sizes (triples per step).
BATCHES = [int(b) for b in os.environ["FASTCSE_BENCH_GIST_BATCHES"].split(",")] \
    if os.environ.get("FASTCSE_BENCH_GIST_BATCHES") else [8] if QUICK else [64, 256, 1024]
MINI_BATCH = 4 if QUICK else 32
ROUNDS = 1 if QUICK else 3
THREADS = int(os.environ.get("FASTCSE_BENCH_THREADS", "1"))
# The extra peak includes what every loss pays alike: the parameters' gradients (~90 MiB for
# MiniLM-L6) and the mini-batches' activations. The smoke test's budget is never reached (its
# search stops at the cap); test_search_finds_the_boundary checks the bisection.
BUDGET_MIB = float(os.environ.get("FASTCSE_BENCH_GIST_BUDGET_MIB", "1e9" if QUICK else "4096"))
START_BATCH = 8 if QUICK else 256
# The search's cap (NLI rows repeat past the file's 2943); FASTCSE_BENCH_GIST_MAX_BATCH lowers it
# where a probe at 65536 triples (196k sentences encoded twice on a CPU) would take too long.
MAX_BATCH = 16 if QUICK else int(os.environ.get("FASTCSE_BENCH_GIST_MAX_BATCH", "65536"))
# GISTEmbedLoss's defaults otherwise (temperature 0.01, both contrasts); a margin that filters.
MARGIN = 0.05


def make_loss(name: str, model, guide, mini_batch_size: int):
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss

    from fastcse.integrations.sentence_transformers import InfoNCELoss

    return {
        "cached_gist": lambda: CachedGISTEmbedLoss(model, guide, mini_batch_size=mini_batch_size, margin=MARGIN),
        "fastcse": lambda: InfoNCELoss(model, guide=guide, mini_batch_size=mini_batch_size, margin=MARGIN,
                                       sort_by_length=False),
        "fastcse_sorted": lambda: InfoNCELoss(model, guide=guide, mini_batch_size=mini_batch_size, margin=MARGIN),
    }[name]()


def nli_columns(batch: int) -> list[list[str]]:
    """(anchor, positive, hard negative) of the first ``batch`` NLI triples, cycling past the file's end."""
    with open(NLI, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [rows[i % len(rows)] for i in range(batch)]
    return [[row[key] for row in rows] for key in ("sent0", "sent1", "hard_neg")]


def gist_step(loss: str, batch: int, mini_batch_size: int = MINI_BATCH, models=None):
    """(setup, run) of one training step; ``models`` reuses an already loaded (model, guide)."""

    def setup():
        from sentence_transformers import SentenceTransformer

        if models is not None:
            model, guide = copy.deepcopy(models[0]), models[1]
        else:
            model, guide = (SentenceTransformer(str(MODEL), device="cpu") for _ in range(2))
        model.train()
        features = [model.preprocess(column) for column in nli_columns(batch)]
        return model, make_loss(loss, model, guide, mini_batch_size), features

    def run(state):
        model, loss_fn, features = state
        model.zero_grad(set_to_none=True)
        value = loss_fn([dict(f) for f in features], None)
        value.backward()
        return value.detach()

    return setup, run


def fits(loss: str, batch: int) -> tuple[bool, float]:
    """(whether one step at ``batch`` stays within the budget, its extra peak MiB), in a fresh process."""
    peak = extra_peak_mib("test_bench_gist", "gist_step", loss=loss, batch=batch, mini_batch_size=MINI_BATCH)
    return peak <= BUDGET_MIB, peak


def largest_batch(fits_at, start: int = START_BATCH, cap: int = MAX_BATCH) -> tuple[int, list[dict]]:
    """The largest batch b <= cap with ``fits_at(b)`` -> (fits, extra peak MiB) true (0 if none
    from 1 up does), assuming memory grows with the batch, and every probe made: doubling from
    ``start``, then bisection until the gap is within 1/8 of the answer."""
    probes = []

    def probe(batch):
        ok, peak = fits_at(batch)
        probes.append(dict(batch=batch, extra_peak_mib=round(peak, 1), fits=ok))
        return ok

    low, high = 0, start
    while high <= cap and probe(high):
        low, high = high, 2 * high
    if high > cap:
        return low, probes
    while high - low > max(1, low // 8):  # low fits (or is 0), high does not
        middle = (low + high) // 2
        low, high = (middle, high) if probe(middle) else (low, middle)
    return low, probes


def test_search_finds_the_boundary():
    def fits_below(limit):
        return lambda batch: (batch <= limit, float(batch))

    assert largest_batch(fits_below(100), start=8, cap=1000)[0] in range(89, 101)
    assert largest_batch(fits_below(5), start=8, cap=1000)[0] == 5
    assert largest_batch(fits_below(0), start=8, cap=1000)[0] == 0
    assert largest_batch(fits_below(10**6), start=8, cap=100)[0] == 64


@pytest.fixture(scope="module")
def minilm_pair():
    from sentence_transformers import SentenceTransformer

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield SentenceTransformer(str(MODEL), device="cpu"), SentenceTransformer(str(MODEL), device="cpu")
    torch.set_num_threads(threads)


_FIRST_LOSS: dict[int, float] = {}
_SUMMARY: list[dict] = []


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("loss", LOSSES)
def test_gist_training_step(benchmark, minilm_pair, loss, batch):
    benchmark.group = f"GIST B={batch} mini-batch={MINI_BATCH}"
    setup, run = gist_step(loss, batch, models=minilm_pair)
    state = setup()
    torch.manual_seed(0)
    first = run(state).item()  # warm-up
    if loss != "fastcse_sorted":  # the same mini-batches and seed: the same dropout, the same loss
        _FIRST_LOSS.setdefault(batch, first)
        assert first == pytest.approx(_FIRST_LOSS[batch], rel=1e-4), (loss, first, _FIRST_LOSS[batch])
    cpu_seconds = pedantic_cpu_seconds(benchmark, run, state, ROUNDS)
    row = dict(loss=loss, batch=batch, mini_batch_size=MINI_BATCH, threads=THREADS,
               cpu_s=round(min(cpu_seconds), 3), wall_s=round(benchmark.stats.stats.min, 3),
               load_average=os.getloadavg()[0])
    benchmark.extra_info.update(row)
    _SUMMARY.append(dict(measure="step", **row))
    save_summary(_SUMMARY)


@pytest.mark.parametrize("loss", LOSSES)
def test_gist_largest_batch(loss):
    batch, probes = largest_batch(lambda b: fits(loss, b))
    assert probes and batch >= 0
    _SUMMARY.append(dict(measure="largest_batch", loss=loss, budget_mib=BUDGET_MIB, mini_batch_size=MINI_BATCH,
                         largest_batch=batch, capped=2 * batch > MAX_BATCH and probes[-1]["fits"],
                         probes=probes))
    save_summary(_SUMMARY)
