"""The speed section: forward + backward of the loss against plain PyTorch, Inf-CL,
cut-cross-entropy and the bare bf16 matrix products of the same shapes (CUDA events, median),
with the extra peak memory of each, and the row options beside fastcse's plain call: group ids,
a queue, Matryoshka (with the per-dimension loop and MatryoshkaLoss) and false negatives by
similarity (with GISTEmbedLoss's math)."""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch

import fastcse
from fastcse.checks import DEFAULT_TEMPERATURE
from fastcse.gpu_check.cases import SHORT_DTYPE
from fastcse.gpu_check.peers import PEERS, cce_loss, gist_math_loss, inf_cl_loss, matryoshka_mnrl_loss
from fastcse.gpu_check.results import Outcome, Skip

SPEED_BATCHES = {"quick": (16384,), "full": (16384, 4096, 65536)}
SPEED_DIMS = (768, 1024)
SPEED_DTYPES = (torch.bfloat16, torch.float32)
# The row options (false negatives masked by group ids, a queue of extra negatives), timed beside
# fastcse's plain call of the same (B, d, dtype): what each costs over it. Group ids with every
# id 4 times (3 false negatives a row to mask), and a queue of SPEED_QUEUE rows (at most 4 B) of
# extra negatives, detached as a trainer's queue is.
ROW_OPTION_IMPLS = ("fastcse+group_ids", "fastcse+queue")
SPEED_QUEUE = 65536
SPEED_IMPLS = ("fastcse", "plain", "inf_cl", "cce", *ROW_OPTION_IMPLS)  # fastcse first: the row options' base
SPEED_TAU = DEFAULT_TEMPERATURE
# Matryoshka at the shape sentence-transformers' MatryoshkaLoss is used with (d = 768, five
# nested dimensions): the fused one-pass call against the per-dimension loop it replaces (one
# plain call on each prefix, sliced from the same inputs), each beside fastcse's plain call.
MATRYOSHKA_SPEED = (16384, 768, torch.bfloat16)  # (B, d, dtype)
MATRYOSHKA_DIMS = (768, 512, 256, 128, 64)
MATRYOSHKA_IMPLS = ("fastcse", "fastcse+matryoshka_loop", "fastcse+matryoshka")
# ... and sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss) on the same embeddings,
# before the fused call so that the fused row's note compares with it too.
MATRYOSHKA_SPEED_IMPLS = ("fastcse", "fastcse+matryoshka_loop", "matryoshka_mnrl", "fastcse+matryoshka")
# False negatives by similarity as GISTEmbedLoss computes them (its defaults: contrast_anchors,
# i.e. query_to_doc + query_to_query in one softmax; an absolute margin, here 0.05), at d = 768
# bf16: fastcse's call in those directions without the rule, GISTEmbedLoss's math on the same
# embeddings with a guide's, and fastcse self-guided and guided (a guide model's rows of width d).
FALSE_NEGATIVE_BATCHES = {"quick": (16384,), "full": (16384, 4096)}
FALSE_NEGATIVE_SPEED = (768, torch.bfloat16)  # (d, dtype)
FALSE_NEGATIVE_MARGIN = 0.05
FALSE_NEGATIVE_IMPLS = ("fastcse+q2q", "gist_math", "fastcse+self_guided", "fastcse+guided")
_GIST_DIRECTIONS = dict(directions=("query_to_doc", "query_to_query"), partition_mode="joint")
# Plain PyTorch's loss holds about three fp32 B x N blocks at its peak: the logits, the
# log-softmax cross_entropy saves, and its gradient. It is only run where those fit in
# MEMORY_FRACTION of the free memory.
PLAIN_LIVE_BLOCKS = 3
# The materializing implementations' peaks in units of those three blocks: GISTEmbedLoss's math
# also holds the guide's similarities and the masks over B x (N + B) cells; MatryoshkaLoss keeps
# every dimension's log-softmax for the backward (five 16-bit blocks at d = 768).
MATERIALIZED_BLOCKS = {"plain": 1.0, "gist_math": 2.0, "matryoshka_mnrl": 2.0}
MEMORY_FRACTION = 0.6
# The bare products are chunked over rows so that one score block stays below this.
MATMUL_BLOCK_BYTES = 2 * 2**30


def loss_flops(batch: int, candidates: int, dim: int) -> float:
    """The floor of forward + backward: three B x N x d products (scores, S C, S^T A), 2 B N d each."""
    return 6.0 * batch * candidates * dim


def plain_loss_bytes(batch: int, candidates: int) -> int:
    return PLAIN_LIVE_BLOCKS * batch * candidates * 4


def fits_in_memory(needed_bytes: int, free_bytes: int, fraction: float = MEMORY_FRACTION) -> bool:
    return needed_bytes <= fraction * free_bytes


def materialized_loss_fits(batch: int, candidates: int, free_bytes: int | None) -> bool:
    """Whether plain PyTorch's B x N blocks fit in the free memory (always, off CUDA: None)."""
    return free_bytes is None or fits_in_memory(plain_loss_bytes(batch, candidates), free_bytes)


def free_memory_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events around it on the GPU (no host overhead counted), else wall clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int = 1, target_s: float = 0.6,
                   reps: tuple[int, int] = (3, 10)) -> tuple[float, int]:
    """(median seconds, repetitions): after ``warmup`` calls (compilation, autotuning), as many
    repetitions as fit in about ``target_s``, within ``reps``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = [time_once(fn, device)]
    count = min(reps[1], max(reps[0], int(target_s / max(times[0], 1e-6))))
    times += [time_once(fn, device) for _ in range(count - 1)]
    return statistics.median(times), len(times)


def extra_peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """The peak of allocated memory during one call above what was allocated before it (the
    inputs, the model): the call's own activations, temporaries and gradients. None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class SpeedInputs:
    """[B, d] anchors and positives and [B, 1, d] hard negatives (N = 2B candidates), requiring grad."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    tau: float = SPEED_TAU

    @classmethod
    def draw(cls, batch: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> "SpeedInputs":
        gen = torch.Generator(device=device).manual_seed(seed)
        anchor = torch.randn(batch, dim, device=device, generator=gen)
        positive = anchor + 0.8 * torch.randn(batch, dim, device=device, generator=gen)
        negative = anchor[:, None] + 1.2 * torch.randn(batch, 1, dim, device=device, generator=gen)
        return cls(*(x.to(dtype).requires_grad_() for x in (anchor, positive, negative)))

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return self.anchor, self.positive, self.negative

    def candidates(self) -> torch.Tensor:
        return torch.cat([self.positive, self.negative.reshape(-1, self.positive.shape[1])])

    def clear_grads(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None


def _fastcse_loss(x: SpeedInputs, **row_options) -> torch.Tensor:
    return fastcse.info_nce(x.anchor, x.positive, x.negative, temperature=x.tau, **row_options)


def speed_queue_size(batch: int) -> int:
    return min(SPEED_QUEUE, 4 * batch)


def row_option_inputs(impl: str, batch: int, dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The keyword arguments of a ROW_OPTION_IMPLS implementation (none for the others)."""
    if impl == "fastcse+group_ids":
        ids = torch.randperm(batch, generator=torch.Generator().manual_seed(1)) // 4
        return {"group_ids": ids.to(device)}
    if impl in ("fastcse+matryoshka", "fastcse+matryoshka_loop"):
        return {"matryoshka_dims": MATRYOSHKA_DIMS}
    if impl == "fastcse+queue":
        gen = torch.Generator(device=device).manual_seed(2)
        return {"extra_negatives": torch.randn(speed_queue_size(batch), dim, device=device, generator=gen).to(dtype)}
    if impl in FALSE_NEGATIVE_IMPLS:
        return false_negative_inputs(impl, batch, dim, dtype, device)
    if impl == "matryoshka_mnrl":
        return {"matryoshka_dims": MATRYOSHKA_DIMS}
    return {}


def false_negative_inputs(impl: str, batch: int, dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """GISTEmbedLoss's directions, and the rule: self-guided, or with a guide model's rows (another
    draw of the same kind of rows, [B, 1, d] negatives like the inputs', detached)."""
    if impl == "fastcse+q2q":
        return dict(_GIST_DIRECTIONS)
    options = dict(_GIST_DIRECTIONS, false_negative_margin=FALSE_NEGATIVE_MARGIN)
    if impl != "fastcse+self_guided":
        guide = SpeedInputs.draw(batch, dim, dtype, device, seed=3)
        options["guide"] = tuple(t.detach() for t in guide.leaves)
    return options


def _matryoshka_loop_loss(x: SpeedInputs, matryoshka_dims: tuple[int, ...]) -> torch.Tensor:
    """sum_k loss_k, one plain call per prefix: what the fused Matryoshka call replaces (weights 1)."""
    return sum(fastcse.info_nce(x.anchor[:, :m], x.positive[:, :m], x.negative[..., :m], temperature=x.tau)
               for m in matryoshka_dims)


def _plain_loss(x: SpeedInputs) -> torch.Tensor:
    return fastcse.info_nce_reference(x.anchor, x.positive, x.negative, temperature=x.tau)


LOSS_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "fastcse": _fastcse_loss, **dict.fromkeys(ROW_OPTION_IMPLS, _fastcse_loss),
    "fastcse+matryoshka": _fastcse_loss, "fastcse+matryoshka_loop": _matryoshka_loop_loss,
    "matryoshka_mnrl": matryoshka_mnrl_loss, "gist_math": gist_math_loss,
    **dict.fromkeys(("fastcse+q2q", "fastcse+self_guided", "fastcse+guided"), _fastcse_loss),
    "plain": _plain_loss, "inf_cl": inf_cl_loss, "cce": cce_loss}
_PEER_OF_IMPL = {"inf_cl": "inf_cl", "cce": "cut_cross_entropy"}


def _check_runnable(impl: str, batch: int, dim: int, device: torch.device) -> None:
    """Raises Skip where an implementation cannot run: peer missing, or plain's B x N blocks too big."""
    module = _PEER_OF_IMPL.get(impl)
    if module is not None and importlib.util.find_spec(module) is None:
        raise Skip(f"{PEERS[module]} is not installed here (see setup/peer-{module})")
    free = free_memory_bytes(device)
    blocks = MATERIALIZED_BLOCKS.get(impl)
    needed = plain_loss_bytes(batch, 2 * batch) * (blocks or 0)
    if blocks and free is not None and not fits_in_memory(needed, free):
        raise Skip(f"{impl} needs ~{needed / 2**30:.0f} GiB of B x N blocks, "
                   f"over {MEMORY_FRACTION:.0%} of the {free / 2**30:.0f} GiB free")


def measure_loss(impl: str, batch: int, dim: int, dtype: torch.dtype, device: torch.device,
                 floor_s: float | None, plain_call_s: float | None = None) -> Outcome:
    """Forward + backward of one implementation: median time, TFLOP/s of the 6 B N d floor, the bare
    bf16 products' time over this one, extra peak memory, and its loss against fastcse's. A row
    option (ROW_OPTION_IMPLS) also gets its time over fastcse's plain call (``plain_call_s``), and
    its loss is checked against the materialized reference with the same option instead."""
    _check_runnable(impl, batch, dim, device)
    inputs = SpeedInputs.draw(batch, dim, dtype, device)
    row_options = row_option_inputs(impl, batch, dim, dtype, device)
    loss_fn = partial(LOSS_IMPLS[impl], **row_options)

    def step():
        inputs.clear_grads()
        loss = loss_fn(inputs)
        loss.backward()
        return loss

    try:
        value = float(step().detach())  # also the warm-up: compilation, autotuning
        seconds, reps = median_seconds(step, device, warmup=0)
        inputs.clear_grads()  # the last step's gradients are not "before": the step allocates its own
        peak = extra_peak_bytes(step, device)
        with torch.no_grad():
            expected = _expected_loss(impl, value, inputs, row_options, device)
    except torch.cuda.OutOfMemoryError as error:
        raise Skip(f"out of memory: {str(error).splitlines()[0][:200]}") from None
    except NotImplementedError as error:  # a declared gap of this backend (e.g. an option's kernels)
        raise Skip(f"not implemented here: {error}") from None
    finally:
        inputs.clear_grads()
    candidates = _num_candidates(batch, row_options)
    numbers = {"batch": batch, "candidates": candidates, "dim": dim, "dtype": SHORT_DTYPE[dtype], "impl": impl,
               "ms": seconds * 1e3, "reps": reps, "tflops": loss_flops(batch, candidates, dim) / seconds / 1e12,
               # the floor's products are of N = 2B candidates
               "vs_matmul": floor_s / seconds if floor_s and candidates == 2 * batch else None,
               "x_plain_call": seconds / plain_call_s if row_options and plain_call_s else None,
               "peak_mib": peak / 2**20 if peak is not None else None, "loss": value}
    if expected is None:  # the checked value comes from the correctness section
        numbers["loss_check"] = "the materialized reference would not fit: not compared"
        return Outcome(True, numbers)
    rel = abs(value - expected) / max(abs(expected), 1e-6)
    numbers["loss_rel_diff_vs_reference" if row_options else "loss_rel_diff_vs_fastcse"] = rel
    # A peer in bf16 rounds the scaled embeddings (~0.4% each); a wrong scale or target is far off.
    # fastcse's own fp32 options against the fp32 reference: tighter (a dropped mask moves it ~0.3%
    # at B = 32; at scale it is the correctness section's cases that catch that).
    tolerance = 1e-3 if row_options and dtype == torch.float32 else 5e-2
    if rel > tolerance:  # not the same loss: its timing would compare nothing
        against = "the reference with the same option" if row_options else "fastcse"
        return Outcome(False, numbers, f"loss {value:.5g} differs from {against}'s {expected:.5g}")
    return Outcome(True, numbers)


def _num_candidates(batch: int, row_options: dict) -> int:
    """N: the positives and one hard negative per row, and the queue's rows."""
    queue = row_options.get("extra_negatives")
    return 2 * batch + (queue.shape[0] if queue is not None else 0)


def _expected_loss(impl: str, value: float, inputs: SpeedInputs, row_options: dict, device) -> float | None:
    """The loss an implementation must reproduce: fastcse's, or for a row option the materialized
    reference with the same option (None where its B x N blocks would not fit)."""
    if not row_options:
        return value if impl == "fastcse" else float(_fastcse_loss(inputs))
    batch = inputs.anchor.shape[0]
    if not materialized_loss_fits(batch, _num_candidates(batch, row_options), free_memory_bytes(device)):
        return None
    return float(fastcse.info_nce_reference(*inputs.leaves, temperature=inputs.tau, **row_options))


def measure_matmul_floor(batch: int, dim: int, device: torch.device, block_bytes: int = MATMUL_BLOCK_BYTES) -> Outcome:
    """The three bare bf16 products of the same shapes, A C^T, S C and S^T A (N = 2B), chunked
    over rows so that a score block stays below ``block_bytes``: the time no loss can beat."""
    candidates = 2 * batch
    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(batch, dim, device=device, generator=gen).to(torch.bfloat16)
    c = torch.randn(candidates, dim, device=device, generator=gen).to(torch.bfloat16)
    rows = max(1, min(batch, block_bytes // (candidates * 2)))
    grad_c = torch.zeros_like(c)

    def products():
        grad_c.zero_()
        for start in range(0, batch, rows):
            block = a[start:start + rows]
            scores = block @ c.T
            scores @ c  # dA's product
            grad_c.addmm_(scores.T, block)

    seconds, reps = median_seconds(products, device)
    return Outcome(True, {"batch": batch, "candidates": candidates, "dim": dim, "dtype": "bf16", "impl": "matmul floor",
                          "ms": seconds * 1e3, "reps": reps,
                          "tflops": loss_flops(batch, candidates, dim) / seconds / 1e12, "vs_matmul": 1.0})


def speed_plan(batches: Iterable[int], dims: Iterable[int], dtypes: Iterable[torch.dtype], impls: Iterable[str]):
    """(name, case) pairs: for each (B, d) the bare products first, then every dtype x implementation."""
    floors: dict[tuple[int, int], float] = {}
    planned = []

    def floor_case(batch, dim):
        def case(device):
            outcome = measure_matmul_floor(batch, dim, device)
            floors[batch, dim] = outcome.numbers["ms"] / 1e3
            return outcome
        return case

    plain_calls: dict[tuple, float] = {}  # fastcse's plain call per (B, d, dtype), for the row options

    def loss_case(impl, batch, dim, dtype):
        def case(device):
            outcome = measure_loss(impl, batch, dim, dtype, device, floors.get((batch, dim)),
                                   plain_calls.get((batch, dim, dtype)))
            if impl == "fastcse":
                plain_calls[batch, dim, dtype] = outcome.numbers["ms"] / 1e3
            return outcome
        return case

    for batch in batches:
        for dim in dims:
            planned.append((f"B{batch}-d{dim}/bf16-matmul-floor", floor_case(batch, dim)))
            for dtype in dtypes:
                for impl in impls:
                    name = f"B{batch}-d{dim}-{SHORT_DTYPE[dtype]}/{impl}"
                    planned.append((name, loss_case(impl, batch, dim, dtype)))
    return planned



def matryoshka_speed_plan(batch: int, dim: int, dtype: torch.dtype, impls: Iterable[str] = MATRYOSHKA_IMPLS):
    """(name, case) pairs: fastcse's plain call, the per-dimension loop, (MatryoshkaLoss,) and the
    fused Matryoshka call at (B, d, dtype); the fused row's note gives its time over the loop's
    (and MatryoshkaLoss's)."""
    times: dict[str, float] = {}

    def loss_case(impl):
        def case(device):
            outcome = measure_loss(impl, batch, dim, dtype, device, None, times.get("fastcse"))
            times[impl] = outcome.numbers["ms"] / 1e3
            if impl == "fastcse+matryoshka" and outcome.ok:
                _compare_times(outcome, times, {"fastcse+matryoshka_loop": ("x_per_dimension_loop",
                                                                            "the per-dimension loop"),
                                                "matryoshka_mnrl": ("x_matryoshka_loss", "MatryoshkaLoss(MNRL)")})
                outcome.reason += f", dims {MATRYOSHKA_DIMS}"
            return outcome
        return case

    return [(f"B{batch}-d{dim}-{SHORT_DTYPE[dtype]}/matryoshka/{impl}", loss_case(impl)) for impl in impls]


def false_negative_speed_plan(batches: Iterable[int], dim: int, dtype: torch.dtype):
    """(name, case) pairs per B: fastcse in GISTEmbedLoss's directions without the rule (the plain
    call the others are timed against), GISTEmbedLoss's math, fastcse self-guided and guided; the
    last two's notes give their time over GISTEmbedLoss's math."""
    planned = []
    for batch in batches:
        times: dict[str, float] = {}

        def loss_case(impl, batch=batch, times=times):
            def case(device):
                outcome = measure_loss(impl, batch, dim, dtype, device, None, times.get("fastcse+q2q"))
                times[impl] = outcome.numbers["ms"] / 1e3
                if impl in ("fastcse+self_guided", "fastcse+guided") and outcome.ok:
                    _compare_times(outcome, times, {"fastcse+q2q": ("x_plain_call", "the call without the rule"),
                                                    "gist_math": ("x_gist_math", "GISTEmbedLoss's math")})
                return outcome
            return case

        planned += [(f"B{batch}-d{dim}-{SHORT_DTYPE[dtype]}/false_negatives/{impl}", loss_case(impl))
                    for impl in FALSE_NEGATIVE_IMPLS]
    return planned


def _compare_times(outcome: Outcome, times: dict[str, float], against: dict[str, tuple[str, str]]) -> None:
    """For each measured row of ``against`` (impl -> (number's key, label)): this row's time over
    that row's, as the number and in the row's note."""
    own = outcome.numbers["ms"] / 1e3
    notes = []
    for impl, (key, label) in against.items():
        if times.get(impl):
            outcome.numbers[key] = own / times[impl]
            notes.append(f"{own / times[impl]:.2f}x {label}'s time")
    outcome.reason = "; ".join(notes)
