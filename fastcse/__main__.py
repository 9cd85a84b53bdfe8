"""Command line: ``python -m fastcse {demo,train,eval} --help``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from fastcse.encoding import ENCODINGS
from fastcse.false_negatives import MARGIN_STRATEGIES
from fastcse.pooling import POOLERS
from fastcse.training.config import DEFAULT_EPOCHS, DEFAULT_LR, MLP_INITS, MODES, PRECISIONS, TrainConfig
from fastcse.training.ranks import several_torchrun_workers

DEFAULTS = TrainConfig()  # the CLI's defaults are the API's

# The demo: unsupervised SimCSE with the paper's settings (cls pooler with the MLP head while
# training, [CLS] at evaluation, batch 64, lr 3e-5, temperature 0.05, max length 32) on
# all-MiniLM-L6-v2 and the bundled unlabelled sentences. MiniLM was trained for mean pooling; its
# [CLS] vector is a weaker sentence embedding (STS-B dev 79.7 vs 86.7 for mean pooling), and
# SimCSE turns it into a good one within a few dozen steps: a real gain that fits in about 5
# minutes on 2 CPU cores (README: 5.1 min). (A from-scratch BERT does not learn semantics from dropout views alone at this
# scale: see scripts/quality_runs.py.)
DEMO = {"batch_size": 64, "max_steps": 100, "eval_steps": 25}


def positive_int(text: str) -> int:
    """argparse type: sizes and counts, refused at parse time rather than deep inside training."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a size where 0 means off (e.g. --negative-queue-size)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (a NaN or infinite weight would turn every loss into NaN)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def torch_device(text: str) -> str:
    """argparse type: a device string torch knows and this machine has (checked before any loading)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: expected cpu, cuda or cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch "
                                             f"{torch.__version__}); use --device cpu or leave it out")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device{'s' * (count != 1)}"
                                             f" (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: expected cpu, cuda or cuda:N, mps")
    return text


def _shared(args) -> Path:
    from fastcse.evaluation import shared_dir

    return Path(args.shared) if args.shared else shared_dir()


def _add_common(p):
    p.add_argument("--shared", help="the shared data/models folder (default: $FASTCSE_SHARED or ../shared "
                                    "beside the project root)")
    p.add_argument("--data-dir", help="folder holding SentEval/ (default: <shared>/data)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and the traceback of an error (else one line)")


def _add_train_options(p, demo: bool):
    p.add_argument("--output-dir", default="runs/demo" if demo else DEFAULTS.output_dir,
                   help="where best/, last/ and metrics.jsonl go (default: %(default)s)")
    p.add_argument("--max-steps", type=positive_int, default=DEMO["max_steps"] if demo else None,
                   help="optimizer steps (default: %(default)s)" if demo else "optimizer steps (overrides --epochs)")
    p.add_argument("--eval-steps", type=positive_int, default=DEMO["eval_steps"] if demo else DEFAULTS.eval_steps,
                   help="evaluate on STS-B dev every N steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=DEMO["batch_size"] if demo else DEFAULTS.batch_size,
                   help="contrastive batch: the in-batch negatives (default: %(default)s)")
    p.add_argument("--mini-batch-size", type=positive_int, default=None,
                   help="gradient caching: encode the batch in chunks of this many examples (same gradients, "
                        "less memory)")
    p.add_argument("--mini-batch-tokens", type=positive_int, default=None,
                   help="gradient caching: chunks of at most this many real tokens (memory bounded by tokens)")
    p.add_argument("--encoding", choices=ENCODINGS, default=DEFAULTS.encoding,
                   help="sequence layout for the encoder: packed (padding-free, BERT-family), sorted "
                        "(length-sorted groups, each padded to its longest), padded (one padded batch); auto: "
                        "packed where the model allows it, else sorted (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="(default: %(default)s)")
    p.add_argument("--save-steps", type=non_negative_int, default=DEFAULTS.save_steps, metavar="N",
                   help="also save last/ every N steps; 0: only at evaluations. last/ is saved at every "
                        "evaluation, at the end, and on Ctrl-C / SIGTERM (default: %(default)s)")
    p.add_argument("--save-total-limit", type=positive_int, default=DEFAULTS.save_total_limit, metavar="K",
                   help="keep the K newest versions of last/ (best/ is kept apart) (default: %(default)s)")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="start over in an output dir that holds an earlier run, deleting its checkpoints and "
                        "metrics (without it, the same command continues that run when its settings match)")
    p.add_argument("--resume-from", help="a run's output dir or its last/ checkpoint, to continue it")
    p.add_argument("--resume-override", default=None, metavar="NAMES",
                   help="comma-separated settings a resumed run may change (e.g. learning_rate,max_steps), or 'all'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastcse",
                                     description="SimCSE training and STS evaluation with fastcse's fused loss.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the 5-minute demo: unsupervised SimCSE on all-MiniLM-L6-v2",
                          description="Unsupervised SimCSE (the paper's settings: cls pooler, batch 64, lr 3e-5) "
                                      "on <shared>/data/unsup/mixed-104k.txt from all-MiniLM-L6-v2, STS-B dev "
                                      "([CLS]) before and after, the best model saved. About 5 minutes on 2 CPU "
                                      "cores at the default --max-steps.")
    _add_common(demo)
    _add_train_options(demo, demo=True)

    _add_train_command(sub)
    _add_eval_command(sub)

    from fastcse.gpu_check import add_arguments as add_gpu_check_arguments

    add_gpu_check_arguments(sub.add_parser(
        "gpu-check", help="prove the kernels on this machine's GPU: correctness, speed, memory (~4-8 min)",
        description="Correctness of the Triton kernels against the fp64 reference, determinism, torch.compile, "
                    "the CUDA pack kernel and NCCL, speed and memory against plain PyTorch, Inf-CL and "
                    "cut-cross-entropy, and a sentence-transformers step; writes <out>/gpu_check.json and .md. "
                    "Exit 1 if a correctness check fails, 2 without a CUDA device (unless --interpret)."))
    return parser


def _add_train_command(sub) -> None:
    tr = sub.add_parser("train", help="train a sentence encoder with SimCSE",
                        description="Unsupervised (one sentence a line) or supervised (sent0,sent1,hard_neg CSV) "
                                    "SimCSE; evaluates on STS-B dev and keeps the best checkpoint.")
    tr.add_argument("--model", required=True, help="model folder or Hub id (AutoModel); with --from-scratch, "
                                                    "the tokenizer to build a fresh BERT around")
    tr.add_argument("--data", required=True,
                    help="unsup: text file, one sentence a line; sup: CSV sent0,sent1[,hard_neg][,label] (label: "
                         "integer ids, equal ids are positives)")
    tr.add_argument("--mode", choices=MODES, default=DEFAULTS.mode, help="(default: %(default)s)")
    tr.add_argument("--from-scratch", action="store_true", help="train a randomly initialized BERT with --model's tokenizer")
    tr.add_argument("--scratch-hidden-size", type=positive_int, default=256, help="(default: %(default)s)")
    tr.add_argument("--scratch-layers", type=positive_int, default=4, help="(default: %(default)s)")
    tr.add_argument("--pooler", choices=POOLERS, default=DEFAULTS.pooler, help="(default: %(default)s)")
    tr.add_argument("--mlp-only-train", choices=("auto", "yes", "no"), default="auto",
                    help="pooler cls: MLP head at training only (auto: yes for unsup, no for sup)")
    tr.add_argument("--mlp-init", choices=MLP_INITS, default=DEFAULTS.mlp_init,
                    help="pooler cls: SimCSE's MLP head freshly initialized (as the paper) or the encoder's "
                         "pretrained pooler (default: %(default)s)")
    tr.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="(default: %(default)s)")
    tr.add_argument("--hard-negative-weight", type=float, default=DEFAULTS.hard_negative_weight,
                    help="(default: %(default)s)")
    tr.add_argument("--mask-duplicates", action=argparse.BooleanOptionalAction, default=DEFAULTS.mask_duplicates,
                    help="leave rows that share an anchor or positive text out of each other's negatives (false "
                         "negatives); no effect on data with labels (default: on)")
    tr.add_argument("--negative-queue-size", type=non_negative_int, default=DEFAULTS.negative_queue_size, metavar="Q",
                    help="score the last Q queued positives of earlier batches as extra negatives (XBM); "
                         "0: no queue (default: %(default)s)")
    tr.add_argument("--false-negative-margin", type=finite_float, default=None, metavar="M",
                    help="false negatives by similarity (GISTEmbed): leave out of an anchor's softmax the negatives "
                         "scoring above its positive less M (self-guided: the model's own cosine; see --guide-model)")
    tr.add_argument("--margin-strategy", choices=MARGIN_STRATEGIES, default=DEFAULTS.margin_strategy,
                    help="absolute: threshold t - M; relative: t - |t| M, t the positive's similarity "
                         "(default: %(default)s)")
    tr.add_argument("--guide-model", default=None, metavar="PATH",
                    help="with --false-negative-margin: a local model (sharing the model's tokenizer) whose "
                         "similarities decide instead, encoded without gradient each step")
    tr.add_argument("--matryoshka-dims", type=positive_int, nargs="+", default=None, metavar="M",
                    help="Matryoshka training: the loss also on the first M coordinates of every embedding, for "
                         "each M (e.g. 768 512 256 128 64); evaluation reports each (<task>@M) and the saved model "
                         "can be used truncated (SentenceTransformer(path, truncate_dim=M))")
    tr.add_argument("--matryoshka-weights", type=finite_float, nargs="+", default=None, metavar="W",
                    help="one weight per --matryoshka-dims entry, in its order (default: 1 each)")
    tr.add_argument("--metric-for-best", default=None, metavar="NAME",
                    help="the evaluation score that picks the best checkpoint: a task, avg, or either at a "
                         "Matryoshka dimension (STSBenchmark-dev@256) (default: the full dimension's score)")
    tr.add_argument("--learning-rate", type=float, default=None,
                    help=f"(default: {DEFAULT_LR['unsup']:g} unsup, {DEFAULT_LR['sup']:g} sup)")
    tr.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay,
                    help="AdamW's decoupled weight decay, not on biases and norms (default: %(default)s)")
    tr.add_argument("--warmup-steps", type=non_negative_int, default=DEFAULTS.warmup_steps,
                    help="linear warmup before the linear decay (default: %(default)s)")
    tr.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm,
                    help="clip the gradient norm to this; 0: no clipping (default: %(default)s)")
    tr.add_argument("--epochs", type=positive_int, default=None,
                    help=f"(default: {DEFAULT_EPOCHS['unsup']} unsup, {DEFAULT_EPOCHS['sup']} sup)")
    tr.add_argument("--max-seq-length", type=positive_int, default=DEFAULTS.max_seq_length,
                    help="(default: %(default)s)")
    tr.add_argument("--eval-data", default=DEFAULTS.eval_data,
                    help="task name or .tsv/.csv pair file for checkpoint selection, or 'none' (default: %(default)s)")
    tr.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision, help="(default: %(default)s)")
    tr.add_argument("--device", type=torch_device, default=None,
                    help="torch device: cpu, cuda, cuda:N, mps (default: where the model loads, CPU)")
    _add_common(tr)
    _add_train_options(tr, demo=False)


def _add_eval_command(sub) -> None:
    ev = sub.add_parser("eval", help="STS evaluation: Spearman x 100 of cosine similarity",
                        description="Scores a model on STS12-16 (all setting), STS-B test and SICK-R test (or the "
                                    "tasks / pair files given), as SimCSE reports them.")
    ev.add_argument("--model", required=True, help="model folder or Hub id")
    ev.add_argument("--tasks", nargs="+", default=None,
                    help="SentEval task names (STS12..STS16 STSBenchmark SICKRelatedness, STSBenchmark-dev, "
                         "SICKRelatedness-dev) or .tsv/.csv files with sentence1,sentence2,score (default: the 7 tasks)")
    ev.add_argument("--pooler", choices=("auto",) + POOLERS, default="auto",
                    help="auto: what the saved model declares, else cls (default: %(default)s)")
    ev.add_argument("--batch-size", type=positive_int, default=128, help="(default: %(default)s)")
    ev.add_argument("--truncate-dims", type=positive_int, nargs="+", default=(), metavar="M",
                    help="also score the first M coordinates of each embedding, for each M (a Matryoshka model "
                         "truncated), reported as <task>@M")
    ev.add_argument("--alignment-uniformity", action="store_true", help="also Wang & Isola's metrics on STS-B test")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_common(ev)


def _data_dir(args) -> Path:
    return Path(args.data_dir) if args.data_dir else _shared(args) / "data"


def _train_settings(args) -> dict:
    """The TrainConfig fields that the demo and train commands share."""
    return dict(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
                mini_batch_tokens=args.mini_batch_tokens, encoding=args.encoding, max_steps=args.max_steps,
                eval_steps=args.eval_steps, output_dir=args.output_dir, seed=args.seed,
                resume_from=args.resume_from, resume_override=_resume_override(args.resume_override),
                progress=not args.no_progress, data_dir=_data_dir(args), save_steps=args.save_steps or None,
                save_total_limit=args.save_total_limit, overwrite_output_dir=args.overwrite_output_dir)


def _resume_override(text: str | None):
    if text is None:
        return False
    return True if text.strip().lower() == "all" else [name.strip() for name in text.split(",") if name.strip()]


def run_demo(args) -> int:
    from fastcse.training import train

    shared = _shared(args)
    model = shared / "models" / "all-MiniLM-L6-v2"
    data = shared / "data" / "unsup" / "mixed-104k.txt"
    for path in (model, data):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: point --shared (or $FASTCSE_SHARED) at the shared folder")
    started = time.time()
    print(f"fastcse demo: unsupervised SimCSE on {model.name} ([CLS] pooling), {data.name}, "
          f"{args.max_steps} steps of batch {args.batch_size}; STS-B dev every {args.eval_steps} steps", flush=True)
    result = train(model, data, config=TrainConfig(mode="unsup", pooler="cls", **_train_settings(args)))
    before = result.history[0]["metric"] if result.history and result.history[0]["step"] == 0 else None
    after = result.history[-1]["metric"]
    minutes = (time.time() - started) / 60
    print()
    print("STS-B dev Spearman x 100 ([CLS]): " + (f"before {before:.2f}  " if before is not None else "")
          + f"after {after:.2f}  best {result.best_metric:.2f} (step {result.best_step})")
    print(f"saved model: {result.model_path}   metrics: {result.metrics_path}   ({minutes:.1f} min)")
    print(f"next: python -m fastcse eval --model {result.model_path}    # STS12-16, STS-B, SICK-R")
    return 0


def run_train(args) -> int:
    from fastcse.evaluation import model_source
    from fastcse.training import build_bert_from_scratch, train

    model = args.model
    if args.from_scratch:
        model_source(args.model)  # a missing tokenizer folder fails now, not as a Hub lookup
        model = build_bert_from_scratch(args.model, hidden_size=args.scratch_hidden_size,
                                        num_layers=args.scratch_layers,
                                        num_heads=max(1, args.scratch_hidden_size // 64), seed=args.seed)
    mlp = {"auto": None, "yes": True, "no": False}[args.mlp_only_train]
    eval_data = None if args.eval_data.lower() == "none" else args.eval_data
    config = TrainConfig(mode=args.mode, pooler=args.pooler, mlp_only_train=mlp, mlp_init=args.mlp_init,
                         temperature=args.temperature, hard_negative_weight=args.hard_negative_weight,
                         mask_duplicates=args.mask_duplicates, negative_queue_size=args.negative_queue_size,
                         matryoshka_dims=args.matryoshka_dims, matryoshka_weights=args.matryoshka_weights,
                         metric_for_best=args.metric_for_best, false_negative_margin=args.false_negative_margin,
                         margin_strategy=args.margin_strategy, guide_model=args.guide_model,
                         learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm or None,
                         epochs=args.epochs, max_seq_length=args.max_seq_length,
                         eval_data=eval_data, precision=args.precision, device=args.device, **_train_settings(args))
    result = train(model, args.data, config=config)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank holds the result; one prints it
        return 0
    if result.best_metric is not None:
        print(f"best {result.best_metric:.2f} at step {result.best_step} of {result.steps}")
    print(f"saved model: {result.model_path}")
    print(f"next: python -m fastcse eval --model {result.model_path}")
    return 0


def run_eval(args) -> int:
    from fastcse.evaluation import DEFAULT_TASKS, alignment_uniformity, evaluate

    data_dir = _data_dir(args)
    started = time.time()
    scores = evaluate(args.model, args.tasks or list(DEFAULT_TASKS), data_dir=data_dir, pooler=args.pooler,
                      batch_size=args.batch_size, truncate_dims=args.truncate_dims)
    if args.alignment_uniformity:
        scores.update(alignment_uniformity(args.model, data_dir=data_dir, pooler=args.pooler,
                                           batch_size=args.batch_size))
    if args.json:
        print(json.dumps(scores))
    else:
        for name, value in scores.items():
            print(f"{name:<22} {value:8.2f}" if name not in ("alignment", "uniformity") else
                  f"{name:<22} {value:8.4f}")
        print(f"({time.time() - started:.0f} s)")
    return 0


def run_gpu_check(args) -> int:
    from fastcse.gpu_check import run

    return run(args)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (loading, evaluating): stop as Ctrl-C would, exit 143."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated("SIGTERM")


# The errors a user causes (a bad argument, a missing or unreadable file, a folder another run
# holds, a loss driven to NaN): one line and exit 2. Anything else is a bug: its traceback shows.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _user_error_types() -> tuple:
    from fastcse.training import OutputDirInUse

    return USER_ERRORS + (OutputDirInUse,)


def resume_command(argv: list[str], output_dir) -> str:
    """The command line that continues the run ``argv`` started: the same arguments, with
    ``--resume-from output_dir`` and without ``--overwrite-output-dir`` (which would delete it)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume-from":
            skip = True
        elif not (arg.startswith("--resume-from=") or arg == "--overwrite-output-dir"):
            kept.append(arg)
    return shlex.join(["python", "-m", "fastcse", *kept, "--resume-from", str(output_dir)])


def _interrupted(interrupt: KeyboardInterrupt, args, argv: list[str]) -> int:
    """One line for a stop by SIGINT/SIGTERM; the shell's exit code for the signal."""
    from fastcse.training.interrupts import StopAborted, TrainingInterrupted

    code = getattr(interrupt, "exit_code", 128 + signal.SIGINT)
    name = signal.Signals(code - 128).name
    resume = (f"; resume with: {resume_command(argv, args.output_dir)}"
              if args.command in ("train", "demo") else "")
    if isinstance(interrupt, TrainingInterrupted):
        saved = f"saved {interrupt.checkpoint}" if interrupt.checkpoint is not None else "nothing trained yet"
        message = f"stopped by {name} after step {interrupt.step} of {interrupt.total_steps} ({saved}){resume}"
    elif isinstance(interrupt, StopAborted):
        message = f"{interrupt}{resume}"
    else:  # outside the training loop (loading, evaluating, the final save)
        message = f"interrupted by {name}" + (f" (the last complete checkpoint, if any, stays valid){resume}"
                                              if resume else "")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"fastcse: {message}", file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if getattr(args, "no_progress", False):  # transformers' own bars too ("Writing model shards" at every save)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return {"demo": run_demo, "train": run_train, "eval": run_eval, "gpu-check": run_gpu_check}[args.command](args)
    except KeyboardInterrupt as interrupt:
        if args.verbose:
            raise
        return _interrupted(interrupt, args, argv)
    except Exception as error:
        if args.verbose or not isinstance(error, _user_error_types()):
            raise
        print(f"fastcse: error: {getattr(error, 'cli_message', None) or error}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The ``fastcse`` command: exits with ``main``'s code. A ``torchrun`` worker (WORLD_SIZE > 1)
    leaves through ``fastcse.distributed.exit_worker``, not the interpreter's shutdown, in which
    gloo's threads can abort a finished run (see that function)."""
    code = main()
    if several_torchrun_workers():
        from fastcse.distributed import exit_worker

        exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
