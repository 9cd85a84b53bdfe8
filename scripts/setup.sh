#!/usr/bin/env bash
# Creates .venv (Python 3.11) with everything fastcse, its tests and benchmarks need, and
# builds the fastcse._C extension in place. A second run only re-checks:
#   - the packages are installed when this script or pyproject.toml changed since the last
#     successful install (a stamp inside the venv), never otherwise;
#   - _C is rebuilt when it is missing or its inputs changed (kernels/, setup.py, torch).
#
# torch is pinned to the CPU build (2.13.0+cpu): any looser spec can pull a multi-GB CUDA
# build. The extension is built against the installed torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${FASTCSE_VENV:-.venv}
PACKAGES_STAMP="$VENV/.fastcse-packages.sha256"
EXTENSION_STAMP="$VENV/.fastcse-extension.sha256"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip_install() {
    # (grep drops pip's notes about unreachable local index folders; pipefail keeps pip's status)
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
# ninja (from PyPI, into the venv) makes the extension build parallel; torch looks for it on PATH.
export PATH="$(cd "$VENV/bin" && pwd):$PATH"

# _C's inputs: its sources and build script, and the torch (and Python) it links against.
extension_inputs() {
    (cat setup.py kernels/*; "$VENV/bin/python" -c \
        "import importlib.metadata as m, sys; print(m.version('torch'), sys.version)") | sha256sum | cut -d' ' -f1
}

packages_inputs="$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$PACKAGES_STAMP" 2>/dev/null)" != "$packages_inputs" ]; then
    pip_install --upgrade "pip>=23" setuptools wheel
    pip_install "torch==2.13.0" "triton==3.9.0" numpy scipy tqdm "transformers>=5.17" datasets \
        "sentence-transformers>=6.0.1" "accelerate>=1.1" matplotlib pytest pytest-benchmark pytest-xdist hypothesis ninja
    pip_install --no-build-isolation -e ".[test,sentence-transformers]"  # builds _C in place too
    extension_inputs > "$EXTENSION_STAMP"
    echo "$packages_inputs" > "$PACKAGES_STAMP"
elif ! ls fastcse/_C*.so > /dev/null 2>&1 || [ "$(cat "$EXTENSION_STAMP" 2>/dev/null)" != "$(extension_inputs)" ]; then
    echo "setup: packages up to date; rebuilding fastcse._C"
    "$VENV/bin/python" setup.py -q build_ext --inplace > /dev/null
    extension_inputs > "$EXTENSION_STAMP"
else
    echo "setup: packages and fastcse._C up to date ($VENV)"
fi
"$VENV/bin/python" -c "import fastcse, fastcse._C, torch; print('fastcse', fastcse.__version__, 'torch', torch.__version__)"
