"""fastcse.info_nce at a batch the plain PyTorch loss cannot hold, on the CPU.

1. Agreement: loss and gradients against the plain loss (F.normalize, matmul,
   F.cross_entropy) at a batch both can run.
2. Scale: one forward + backward at B anchors x 2B candidates (one hard negative each),
   where the plain loss would need three B x 2B fp32 matrices; prints time and peak memory.

    python examples/loss_demo.py [--batch 32768] [--dim 768]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import fastcse


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def agreement(batch: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, dim, generator=gen), torch.randn(batch, dim, generator=gen),
              torch.randn(batch, 1, dim, generator=gen)]
    results = []
    for fn in (fastcse.info_nce, fastcse.info_nce_reference):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves, hard_negative_weight=0.2)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    (loss, grads), (ref_loss, ref_grads) = results
    grad_err = max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref_grads))
    print(f"agreement at B={batch}, d={dim}: loss {loss.item():.6f} vs plain {ref_loss.item():.6f} "
          f"(|diff| {abs(loss - ref_loss).item():.1e}); max relative gradient difference {grad_err:.1e}")


def scale(batch: int, dim: int) -> None:
    candidates = 2 * batch
    plain_gib = 3 * batch * candidates * 4 / 2**30
    gen = torch.Generator().manual_seed(1)
    anchor = torch.randn(batch, dim, generator=gen).requires_grad_()
    positive = torch.randn(batch, dim, generator=gen).requires_grad_()
    negative = torch.randn(batch, dim, generator=gen).requires_grad_()
    before = rss_peak_mib()
    start = time.perf_counter()
    loss = fastcse.info_nce(anchor, positive, negative)
    loss.backward()
    seconds = time.perf_counter() - start
    flops = 6 * batch * candidates * dim
    print(f"B={batch} anchors x {candidates} candidates, d={dim}: loss {loss.item():.4f}, forward+backward "
          f"{seconds:.1f} s ({flops / seconds / 1e9:.0f} GFLOP/s of the 6 B N d floor), extra peak memory "
          f"{rss_peak_mib() - before:.0f} MiB; the plain loss's three B x N fp32 matrices alone: {plain_gib:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--check-batch", type=int, default=2048)
    args = parser.parse_args()
    agreement(args.check_batch, args.dim)
    scale(args.batch, args.dim)


if __name__ == "__main__":
    main()
