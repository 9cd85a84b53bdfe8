#!/usr/bin/env bash
# Creates .venv (Python 3.11) with everything fastcse, its tests and benchmarks need, and
# builds the fastcse._C extension in place. Idempotent: a second run only re-checks.
#
# torch is pinned to the CPU build (2.13.0+cpu): any looser spec can pull a multi-GB CUDA
# build. The extension is built against the installed torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${FASTCSE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade "pip>=23" setuptools wheel
$PIP install "torch==2.13.0"
$PIP install "triton==3.9.0" numpy scipy tqdm "transformers>=4.40" datasets \
    "sentence-transformers>=6.0" "accelerate>=1.1" matplotlib pytest pytest-benchmark hypothesis ninja
# ninja (from PyPI, into the venv) makes the extension build parallel; torch looks for it on PATH.
PATH="$(cd "$VENV/bin" && pwd):$PATH" $PIP install --no-build-isolation -e ".[test,sentence-transformers]"
"$VENV/bin/python" -c "import fastcse, torch; print('fastcse', fastcse.__version__, 'torch', torch.__version__)"
