"""Resuming: the checkpoint ``resume_from`` names, whether this run may continue it (the
settings that ``TrainConfig`` marks as compared), and ``last/``'s save and load."""

from __future__ import annotations

import functools
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fastcse.training.checkpoints import (STATE_FILE, checkpoint_target, earlier_work, newest_checkpoint, run_dir_of,
                                          save_checkpoint)
from fastcse.training.config import EARLIER_SETTINGS, RESUME_SETTINGS, RunRefused, TrainConfig
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

    def __init__(self, model, tokenizer, optimizer, scheduler, settings: dict, record: dict, config: TrainConfig,
                 world: int, rank: int, queue: NegativeQueue | None = None):
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.settings, self.record, self.world, self.rank = settings, record, world, rank
        self.last_dir, self.keep = config.output_dir / "last", config.save_total_limit
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
        on_rank0(self.world, self.rank, functools.partial(save_checkpoint, keep=self.keep), self.last_dir, self.model,
                 self.tokenizer, dict(self.record, step=state.step), trainer_state)

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


def _describe_changes(old: dict, settings: dict, names: list[str]) -> str:
    def describe(name):
        text = f"{name} {old[name]!r} -> {settings[name]!r}"
        if name == "total_steps":
            why = [f"{k} {old[k]!r} -> {settings[k]!r}" for k in ("max_steps", "epochs")
                   if k in old and old[k] != settings[k]]
            text += f" ({', '.join(why)})" if why else ""
        return text

    return "; ".join(describe(name) for name in names)


def _check_resume_settings(saved: dict, settings: dict, choice: ResumeChoice, config: TrainConfig) -> None:
    """Refuses to continue a checkpoint with settings that change what the run computes, unless
    ``resume_override`` allows each of them (they are not in the optimizer state: before this
    check, a new max_steps, learning rate, temperature... silently changed the run mid-way or
    was overridden by the checkpoint's)."""
    old = saved.get("settings") or saved["config"]  # before the full record: mode, batch, seed, count, steps
    old = {**EARLIER_SETTINGS, **old}
    changed = [name for name in RESUME_SETTINGS if name in old and old[name] != settings[name]]
    override = config.resume_override
    refused = [] if override is True else [name for name in changed if name not in override]
    if refused:
        raise _settings_refusal(choice, saved["step"], _describe_changes(old, settings, refused), refused, config)
    if current_world()[0] == 0:
        if changed:
            logger.warning("resuming %s with changed settings (resume_override): %s", choice.folder,
                           _describe_changes(old, settings, changed))
        unchecked = [name for name in RESUME_SETTINGS if name not in old]
        if unchecked:
            logger.warning("%s predates the full settings record: %s could not be compared", choice.folder,
                           ", ".join(unchecked))


def _settings_refusal(choice: ResumeChoice, step: int, changes: str, refused: list[str],
                      config: TrainConfig) -> RunRefused:
    names = ",".join(refused)
    if choice.automatic:
        out = str(config.output_dir)
        return RunRefused(
            f"output_dir={out!r} holds an earlier run (checkpoint at step {step}) trained with other settings: "
            f"{changes}. Continue it with resume_from={out!r}, resume_override={refused!r}, or delete it and "
            "start over with overwrite_output_dir=True",
            f"{out} holds an earlier run (checkpoint at step {step}) trained with other settings: {changes}. "
            f"Continue it with --resume-from {shlex.quote(out)} --resume-override {names}, or delete it and start "
            "over with --overwrite-output-dir")
    folder = str(config.resume_from)  # as the user wrote it
    return RunRefused(
        f"resume_from={folder!r} was trained with other settings: {changes}. Resume with the run's settings, or "
        f"pass resume_override={refused!r} (or True) to continue with the new values",
        f"--resume-from {shlex.quote(folder)} was trained with other settings: {changes}. Resume with the run's "
        f"settings, or add --resume-override {names} (or all) to continue with the new values")


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


def load_resume(choice: ResumeChoice, settings: dict, config: TrainConfig) -> dict | None:
    """The trainer state of the checkpoint to continue (None: a fresh start), checked against
    this run before anything is written."""
    if choice.folder is None:
        return None
    saved = torch.load(choice.folder / STATE_FILE, weights_only=True)
    _check_resume_settings(saved, settings, choice, config)
    _check_carry(choice.folder, saved, config.output_dir)
    if choice.automatic and current_world()[0] == 0:
        done = " (it is complete: nothing is left to train)" if saved["step"] >= settings["total_steps"] else ""
        logger.warning("%s holds an earlier run of these settings, saved at step %d of %d: continuing it%s "
                       "(overwrite_output_dir=True / --overwrite-output-dir starts over instead)", config.output_dir,
                       saved["step"], settings["total_steps"], done)
    return saved


@dataclass(frozen=True)
class ResumeChoice:
    """The checkpoint a run continues (None: a fresh start), and whether it was found in the
    output_dir without ``resume_from`` (a rerun of the same command)."""

    folder: Path | None = None
    automatic: bool = False


def choose_checkpoint(config: TrainConfig, is_main: bool) -> ResumeChoice:
    """What the run continues. With ``resume_from``: the checkpoint it names. Without: the newest
    complete ``last`` of an earlier run in output_dir, continued if its settings match (checked
    by :func:`load_resume`). Refuses a start that would delete an earlier run's work unless
    ``overwrite_output_dir`` allows it."""
    output_dir = config.output_dir
    if config.resume_from is None:
        if config.overwrite_output_dir:
            return ResumeChoice()
        newest = newest_checkpoint(output_dir / "last", required=STATE_FILE)
        if newest is not None:
            return ResumeChoice(newest, automatic=True)
        _refuse_deleting(earlier_work(output_dir), output_dir, "cannot be resumed (no trainer state: a run with "
                         "save_last=False, or a best checkpoint alone)")
        return ResumeChoice()
    folder = checkpoint_to_resume(config.resume_from, output_dir, is_main)
    own = folder is None or run_dir_of(folder) == output_dir.resolve()
    if own and config.overwrite_output_dir and folder is not None:
        raise ValueError(f"resume_from={str(config.resume_from)!r} continues the run in output_dir, and "
                         "overwrite_output_dir=True would delete it: pass one of them")
    if not own and not config.overwrite_output_dir:
        _refuse_deleting(earlier_work(output_dir), output_dir, f"would be replaced by the run resumed from {folder}")
    return ResumeChoice(folder)


def _refuse_deleting(work: list[Path], output_dir: Path, why: str) -> None:
    if not work:
        return
    out, names = str(output_dir), ", ".join(sorted(folder.name for folder in work))
    raise RunRefused(
        f"output_dir={out!r} holds checkpoints of an earlier run ({names}) that {why}. Delete them with "
        "overwrite_output_dir=True, or choose another output_dir",
        f"{out} holds checkpoints of an earlier run ({names}) that {why}. Delete them with --overwrite-output-dir, "
        "or choose another --output-dir")


def checkpoint_to_resume(resume_from, output_dir: Path, is_main: bool) -> Path | None:
    """The checkpoint folder ``resume_from`` names, or None (a fresh start, noted when
    ``resume_from`` was given but holds no complete checkpoint yet)."""
    resume_folder = find_resume_checkpoint(resume_from, output_dir)
    if resume_from is not None and resume_folder is None and is_main:
        logger.warning("resume_from=%s holds no complete checkpoint yet (a new folder, or a run killed before its "
                       "first checkpoint): starting from the beginning", resume_from)
    return resume_folder
