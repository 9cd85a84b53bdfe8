"""Quality runs, reported not gated: STS before and after SimCSE training.

    nice python scripts/quality_runs.py unsup-scratch --max-steps 300 --output-dir runs/q-unsup
    nice python scripts/quality_runs.py sup-minilm --epochs 1 --output-dir runs/q-sup

unsup-scratch: unsupervised SimCSE on <shared>/data/unsup/mixed-104k.txt from a randomly
initialized 4-layer / 256-wide BERT (all-MiniLM-L6-v2's tokenizer), avg pooling.
sup-minilm: supervised SimCSE (entailment positive, contradiction hard negative) on
<shared>/data/nli/snli-dev-triples.csv (2943 triples: SNLI dev, the full 275k NLI set is not
available here) from all-MiniLM-L6-v2, cls pooler with the MLP head kept, as SimCSE's sup recipe;
its "before" is scored with the pooler the run uses.
Both print and write (to <output-dir>/quality.json) STS-B dev and the 7 tasks, before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcse.evaluation import SENTEVAL_TASKS, evaluate_loaded, shared_dir  # noqa: E402
from fastcse.training import build_bert_from_scratch, train  # noqa: E402

TASKS = ["STSBenchmark-dev", *SENTEVAL_TASKS]


def scores(model, tok, pooler):
    t0 = time.perf_counter()
    s = evaluate_loaded(model, tok, TASKS, pooler=pooler)
    s["avg"] = sum(s[t] for t in SENTEVAL_TASKS) / len(SENTEVAL_TASKS)  # the 7-task average, dev excluded
    s["eval_seconds"] = time.perf_counter() - t0
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", choices=("unsup-scratch", "sup-minilm"))
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--eval-steps", type=int, default=100)
    args = p.parse_args(argv)
    shared = shared_dir()
    minilm = shared / "models" / "all-MiniLM-L6-v2"
    if args.run == "unsup-scratch":
        model, tok = build_bert_from_scratch(minilm, hidden_size=256, num_layers=4, num_heads=4)
        data, mode, pooler, eval_pooler = shared / "data" / "unsup" / "mixed-104k.txt", "unsup", "avg", "avg"
        lr = args.learning_rate or 5e-4  # from scratch: SimCSE's 3e-5 is for pretrained encoders
    else:
        from transformers import AutoModel, AutoTokenizer

        model, tok = AutoModel.from_pretrained(str(minilm)), AutoTokenizer.from_pretrained(str(minilm))
        data, mode, pooler, eval_pooler = shared / "data" / "nli" / "snli-dev-triples.csv", "sup", "cls", "cls"
        lr = args.learning_rate  # None: SimCSE's 5e-5
    before = scores(model, tok, eval_pooler)
    print("before", json.dumps(before), flush=True)
    started = time.perf_counter()
    result = train((model, tok), data, mode=mode, pooler=pooler, batch_size=args.batch_size, learning_rate=lr,
                   max_steps=args.max_steps, epochs=args.epochs, eval_steps=args.eval_steps,
                   output_dir=args.output_dir, progress=False)
    train_wall = time.perf_counter() - started
    from transformers import AutoModel, AutoTokenizer

    best = AutoModel.from_pretrained(result.model_path)
    after = scores(best, AutoTokenizer.from_pretrained(result.model_path), eval_pooler)
    report = {"run": args.run, "settings": {"batch_size": args.batch_size, "learning_rate": lr, "pooler": pooler,
                                            "steps": result.steps, "best_step": result.best_step},
              "before": before, "after": after, "train_wall_seconds": train_wall,
              "train_step_seconds": result.train_seconds, "history": result.history}
    print("after", json.dumps(after), flush=True)
    out = Path(args.output_dir) / "quality.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    os.replace(tmp, out)
    for name in TASKS + ["avg"]:
        print(f"{name:<20} {before[name]:7.2f} -> {after[name]:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
