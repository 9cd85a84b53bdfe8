"""sentence-transformers training step: MNRL vs fastcse's InfoNCELoss, CachedMNRL vs the fastcse cached loss.

Run (saves the JSON the plot and table read)::

    nice pytest bench/test_bench_sentence_transformers.py --benchmark-json=bench/st.json
    python bench/plot_sentence_transformers.py bench/st.json   # docs/sentence_transformers_bench.png + table

The step is what SentenceTransformerTrainer does per batch minus data loading and the optimizer:
the loss's forward on pre-tokenized (anchor, positive, hard negative) NLI triples, then
``loss.backward()`` (for the cached losses, the backward hook replays the mini-batches). The
model is ``../shared/models/all-MiniLM-L6-v2`` in train mode (dropout on), the rows are the first
B triples of ``../shared/data/nli/snli-dev-triples.csv``: every loss sees the same inputs, and
the cached losses the same mini-batch size. Each case records, from its fastest round, the
process CPU seconds of a step (``cpu_s``) and triples per CPU second (``triples_per_cpu_s``),
the wall-clock triples per second (``triples_per_s``), and the extra peak RSS of one step in a
fresh process (``extra_peak_mib``: activations and gradients, not the model's weights).

Torch runs FASTCSE_BENCH_THREADS threads (default 1). On a machine shared with other jobs, wall
time is mostly the others' load, and 2 OpenMP threads of a niced process wait on each other
whenever one is descheduled; one thread's CPU time is what stays comparable across losses
then. On a quiet machine, ``FASTCSE_BENCH_THREADS=2`` and the wall-clock numbers are the
ones to quote.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK, pedantic_cpu_seconds

from fastcse.evaluation import shared_dir

pytest.importorskip("sentence_transformers")

SHARED = shared_dir()  # $FASTCSE_SHARED, else ../shared beside the checkout
MODEL = SHARED / "models" / "all-MiniLM-L6-v2"
NLI = SHARED / "data" / "nli" / "snli-dev-triples.csv"
LOSSES = ("mnrl", "fastcse", "cached_mnrl", "fastcse_cached")
# FASTCSE_BENCH_ST_BATCHES="32,64,128,256" overrides the batch sizes (triples per step).
BATCHES = [int(b) for b in os.environ["FASTCSE_BENCH_ST_BATCHES"].split(",")] \
    if os.environ.get("FASTCSE_BENCH_ST_BATCHES") else [8] if QUICK else [32, 64, 128]
MINI_BATCH = 4 if QUICK else 16
ROUNDS = 1 if QUICK else 3
THREADS = int(os.environ.get("FASTCSE_BENCH_THREADS", "1"))


def make_loss(name: str, model, mini_batch_size: int):
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                   MultipleNegativesRankingLoss)

    from fastcse.integrations.sentence_transformers import InfoNCELoss

    return {
        "mnrl": lambda: MultipleNegativesRankingLoss(model),
        "fastcse": lambda: InfoNCELoss(model),
        "cached_mnrl": lambda: CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
        # sort_by_length=False: CachedMNRL's own mini-batches, so the same seed draws the same
        # dropout masks and the first-loss check below holds (sorted chunks draw others).
        "fastcse_cached": lambda: InfoNCELoss(model, mini_batch_size=mini_batch_size, sort_by_length=False),
    }[name]()


def st_step(loss: str, batch: int, mini_batch_size: int = MINI_BATCH, model=None):
    """(setup, run) of one training step; ``model`` reuses an already loaded SentenceTransformer."""

    def setup():
        from sentence_transformers import SentenceTransformer

        st_model = copy.deepcopy(model) if model is not None else SentenceTransformer(str(MODEL), device="cpu")
        st_model.train()
        with open(NLI, newline="") as f:
            rows = [row for _, row in zip(range(batch), csv.DictReader(f))]
        features = [st_model.preprocess([row[key] for row in rows]) for key in ("sent0", "sent1", "hard_neg")]
        return st_model, make_loss(loss, st_model, mini_batch_size), features

    def run(state):
        st_model, loss_fn, features = state
        st_model.zero_grad(set_to_none=True)
        value = loss_fn([dict(f) for f in features], None)
        value.backward()
        return value.detach()

    return setup, run


_PEAK_CHILD = r"""
import json, sys
sys.path.insert(0, {bench_dir!r})
from test_bench_sentence_transformers import st_step

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

setup, run = st_step(**json.loads({kwargs!r}))
state = setup()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: loading the model is not the step's cost
before = status_kib("VmRSS")
run(state)
print(json.dumps({{"extra_peak_mib": (status_kib("VmHWM") - before) / 1024}}))
"""


def extra_peak_mib(**kwargs) -> float:
    """RSS growth (MiB) during one ``st_step(**kwargs)`` run, in a fresh process.

    Reads VmHWM, not ``ru_maxrss``: a child started by ``subprocess`` (vfork + exec) inherits
    its parent's ``ru_maxrss`` high-water mark, which would hide any step smaller than this
    pytest process (Linux folds the pre-exec memory map into the signal-level maximum).
    """
    code = _PEAK_CHILD.format(bench_dir=str(Path(__file__).resolve().parent), kwargs=json.dumps(kwargs))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed for {kwargs}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_mib"]


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield SentenceTransformer(str(MODEL), device="cpu")
    torch.set_num_threads(threads)


_FIRST_LOSS: dict[tuple[int, bool], float] = {}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("loss", LOSSES)
def test_st_training_step(benchmark, minilm, loss, batch):
    benchmark.group = f"B={batch} mini-batch={MINI_BATCH}"
    setup, run = st_step(loss, batch, model=minilm)
    state = setup()
    torch.manual_seed(0)
    first = run(state).item()  # warm-up
    # Same seed, same dropout masks: fastcse must give sentence-transformers' value (cached and
    # uncached differ: chunked forwards draw the masks in a different order).
    key = (batch, "cached" in loss)
    _FIRST_LOSS.setdefault(key, first)
    assert first == pytest.approx(_FIRST_LOSS[key], rel=1e-4), (loss, first, _FIRST_LOSS[key])
    cpu_seconds = pedantic_cpu_seconds(benchmark, run, state, ROUNDS)
    del state
    benchmark.extra_info.update(
        loss=loss, batch=batch, mini_batch_size=MINI_BATCH if "cached" in loss else None, threads=THREADS,
        cpu_s=round(min(cpu_seconds), 3), triples_per_cpu_s=round(batch / min(cpu_seconds), 2),
        triples_per_s=round(batch / benchmark.stats.stats.min, 2),
        extra_peak_mib=round(extra_peak_mib(loss=loss, batch=batch), 1),
        load_average=os.getloadavg()[0],
    )
