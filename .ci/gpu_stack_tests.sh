#!/usr/bin/env bash
# fastcse on the GPU machine's own stack (.ci/gpu_stack_requirements.txt: Python 3.12, torch 2.11,
# triton 3.6, ...), seen as the GPU kit sees it there: a copy of the checkout without fastcse._C,
# imported through PYTHONPATH (no install). Runs the GPU kit's harness through the Triton
# interpreter (gpu-check --interpret: 0 failures) and the CPU-path tests where versions matter:
# the loss (torch.compile, the custom op's opcheck), its variants, row options, Matryoshka and the
# false-negative rule, the sentence-transformers integration.
#   env: FASTCSE_GPU_STACK_VENV (see .ci/gpu_stack_venv.sh), FASTCSE_SHARED (default ../shared)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/.ci/gpu_stack_venv.sh" | tail -1)"
PORTABILITY_TESTS=(tests/test_loss.py tests/test_loss_variants.py tests/test_loss_groups_queue_labels.py
                   tests/test_loss_matryoshka.py tests/test_loss_false_negatives.py
                   tests/test_integrations_sentence_transformers.py)
# Needs fastcse._C (distributed negatives), which this copy lacks as the GPU machine's checkout does
# (the kit builds it there); .ci/cuda_compile_check.sh builds it against this torch and runs it.
NEEDS_EXTENSION=(--deselect tests/test_integrations_sentence_transformers.py::test_gather_across_devices_matches_mnrl_on_two_ranks
                 --deselect tests/test_loss_matryoshka.py::test_two_gloo_ranks_match_the_reference
                 --deselect tests/test_loss_matryoshka.py::test_two_gloo_ranks_random_cases_match_the_reference)

COPY="$(mktemp -d)"
trap 'rm -rf "$COPY"' EXIT
# The files git tracks or would track: none it ignores (no fastcse/_C*.so, no build outputs).
git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && tar --null -T - -cf -) | tar -xf - -C "$COPY"
rm -f "$COPY"/fastcse/_C*.so
export PYTHONPATH="$COPY" FASTCSE_SHARED="${FASTCSE_SHARED:-$(cd "$ROOT/.." && pwd)/shared}"
cd "$COPY"
"$VENV/bin/python" -c "import fastcse, torch, triton, numpy, transformers, sentence_transformers as st, sys
assert fastcse.__file__.startswith('$COPY'), fastcse.__file__
print('gpu_stack: python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'numpy', numpy.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"

t0=$SECONDS
# Its report stays in the checkout (gpu_check_out/ is ignored by git).
"$VENV/bin/python" -m fastcse gpu-check --interpret --out "$ROOT/gpu_check_out/gpu-stack"
echo "::gpu-stack gpu-check --interpret took $((SECONDS - t0)) s"
t0=$SECONDS
# Two workers as in the main stack's run (tests/conftest.py).
"$VENV/bin/python" -m pytest "${PORTABILITY_TESTS[@]}" "${NEEDS_EXTENSION[@]}" -q -p no:cacheprovider -n 2 --dist loadfile
echo "::gpu-stack tests took $((SECONDS - t0)) s"
