"""A loss case of the GPU kit (shapes, dtype, options, how its inputs are drawn) and the sizes
each profile checks at; the inputs, the upstream gradient and the loss-and-gradients run come
from the reference harness the test suite uses (fastcse.testing)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastcse import testing

if TYPE_CHECKING:
    from fastcse.gpu_check.correctness import Variant

SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
HALF_DTYPES = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float32,) + HALF_DTYPES


@dataclass(frozen=True)
class LossCase:
    """One comparison: shapes, dtype, options, and how the inputs are drawn."""

    batch: int
    num_neg: int
    dim: int
    dtype: torch.dtype = torch.float32
    tau: float = 0.05
    learnable_tau: bool = True  # a 0-dim tensor with requires_grad (else a float)
    normalize: bool = True
    symmetric: bool = False
    weight: float = 0.0
    reduction: str = "mean"
    scale: float = 1.0  # input magnitude (unnormalized cases keep their logits moderate)
    seed: int = 0
    special_rows: bool = False  # zero rows and rows of tiny norm
    floor: float = testing.FLOOR
    variant: "Variant | None" = None

    @property
    def name(self) -> str:
        opts = ["norm" if self.normalize else "dot"]
        if self.symmetric:
            opts.append("sym")
        if self.weight:
            opts.append(f"w{self.weight:g}")
        opts.append(self.reduction)
        opts.append(f"tau{self.tau:g}" + ("" if self.learnable_tau else "-float"))
        if self.special_rows:
            opts.append("zero-tiny-rows")
        return f"{SHORT_DTYPE[self.dtype]}/B{self.batch}-k{self.num_neg}-d{self.dim}/{'-'.join(opts)}"

    @property
    def tol(self) -> float:
        return testing.TOL[self.dtype]

    def options(self) -> dict:
        return dict(normalize=self.normalize, symmetric=self.symmetric, hard_negative_weight=self.weight,
                    reduction=self.reduction)

    def inputs(self) -> list[torch.Tensor | None]:
        """Anchors, positives, negatives drawn on the CPU from the case's seed (zero and tiny rows on
        request), or by the variant's own ``draw``."""
        if self.variant is not None and self.variant.draw is not None:
            return self.variant.draw(self.batch, self.num_neg, self.dim, self.dtype, self.seed)
        return testing.draw_inputs(self.batch, self.num_neg, self.dim, self.dtype, self.seed, self.scale,
                                   special_rows=self.special_rows)

    def upstream(self) -> torch.Tensor:
        return testing.upstream_gradient(self.batch, self.reduction, self.seed)

    def run(self, fn, tensors, device: torch.device, upstream: torch.Tensor, dtype: torch.dtype | None = None,
            **keywords) -> dict[str, torch.Tensor]:
        """The loss and every gradient of ``fn`` on this case's options (fastcse.testing.loss_and_grads)."""
        return testing.loss_and_grads(fn, tensors, self.tau, upstream, dtype, device=device,
                                      learnable_tau=self.learnable_tau, **self.options(), **keywords)


@dataclass(frozen=True)
class Shapes:
    """The sizes a profile checks at: tiny under the interpreter (~1 ms of Python per program
    instance), realistic on a GPU (d in {64, 384, 768, 1024}, primes, d not a power of two)."""

    grid: tuple[int, int]  # (B, d) of the option grid
    odd: tuple[tuple[int, int, int], ...]  # (B, k, d)
    special: tuple[int, int, int]  # zero and tiny rows (B >= 12)
    variant: tuple[int, int]  # (B, d)
    determinism: tuple[int, int, int]
    compile: tuple[int, int, int]
    distributed: tuple[int, int]  # (rows, d)
    half_grid: bool  # 16-bit dtypes run the whole option grid, not only the half-precision cases
    odd_half: bool  # odd shapes in bf16 too


SHAPES = {
    "interpret": Shapes(grid=(19, 24), odd=((1, 0, 8), (1, 2, 5), (17, 0, 7), (31, 1, 37), (13, 3, 48)),
                        special=(12, 2, 24), variant=(13, 24), determinism=(19, 1, 24), compile=(12, 1, 16),
                        distributed=(9, 16), half_grid=False, odd_half=False),
    "quick": Shapes(grid=(509, 384), odd=((1, 2, 64), (127, 1, 1024), (1021, 0, 100)), special=(64, 2, 384),
                    variant=(251, 384), determinism=(4096, 1, 768), compile=(1024, 1, 768), distributed=(1000, 768),
                    half_grid=False, odd_half=False),
    "full": Shapes(grid=(1021, 768), odd=((1, 0, 64), (1, 2, 384), (17, 0, 7), (127, 0, 1024), (251, 3, 100),
                                          (1021, 1, 37), (2039, 1, 768), (4096, 1, 1024)),
                   special=(257, 2, 768), variant=(509, 768), determinism=(8192, 1, 768), compile=(2048, 1, 768),
                   distributed=(4096, 1024), half_grid=True, odd_half=True),
}


def scaled(dim: int, base: float, base_dim: int) -> float:
    """An unnormalized input scale chosen at d = base_dim by the test suite, shrunk as 1/sqrt(d) so
    that |a|^2 (the positive's dot product, hence the logits' range) does not grow with d."""
    return base * math.sqrt(base_dim / dim)
