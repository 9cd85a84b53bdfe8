"""STS evaluation during training (rank 0), keeping the best checkpoint."""

from __future__ import annotations

import logging
import time

from fastcse.evaluation import evaluate_loaded
from fastcse.training.checkpoints import METRICS_FILE, append_jsonl, save_checkpoint
from fastcse.training.config import TrainConfig
from fastcse.training.ranks import on_rank0
from fastcse.training.resume import RunState

logger = logging.getLogger("fastcse.train")


class Evaluator:
    """Evaluates on ``config.eval_data`` on rank 0, appends each result to the metrics file and
    saves ``best/`` when the metric improves."""

    def __init__(self, model, tokenizer, config: TrainConfig, record: dict, world: int, rank: int):
        self.model, self.tokenizer, self.record, self.world, self.rank = model, tokenizer, record, world, rank
        self.tasks, self.data_dir, self.eval_pooler = config.eval_data, config.data_dir, config.eval_pooler
        self.best_dir, self.metrics_path = config.output_dir / "best", config.output_dir / METRICS_FILE

    def __call__(self, state: RunState) -> float:
        """Evaluates at ``state.step``; updates ``state`` on every rank; returns the metric."""
        best_metric, best_step, history, metric = on_rank0(self.world, self.rank, self._evaluate, state)
        state.best_metric, state.best_step, state.history = best_metric, best_step, history
        return metric

    def _evaluate(self, state: RunState):
        t0 = time.perf_counter()
        scores = evaluate_loaded(self.model, self.tokenizer, self.tasks, data_dir=self.data_dir,
                                 pooler=self.eval_pooler)
        metric = scores.get("avg", next(iter(scores.values())))
        entry = {"step": state.step, "eval": scores, "metric": metric, "eval_seconds": time.perf_counter() - t0}
        history = state.history + [entry]
        append_jsonl(self.metrics_path, entry)
        best_metric, best_step = state.best_metric, state.best_step
        if best_metric is None or metric > best_metric:
            best_metric, best_step = metric, state.step
            save_checkpoint(self.best_dir, self.model, self.tokenizer,
                            dict(self.record, step=state.step, metric=metric, eval=scores))
        logger.info("step %d: %s = %.2f (best %.2f at step %d)", state.step, "+".join(self.tasks), metric,
                    best_metric, best_step)
        return best_metric, best_step, history, metric
