"""``python -m fastcse.gpu_check``: the same as ``python -m fastcse gpu-check``."""

import sys

from fastcse.gpu_check import main

sys.exit(main())
