"""Resuming: the checkpoint ``resume_from`` names, whether this run may continue it (the
settings that ``TrainConfig`` marks as compared), and ``last/``'s save and load."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fastcse.training.checkpoints import STATE_FILE, checkpoint_target, newest_checkpoint, run_dir_of, save_checkpoint
from fastcse.training.config import EARLIER_SETTINGS, RESUME_SETTINGS
from fastcse.training.ranks import current_world, on_rank0
from fastcse.training.step import NegativeQueue, apply_hyperparameters

logger = logging.getLogger("fastcse.train")


@dataclass
class RunState:
    """What a resumed run continues: the step, the evaluation history and its best."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


class Checkpointer:
    """``last/``: the model and everything :func:`train` needs to continue bit-identically (the
    optimizer, the schedule, the run state, every rank's dropout random streams, the negative
    queue, and the run's settings, which a resumed run must share)."""

    def __init__(self, model, tokenizer, optimizer, scheduler, settings: dict, record: dict, last_dir: Path,
                 world: int, rank: int, queue: NegativeQueue | None = None):
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.settings, self.record, self.last_dir, self.world, self.rank = settings, record, last_dir, world, rank
        self.device, self.queue = next(model.parameters()).device, queue
        # The short record that older checkpoints carry alone (read when "settings" is missing),
        # and the world size (another world size's random streams do not map onto these ranks).
        self.run_config = {key: settings[key] for key in ("mode", "batch_size", "seed", "num_examples", "total_steps")}
        self.run_config["world_size"] = world

    def save(self, state: RunState) -> None:
        rng_cpu = torch.get_rng_state()
        rng_cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        rng_ranks = None
        if self.world > 1:  # every rank's dropout streams, so that a resumed run continues each of them
            rng_ranks = [None] * self.world
            dist.all_gather_object(rng_ranks, (rng_cpu, [s.cpu() for s in rng_cuda]))
        trainer_state = {"config": self.run_config, "settings": self.settings, "step": state.step,
                         "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "best_metric": state.best_metric, "best_step": state.best_step, "history": state.history,
                         "rng_cpu": rng_cpu, "rng_cuda": rng_cuda}
        if rng_ranks is not None:
            trainer_state["rng_cpu_ranks"] = [r[0] for r in rng_ranks]
            trainer_state["rng_cuda_ranks"] = [r[1] for r in rng_ranks]
        if self.queue is not None:  # the same on every rank: rank 0's is the run's
            trainer_state["negative_queue"] = self.queue.state_dict()
        on_rank0(self.world, self.rank, save_checkpoint, self.last_dir, self.model, self.tokenizer,
                  dict(self.record, step=state.step), trainer_state)

    def resume(self, saved: dict, folder: Path, seed: int) -> RunState:
        """Loads ``folder``'s weights and ``saved`` (its trainer state, already checked against
        this run): optimizer, schedule (with this run's hyperparameters) and random streams."""
        from safetensors.torch import load_file

        weights = load_file(str(folder / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"resume_from weights do not fit the model: missing {missing}, unexpected {unexpected}")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        apply_hyperparameters(self.optimizer, self.scheduler, self.settings["learning_rate"],
                               self.settings["weight_decay"])
        state = RunState(saved["step"], saved["best_metric"], saved["best_step"], saved["history"])
        self._restore_random_streams(saved, state.step, seed)
        if self.queue is not None:
            self.queue.load_state_dict(saved.get("negative_queue"), self.device)
        if self.rank == 0:
            logger.info("resumed from %s at step %d", folder, state.step)
        return state

    def _restore_random_streams(self, saved: dict, step: int, seed: int) -> None:
        saved_world = saved["config"].get("world_size", 1)
        if saved_world != self.world:  # another world size's streams do not map onto these ranks
            torch.manual_seed(seed + self.rank + 1_000_003 * step)
            if self.rank == 0:
                logger.warning("resume_from was trained on %d process(es), this run has %d: the weights and the "
                               "data order continue, the dropout random streams restart", saved_world, self.world)
            return
        torch.set_rng_state(saved["rng_cpu_ranks"][self.rank] if "rng_cpu_ranks" in saved else saved["rng_cpu"])
        rng_cuda = saved["rng_cuda_ranks"][self.rank] if "rng_cuda_ranks" in saved else saved.get("rng_cuda")
        if rng_cuda and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng_cuda)


# --------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and whether this run may continue it


def find_resume_checkpoint(resume_from, output_dir: Path) -> Path | None:
    """The checkpoint ``resume_from`` names: a checkpoint folder (holding trainer_state.pt), or a
    run folder (or its ``last``), of which the newest complete ``last`` checkpoint is taken,
    whatever the moment a crash stopped that run. None when there is no checkpoint and
    ``resume_from`` is the output_dir: the same command run again after a kill before the first
    checkpoint, or on a new folder, starts from the beginning."""
    if resume_from is None:
        return None
    if not isinstance(resume_from, (str, os.PathLike)):
        raise TypeError(f"resume_from must be a path or None, got {resume_from!r}")
    folder = Path(resume_from)
    if folder.name == "last" and (folder.is_symlink() or not folder.exists()):
        folder = folder.parent  # "run/last": the run's newest checkpoint, not only the one its link shows
    if (folder / STATE_FILE).is_file():
        return folder
    newest = newest_checkpoint(folder / "last", required=STATE_FILE)
    if newest is not None:
        return newest
    if folder.resolve() == output_dir.resolve():
        return None
    raise FileNotFoundError(f"resume_from={str(resume_from)!r} holds no {STATE_FILE} and no complete 'last' "
                            "checkpoint: pass a checkpoint folder or the output_dir of a run")


def _check_resume_settings(saved: dict, settings: dict, override, folder: Path) -> None:
    """Refuses to continue a checkpoint with settings that change what the run computes, unless
    ``resume_override`` allows each of them (they are not in the optimizer state: before this
    check, a new max_steps, learning rate, temperature... silently changed the run mid-way or
    was overridden by the checkpoint's)."""
    old = saved.get("settings") or saved["config"]  # before the full record: mode, batch, seed, count, steps
    old = {**EARLIER_SETTINGS, **old}
    changed = [name for name in RESUME_SETTINGS if name in old and old[name] != settings[name]]

    def describe(name):
        text = f"{name} {old[name]!r} -> {settings[name]!r}"
        if name == "total_steps":
            why = [f"{k} {old[k]!r} -> {settings[k]!r}" for k in ("max_steps", "epochs")
                   if k in old and old[k] != settings[k]]
            text += f" ({', '.join(why)})" if why else ""
        return text

    refused = [] if override is True else [name for name in changed if name not in override]
    if refused:
        raise ValueError(f"resume_from={str(folder)!r} was trained with other settings: "
                         f"{'; '.join(describe(name) for name in refused)}. Resume with the run's settings, or pass "
                         f"resume_override={refused!r} (or True) to continue with the new values")
    if current_world()[0] == 0:
        if changed:
            logger.warning("resuming %s with changed settings (resume_override): %s", folder,
                           "; ".join(describe(name) for name in changed))
        unchecked = [name for name in RESUME_SETTINGS if name not in old]
        if unchecked:
            logger.warning("%s predates the full settings record: %s could not be compared", folder,
                           ", ".join(unchecked))


def _check_carry(folder: Path, saved: dict, output_dir: Path) -> None:
    """Resuming into another output_dir than the checkpoint's carries the run's best checkpoint
    along (:func:`_carry_run`); it must exist when the run evaluated."""
    source = run_dir_of(folder)
    if source == output_dir.resolve() or saved.get("best_step") is None:
        return
    if checkpoint_target(source / "best") is None:
        raise FileNotFoundError(
            f"resume_from={str(folder)!r} continues a run whose best checkpoint is step {saved['best_step']} "
            f"(metric {saved['best_metric']:.2f}), but {source / 'best'} does not exist: resuming into "
            f"output_dir={str(output_dir)!r} would report a best model that is not there. Resume into the run's own "
            f"folder ({str(source)!r}), or put its best checkpoint at {source / 'best'}")


def load_resume(folder: Path, settings: dict, override, output_dir: Path) -> dict:
    """The checkpoint's trainer state, checked against this run before anything is written."""
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    _check_resume_settings(saved, settings, override, folder)
    _check_carry(folder, saved, output_dir)
    return saved


def checkpoint_to_resume(resume_from, output_dir: Path, is_main: bool) -> Path | None:
    """The checkpoint folder ``resume_from`` names, or None (a fresh start, noted when
    ``resume_from`` was given but holds no complete checkpoint yet)."""
    resume_folder = find_resume_checkpoint(resume_from, output_dir)
    if resume_from is not None and resume_folder is None and is_main:
        logger.warning("resume_from=%s holds no complete checkpoint yet (a new folder, or a run killed before its "
                       "first checkpoint): starting from the beginning", resume_from)
    return resume_folder


