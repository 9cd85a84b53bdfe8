#!/usr/bin/env bash
# Prepares what `python -m fastcse gpu-check` needs on a GPU machine that has no network and no
# package index, into two ignored folders to carry there beside the checkout:
#   .whl/                the peers' wheels (Inf-CL, import name inf_cl; cut-cross-entropy), pure
#                        Python, for CPython 3.12 (the GPU machine's); the kit installs them with
#                        pip install --no-index --no-deps --target <tmp>
#   .gpu_kit/tokenizer/  all-MiniLM-L6-v2's tokenizer files only (no weights): the kit's
#                        sentence-transformers step builds a random-weight MiniLM-L6 around it
# Run here (a machine with a package index and ../shared); idempotent.
#   env: PYTHON (default .venv/bin/python, else python3), FASTCSE_SHARED (default ../shared)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
SHARED="${FASTCSE_SHARED:-$ROOT/../shared}"
# Pinned: the versions whose entry points fastcse/gpu_check/peers.py calls (inf_cl.cal_inf_loss,
# cut_cross_entropy.linear_cross_entropy).
PEERS=("inf-cl==1.2.1" "cut-cross-entropy==25.1.1")

mkdir -p .whl
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation py --platform any --dest .whl "${PEERS[@]}" 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# Pure Python or nothing: the GPU machine cannot build or fetch anything.
"$PYTHON" - .whl/*.whl <<'PY'
import sys, zipfile
for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/WHEEL"))
        purelib = "Root-Is-Purelib: true" in wheel.read(meta).decode()
        binaries = [n for n in wheel.namelist() if n.endswith((".so", ".pyd", ".dylib"))]
    if not path.endswith("-none-any.whl") or not purelib or binaries:
        sys.exit(f"fetch_gpu_wheels: {path} is not a pure-Python wheel")
PY

TOKENIZER_SOURCE="$SHARED/models/all-MiniLM-L6-v2"
TOKENIZER_FILES=(tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json PACKAGE_LICENSE)
mkdir -p .gpu_kit/tokenizer
for name in "${TOKENIZER_FILES[@]}"; do
  [ -f "$TOKENIZER_SOURCE/$name" ] || { echo "fetch_gpu_wheels: $TOKENIZER_SOURCE/$name not found (set FASTCSE_SHARED)" >&2; exit 1; }
  install -m 0644 "$TOKENIZER_SOURCE/$name" ".gpu_kit/tokenizer/$name"
done

ls -l .whl/*.whl .gpu_kit/tokenizer/
echo "fetch_gpu_wheels: .whl $(du -sh .whl | cut -f1), .gpu_kit $(du -sh .gpu_kit | cut -f1): carry both to the GPU machine"
