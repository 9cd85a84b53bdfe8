#!/usr/bin/env bash
# Makes sure the GPU machine's stack (.ci/gpu_stack_requirements.txt) is installed in a venv outside
# the work tree and prints that venv's path on the last line of stdout. Quick when it already is
# (a stamp of the requirements file inside the venv); otherwise creates it (Python 3.12 when this
# machine has one) or brings it in line: mostly a download (torch 2.11's CUDA wheels, ~3 GB;
# pip's cache is shared with scripts/setup.sh).
#   env: FASTCSE_GPU_STACK_VENV (default /tmp/fastcse-gpustack), FASTCSE_GPU_STACK_PYTHON
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTCSE_GPU_STACK_VENV:-/tmp/fastcse-gpustack}"
REQUIREMENTS="$ROOT/.ci/gpu_stack_requirements.txt"
STAMP="$VENV/.fastcse-requirements.sha256"
want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"

python312() {
  # pyenv's python3.12 shim exists even where 3.12 is not the selected version: try the real ones too.
  local candidate
  for candidate in ${FASTCSE_GPU_STACK_PYTHON:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "gpu_stack_venv: no Python 3.12 here (the GPU machine's); using python3" >&2
  echo python3
}

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  echo "gpu_stack_venv: $VENV is up to date" >&2
else
  [ -x "$VENV/bin/python" ] || { echo "gpu_stack_venv: creating $VENV" >&2; "$(python312)" -m venv "$VENV"; }
  echo "gpu_stack_venv: installing .ci/gpu_stack_requirements.txt into $VENV" >&2
  # (grep drops pip's notes about unreachable local index folders; pipefail keeps pip's status)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
  echo "$want" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
fi
echo "$VENV"
