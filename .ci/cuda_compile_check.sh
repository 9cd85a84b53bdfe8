#!/usr/bin/env bash
# CUDA build check of fastcse._C without a GPU: setup.py's CUDAExtension branch builds the CUDA
# pack kernel (nvcc, sm_80 and sm_90, ptxas register/spill report) and the C++ ops against a
# CUDA build of torch, then the built module is imported under that torch and runs a one-rank
# gloo info_nce through fastcse::gather_rows. The project venv's CPU torch has no CUDA headers:
# the CUDA torch is the GPU machine's own (torch 2.11.0+cu130 in the venv of
# .ci/gpu_stack_venv.sh, which the GPU-stack tests use too), so the extension is compiled against
# the very torch it will be loaded by there.
#   env: FASTCSE_GPU_STACK_VENV (see .ci/gpu_stack_venv.sh), CUDA_HOME (default /usr/local/cuda)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "cuda_compile_check: no nvcc in $CUDA_HOME/bin (set CUDA_HOME)" >&2; exit 1; }

start=$SECONDS
VENV="$(bash "$ROOT/.ci/gpu_stack_venv.sh" | tail -1)"
"$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is None)" \
  || { echo "cuda_compile_check: the torch in $VENV is not a CUDA build" >&2; exit 1; }
echo "cuda_compile_check: venv $VENV ready after $((SECONDS - start))s"

# Build in a scratch copy: nothing lands in the work tree.
SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/kernels" "$ROOT/fastcse" "$SRC/"
[ -f "$ROOT/README.md" ] && cp "$ROOT/README.md" "$SRC/"
rm -f "$SRC"/fastcse/_C*.so

# (PATH: the venv's ninja compiles the two sources at once.)
# The CUDA headers torch's own headers include (cusparse.h, ...) ship in the torch wheel's nvidia
# package (nvidia/cu13 for torch 2.11.0+cu130); the toolkit in CUDA_HOME may lack them.
WHEEL_CUDA_INC="$(dirname "$(ls "$VENV"/lib/python3*/site-packages/nvidia/*/include/cusparse.h | head -1)")"
t0=$SECONDS
(cd "$SRC" && PATH="$VENV/bin:$PATH" TORCH_CUDA_ARCH_LIST="8.0;9.0" NVCC_APPEND_FLAGS="-I$WHEEL_CUDA_INC -Xptxas -v" \
  CPATH="$WHEEL_CUDA_INC" MAX_JOBS=2 \
  "$VENV/bin/python" -W ignore setup.py -q build_ext --inplace > "$SRC/build.log" 2>&1) || {
  cat "$SRC/build.log"; echo "cuda_compile_check: build FAILED" >&2; exit 1; }
grep -E "error|warning:|Compiling entry|registers|spill" "$SRC/build.log" | grep -v "^ptxas info    : Function properties" || true
grep -q -- "-gencode=arch=compute_80,code=sm_80" "$SRC/build.log" && grep -q -- "-gencode=arch=compute_90,code=sm_90" "$SRC/build.log" \
  || { echo "cuda_compile_check: nvcc was not asked for sm_80 and sm_90" >&2; exit 1; }
grep -q -- "FASTCSE_WITH_CUDA" "$SRC/build.log" || { echo "cuda_compile_check: not a CUDA build" >&2; exit 1; }
echo "cuda_compile_check: setup.py CUDAExtension build (sm_80, sm_90) ok in $((SECONDS - t0))s"

t0=$SECONDS
(cd "$SRC" && "$VENV/bin/python" -W ignore - <<'PY'
import torch
import torch.distributed as dist
import fastcse
import fastcse._C  # the CUDA build of the extension
assert fastcse._C.__file__.startswith(__import__("os").getcwd()), fastcse._C.__file__
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
a, p, n = (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8))
loss = fastcse.info_nce(a, p, n, symmetric=True, process_group=dist.group.WORLD)
torch.testing.assert_close(loss, fastcse.info_nce(a, p, n, symmetric=True))
dist.destroy_process_group()
print(f"cuda_compile_check: imported under torch {torch.__version__}; one-rank info_nce through gather_rows ok")
PY
)
echo "cuda_compile_check: import + run ok in $((SECONDS - t0))s"
echo "cuda_compile_check: total $((SECONDS - start))s"
