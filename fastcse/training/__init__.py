"""The trainer behind ``fastcse.train``, as a package:

- ``config``: :class:`TrainConfig`, every setting of a run and which of them a resumed run must match;
- ``batches``: the data order, each step's tokens and rows;
- ``step``: one step's loss and gradients, the negative queue, the optimizer;
- ``checkpoints``: atomic versioned checkpoints, their recovery after a kill, the metrics file;
- ``lock``: one run per output folder;
- ``resume``: which checkpoint a run continues, and whether it may;
- ``model``, ``ranks``, ``evaluator``: the encoder, the multi-process helpers, evaluation during training;
- ``loop``: :func:`train` and its training loop.
"""

from fastcse.training.checkpoints import save_checkpoint, write_sentence_transformers_files
from fastcse.training.config import RESUME_SETTINGS, TrainConfig
from fastcse.training.lock import OutputDirInUse, RunLock
from fastcse.training.loop import TrainResult, train
from fastcse.training.model import build_bert_from_scratch, init_fresh_mlp_head

__all__ = ["train", "TrainConfig", "TrainResult", "RESUME_SETTINGS", "build_bert_from_scratch", "save_checkpoint",
           "write_sentence_transformers_files", "OutputDirInUse", "RunLock", "init_fresh_mlp_head"]
