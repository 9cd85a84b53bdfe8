"""STS evaluation during training (rank 0), keeping the best checkpoint."""

from __future__ import annotations

import logging
import time

from fastcse.evaluation import evaluate_loaded, truncated_key
from fastcse.training.checkpoints import METRICS_FILE, append_jsonl, save_checkpoint
from fastcse.training.config import TrainConfig
from fastcse.training.ranks import on_rank0
from fastcse.training.resume import RunState

logger = logging.getLogger("fastcse.train")


class Evaluator:
    """Evaluates on ``config.eval_data`` on rank 0 (at the full dimension and, for a Matryoshka
    run, at each of its dimensions), appends each result to the metrics file and saves ``best/``
    when the metric improves: ``config.metric_for_best``, else the full dimension's score (the
    tasks' mean when there are several)."""

    def __init__(self, model, tokenizer, config: TrainConfig, record: dict, world: int, rank: int):
        self.model, self.tokenizer, self.record, self.world, self.rank = model, tokenizer, record, world, rank
        self.tasks, self.data_dir, self.eval_pooler = config.eval_data, config.data_dir, config.eval_pooler
        # widest first, as a Matryoshka ladder is read (768, 512, 256, ...)
        self.truncate_dims = sorted(config.matryoshka_dims or (), reverse=True)
        self.metric_for_best = config.metric_for_best
        self.best_dir, self.metrics_path = config.output_dir / "best", config.output_dir / METRICS_FILE

    def __call__(self, state: RunState) -> float:
        """Evaluates at ``state.step``; updates ``state`` on every rank; returns the metric."""
        best_metric, best_step, history, metric = on_rank0(self.world, self.rank, self._evaluate, state)
        state.best_metric, state.best_step, state.history = best_metric, best_step, history
        return metric

    def _evaluate(self, state: RunState):
        t0 = time.perf_counter()
        scores = evaluate_loaded(self.model, self.tokenizer, self.tasks, data_dir=self.data_dir,
                                 pooler=self.eval_pooler, truncate_dims=self.truncate_dims)
        metric_name = self.metric_for_best or ("avg" if "avg" in scores else next(iter(scores)))
        metric = scores[metric_name]
        entry = {"step": state.step, "eval": scores, "metric": metric, "eval_seconds": time.perf_counter() - t0}
        history = state.history + [entry]
        append_jsonl(self.metrics_path, entry)
        best_metric, best_step = state.best_metric, state.best_step
        if best_metric is None or metric > best_metric:
            best_metric, best_step = metric, state.step
            save_checkpoint(self.best_dir, self.model, self.tokenizer,
                            dict(self.record, step=state.step, metric=metric, eval=scores))
        logger.info("step %d: %s = %.2f (best %.2f at step %d)%s", state.step,
                    self.metric_for_best or "+".join(self.tasks), metric, best_metric, best_step,
                    "".join(f", @{m}: {scores[truncated_key(metric_name.split('@')[0], m)]:.2f}"
                            for m in self.truncate_dims))
        return best_metric, best_step, history, metric
