"""info_nce(process_group=...) on 2 and 3 gloo processes against the single-process reference.

Every rank draws the same global batch (one seed per case), keeps its rows, and checks the loss
and its rows' gradients against ``info_nce_reference`` (fp64) on the concatenated batch; the
temperature's per-rank gradients are summed first. The processes are spawned once per world size
and run every case; the parent asserts on the collected failures.
"""

from __future__ import annotations

import datetime
import itertools
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fastcse
from fastcse.distributed import HEADER_TEXT_BYTES, GatherGroup, gather_rows, header_text
from spawn_world import spawn_world

ROOT = Path(__file__).resolve().parent.parent
SPAWN_TIMEOUT_S = 150
MISMATCH_BOUND_S = 20.0


def _cases(world):
    sizes_options = {2: ([4, 4], [3, 6]), 3: ([3, 3, 3], [2, 5, 1])}[world]
    negatives = [(0, 0.0), (1, 0.0), (2, 0.7)]
    cases = []
    for sizes, (k, weight), symmetric, bf16 in itertools.product(sizes_options, negatives, (False, True),
                                                                 (False, True)):
        cases.append(dict(sizes=sizes, k=k, weight=weight, symmetric=symmetric, bf16=bf16, reduction="mean",
                          tau_grad=True, normalize=True, dtype=torch.float32))
    unequal = sizes_options[1]
    cases += [
        dict(sizes=unequal, k=2, weight=0.3, symmetric=True, bf16=False, reduction="none", tau_grad=True,
             normalize=True, dtype=torch.float32),
        dict(sizes=unequal, k=1, weight=0.0, symmetric=False, bf16=False, reduction="sum", tau_grad=False,
             normalize=False, dtype=torch.float32),
        dict(sizes=unequal, k=1, weight=-0.4, symmetric=False, bf16=False, reduction="none", tau_grad=True,
             normalize=True, dtype=torch.float32),
        dict(sizes=unequal, k=2, weight=0.5, symmetric=True, bf16=False, reduction="mean", tau_grad=True,
             normalize=True, dtype=torch.bfloat16),
        dict(sizes=unequal, k=0, weight=0.0, symmetric=True, bf16=True, reduction="none", tau_grad=False,
             normalize=True, dtype=torch.float32),
    ]
    # The Triton backend (interpreted on CPU here) behind the same gather.
    cases.append(dict(sizes=unequal, k=2, weight=0.5, symmetric=True, bf16=False, reduction="mean", tau_grad=True,
                      normalize=True, dtype=torch.float32, backend="triton"))
    # A rank without rows (the last batch of an epoch split over more ranks than it has rows).
    empty_rank = {2: [0, 4], 3: [3, 0, 2]}[world]
    cases += [dict(sizes=empty_rank, k=2, weight=0.5, symmetric=symmetric, bf16=False, reduction=reduction,
                   tau_grad=True, normalize=True, dtype=torch.float32)
              for symmetric, reduction in ((False, "mean"), (True, "none"))]
    # sentence-transformers 6's variants: every direction's keys gathered across ranks.
    gte = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), partition_mode="joint")
    base = dict(sizes=unequal, bf16=False, tau_grad=True, normalize=True, dtype=torch.float32, symmetric=False)
    cases += [
        dict(base, k=2, weight=0.5, reduction="mean", variant=dict(gte, hardness_mode="all_negatives",
                                                                   hardness_strength=3.0)),
        dict(base, k=0, weight=0.0, reduction="none", variant=dict(directions=("query_to_doc", "query_to_query"))),
        dict(base, k=1, weight=0.0, reduction="sum", variant=dict(directions=("query_to_doc", "doc_to_query"),
                                                                  partition_mode="joint",
                                                                  hardness_mode="in_batch_negatives",
                                                                  hardness_strength=2.0)),
        dict(base, k=2, weight=-0.3, reduction="mean", variant=dict(directions=("query_to_doc", "doc_to_query"),
                                                                    partition_mode="per_direction",
                                                                    hardness_mode="hard_negatives",
                                                                    hardness_strength=5.0)),
        dict(base, sizes=empty_rank, k=2, weight=0.0, reduction="none",
             variant=dict(directions=("query_to_doc", "doc_to_doc"))),
        dict(base, k=1, weight=0.0, reduction="mean", variant=gte, backend="triton"),
    ]
    # False negatives, a queue, several positives: ids compared across ranks; the same
    # queue on every rank, not gathered.
    cases += [
        dict(base, k=1, weight=0.4, reduction="mean", ids="group"),
        dict(base, k=0, weight=0.0, reduction="none", ids="label", queue=5),
        dict(base, k=2, weight=0.0, reduction="mean", ids="group", queue=3, variant=dict(gte, hardness_mode="all_negatives",
                                                                                       hardness_strength=2.0)),
        dict(base, k=1, weight=0.0, reduction="sum", ids="label", symmetric=True),
        dict(base, sizes=empty_rank, k=1, weight=0.0, reduction="mean", ids="group", queue=4),
        # The Triton kernels (interpreted) with the gathered ids and a queue.
        dict(base, k=1, weight=0.4, reduction="mean", ids="group", queue=3, backend="triton"),
        dict(base, k=0, weight=0.0, reduction="none", ids="label", symmetric=True, backend="triton"),
    ]
    # fp16, unnormalized and large (the gathered rows sum past fp16's 65504): the empty rank's
    # zero-valued loss must stay 0, not inf * 0 = NaN spread to every rank by the all-reduce.
    cases.append(dict(sizes=empty_rank, k=2, weight=0.5, symmetric=False, bf16=False, reduction="mean",
                      tau_grad=True, normalize=False, dtype=torch.float16, magnitude=500.0))
    return cases


def _global_batch(case, seed, dim=16):
    total = sum(case["sizes"])
    gen = torch.Generator().manual_seed(seed)
    anchor = torch.randn(total, dim, generator=gen)
    positive = anchor + 1.5 * torch.randn(total, dim, generator=gen)
    negative = None
    if case["k"] == 1:
        negative = torch.randn(total, dim, generator=gen)
    elif case["k"] > 1:
        negative = torch.randn(total, case["k"], dim, generator=gen)
    row_weights = torch.rand(total, generator=gen) + 0.5  # upstream gradient for reduction="none"
    # Few distinct ids, so groups / labels span ranks; one queue for every rank.
    ids = torch.randint(0, max(total // 2, 1), (total,), generator=gen)
    queue = torch.randn(case.get("queue", 0), dim, generator=gen)
    if "magnitude" in case:
        # Positive entries of about `magnitude`, rounded to the case's dtype so that the fp64
        # reference sees the very values the ranks hold.
        def large(x):
            return None if x is None else ((x.abs() + 1.0) * case["magnitude"]).to(case["dtype"]).float()

        anchor, positive, negative = large(anchor), large(positive), large(negative)
    return anchor, positive, negative, row_weights, ids, queue


def _check_case(case, seed, group):
    rank = group.rank()
    sizes = case["sizes"]
    start, batch = sum(sizes[:rank]), sizes[rank]
    anchor, positive, negative, row_weights, ids, queue = _global_batch(case, seed)
    tau_value = 0.1
    options = dict(normalize=case["normalize"], symmetric=case["symmetric"], hard_negative_weight=case["weight"],
                   reduction=case["reduction"], **case.get("variant", {}))
    backend = case.get("backend", "cpu")

    def local(x):
        return x[start:start + batch].to(case["dtype"]).requires_grad_()

    mine = [local(anchor), local(positive)] + ([local(negative)] if negative is not None else [])
    id_key = {"group": "group_ids", "label": "labels"}.get(case.get("ids"))
    row_options, ref_row_options = {}, {}
    if id_key:
        row_options[id_key], ref_row_options[id_key] = ids[start:start + batch], ids
    my_queue = ref_queue = None
    if queue.shape[0]:
        my_queue = queue.to(case["dtype"]).clone().requires_grad_()
        ref_queue = queue.double().requires_grad_()
        row_options["extra_negatives"], ref_row_options["extra_negatives"] = my_queue, ref_queue
    tau = torch.tensor(tau_value, requires_grad=True) if case["tau_grad"] else tau_value
    process_group = GatherGroup(group, bf16_transport=True) if case["bf16"] else group
    # A rank without rows goes through the public call too: under a process group B = 0 is allowed.
    loss = fastcse.info_nce(*mine, temperature=tau, process_group=process_group, backend=backend, **options,
                            **row_options)

    full = [t.double().requires_grad_() for t in (anchor, positive) + ((negative,) if negative is not None else ())]
    ref_tau = torch.tensor(tau_value, dtype=torch.float64, requires_grad=True) if case["tau_grad"] else tau_value
    ref = fastcse.info_nce_reference(*full, temperature=ref_tau, **options, **ref_row_options)
    if case["reduction"] == "none":
        # Each rank back-propagates its rows' weighted losses; together they are the global sum.
        (loss * row_weights[start:start + batch]).sum().backward()
        (ref * row_weights).sum().backward()
        ref = ref[start:start + batch]
    else:
        loss.backward()
        ref.backward()

    loose = case["bf16"] or case["dtype"] in (torch.bfloat16, torch.float16)
    tol = dict(rtol=3e-2, atol=3e-2) if loose else dict(rtol=1e-4, atol=1e-5)
    grad_tol = dict(rtol=5e-2, atol=2e-2) if loose else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol, msg=lambda m: f"loss: {m}")
    for name, mine_t, ref_t in zip(("anchor", "positive", "negative"), mine, full):
        assert mine_t.grad is not None, f"{name} got no gradient"
        assert mine_t.grad.dtype == mine_t.dtype, f"{name}.grad is {mine_t.grad.dtype}, input {mine_t.dtype}"
        # Compare gradients relative to their size (which is 0 for rows that never get any weight).
        scale = ref_t.grad.abs().max().item() or 1.0
        torch.testing.assert_close(mine_t.grad.double() / scale, ref_t.grad[start:start + batch] / scale,
                                   **grad_tol, msg=lambda m, n=name: f"grad {n}: {m}")
    if my_queue is not None:  # each rank holds its rows' part of the queue's gradient
        queue_grad = my_queue.grad.detach().clone()
        dist.all_reduce(queue_grad, group=group)
        scale = ref_queue.grad.abs().max().item() or 1.0
        torch.testing.assert_close(queue_grad.double() / scale, ref_queue.grad / scale, **grad_tol,
                                   msg=lambda m: f"grad queue: {m}")
    if case["tau_grad"]:
        tau_grad = tau.grad.detach().clone()
        dist.all_reduce(tau_grad, group=group)  # every rank holds its own part of dL/dtau
        torch.testing.assert_close(tau_grad.double(), ref_tau.grad, **grad_tol, msg=lambda m: f"grad tau: {m}")


def _check_gather_rows(group):
    """The raw op: variable sizes (one rank holds no rows), block-major layout, bf16 on the wire, backward sum."""
    rank, world = group.rank(), group.size()
    sizes, dim = [r * 2 for r in range(world)], 5  # rank 0 sends nothing
    gen = torch.Generator().manual_seed(7)
    first = [torch.randn(n, dim, generator=gen) for n in sizes]
    second = [torch.randn(n + 1, dim, generator=gen) for n in sizes]
    expected = torch.nn.functional.normalize(torch.cat(first + second), dim=1)
    for bf16 in (False, True):
        mine = [first[rank].clone().requires_grad_(), second[rank].clone().requires_grad_()]
        gathered, counts = gather_rows(mine, group, normalize=True, bf16_transport=bf16)
        assert counts.tolist() == [[n, n + 1] for n in sizes], counts
        want = expected.to(torch.bfloat16).float() if bf16 else expected
        torch.testing.assert_close(gathered, want, rtol=0, atol=1e-7, msg=lambda m: f"gathered bf16={bf16}: {m}")
        # d/dx of sum_ranks <gathered, W> with W the same on every rank = world * W's rows, normalized back.
        weights = torch.randn(gathered.shape, generator=torch.Generator().manual_seed(8))
        (gathered * weights).sum().backward()
        full = [t.clone().requires_grad_() for t in (torch.cat(first), torch.cat(second))]
        (torch.nn.functional.normalize(torch.cat(full), dim=1) * weights * world).sum().backward()
        own_first = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
        own_second = slice(sum(sizes[:rank]) + rank, sum(sizes[:rank + 1]) + rank + 1)
        torch.testing.assert_close(mine[0].grad, full[0].grad[own_first], msg=lambda m: f"grad block 0: {m}")
        torch.testing.assert_close(mine[1].grad, full[1].grad[own_second], msg=lambda m: f"grad block 1: {m}")


def _expect_mismatch(group, rank, what, anchor, positive, negative=None):
    """Every rank must raise a RuntimeError naming `what`, quickly; then the group must still work."""
    began = time.monotonic()
    try:
        fastcse.info_nce(anchor, positive, negative, process_group=group)
    except RuntimeError as error:
        elapsed = time.monotonic() - began
        assert what in str(error), f"error does not name the {what}: {error}"
        assert elapsed < MISMATCH_BOUND_S, f"mismatch took {elapsed:.1f}s to detect"
        return str(error)
    raise AssertionError(f"rank {rank}: no error although ranks disagree on the {what}")


def _mismatch_cases(group):
    rank = group.rank()
    dim = 8 if rank == 0 else 6
    _expect_mismatch(group, rank, "embedding dim", torch.randn(3, dim), torch.randn(3, dim))
    dtype = torch.float32 if rank == 0 else torch.float64
    _expect_mismatch(group, rank, "dtype", torch.randn(3, 8, dtype=dtype), torch.randn(3, 8, dtype=dtype))
    k = 1 if rank == 0 else 2
    message = _expect_mismatch(group, rank, "loss options", torch.randn(2, 8), torch.randn(2, 8),
                               torch.randn(2, k, 8))
    assert "k=1" in message and "k=2" in message, message
    # A rank whose own arguments are invalid: every rank raises (none waits for it in a collective).
    rows = torch.randn(2, 3, 8) if rank == group.size() - 1 else torch.randn(2, 8)
    began = time.monotonic()
    with_error = None
    try:
        gather_rows([rows], group)
    except RuntimeError as error:
        with_error = str(error)
    assert with_error is not None and f"rank {group.size() - 1} cannot take part" in with_error \
        and "2-D" in with_error, with_error
    assert time.monotonic() - began < MISMATCH_BOUND_S
    # No collective is left half-done: the group still computes a correct loss.
    _check_case(dict(sizes=[2] * group.size(), k=1, weight=0.0, symmetric=False, bf16=False, reduction="mean",
                     tau_grad=False, normalize=True, dtype=torch.float32), seed=99, group=group)


def _worker(rank, world, port, results):
    failures = []
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        group = dist.group.WORLD
        for index, case in enumerate(_cases(world)):
            torch.manual_seed(0)
            try:
                _check_case(case, seed=1000 * world + index, group=group)
            except AssertionError as error:
                failures.append(f"rank {rank} case {case}: {error}")
        try:
            _check_gather_rows(group)
        except AssertionError as error:
            failures.append(f"rank {rank} gather_rows: {error}")
        try:
            _mismatch_cases(group)
        except AssertionError as error:
            failures.append(f"rank {rank} mismatch: {error}")
        dist.destroy_process_group()
    except Exception:  # a crash is a failure to report, not a hang of the parent
        failures.append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    results.put((rank, failures))


def _expect_input_error(group, bad_rank, bad_kwargs, error_type, match):
    """bad_rank's inputs fail info_nce's checks: it raises error_type naming the argument, every
    other rank a RuntimeError naming bad_rank and the reason; all quickly (the group's timeout is
    INPUT_ERROR_TIMEOUT_S, the bound MISMATCH_BOUND_S)."""
    rank = group.rank()
    kwargs = dict(temperature=0.05)
    if rank == bad_rank:
        kwargs.update(bad_kwargs)
    anchor = kwargs.pop("anchor", torch.randn(3, 8))
    began = time.monotonic()
    try:
        fastcse.info_nce(anchor, torch.randn(3, 8), process_group=group, **kwargs)
    except (RuntimeError, TypeError, ValueError) as error:
        elapsed = time.monotonic() - began
        assert elapsed < MISMATCH_BOUND_S, f"rank {rank}: the error took {elapsed:.1f}s: {error}"
        if rank == bad_rank:
            assert type(error) is error_type and match in str(error), f"rank {rank}: {error!r}"
        else:
            assert isinstance(error, RuntimeError) and f"rank {bad_rank} cannot take part" in str(error) \
                and match in str(error), f"rank {rank}: {error!r}"
        return
    raise AssertionError(f"rank {rank}: no error although rank {bad_rank}'s inputs are invalid")


INPUT_ERROR_TIMEOUT_S = 45


def _input_error_worker(rank, world, port, results):
    failures = []
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=INPUT_ERROR_TIMEOUT_S))
        group = dist.group.WORLD
        cases = [(world - 1, dict(temperature=-1.0), ValueError, "temperature must be a finite positive"),
                 (0, dict(anchor=torch.randn(3, 8).long()), TypeError, "anchor must be float16")]
        for bad_rank, bad_kwargs, error_type, match in cases:
            try:
                _expect_input_error(group, bad_rank, bad_kwargs, error_type, match)
            except AssertionError as error:
                failures.append(str(error))
        # No collective is left half-done: the group still computes a correct loss.
        _check_case(dict(sizes=[2] * world, k=1, weight=0.0, symmetric=False, bf16=False, reduction="mean",
                         tau_grad=False, normalize=True, dtype=torch.float32), seed=98, group=group)
        dist.destroy_process_group()
    except Exception:
        failures.append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    results.put((rank, failures))


def test_one_rank_input_error_is_an_error_on_every_rank():
    """A rank whose check_inputs fails still joins the header exchange, flagged: no rank waits."""
    reports = spawn_world(_input_error_worker, 2, timeout_s=4 * INPUT_ERROR_TIMEOUT_S)
    failures = [f for rank in sorted(reports) for f in reports[rank]]
    assert not failures, "\n\n".join(failures)


def _run_world(world):
    reports = spawn_world(_worker, world, timeout_s=SPAWN_TIMEOUT_S)
    failures = [f for rank in sorted(reports) for f in reports[rank]]
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_process_reference(world):
    """Loss and gradients of every input, all cases of _cases(world), then rank-mismatch errors."""
    _run_world(world)


def test_cases_cover_the_issue():
    cases = _cases(2)
    assert {c["k"] for c in cases} == {0, 1, 2} and any(c["weight"] for c in cases)
    assert {c["symmetric"] for c in cases} == {False, True} and {c["bf16"] for c in cases} == {False, True}
    assert any(len(set(c["sizes"])) > 1 for c in cases) and any(len(set(c["sizes"])) == 1 for c in cases)
    assert {c["reduction"] for c in cases} == {"mean", "sum", "none"}
    assert any(0 in c["sizes"] for c in cases) and any(c.get("backend") == "triton" for c in cases)
    assert any(0 in c["sizes"] and c["dtype"] == torch.float16 and not c["normalize"] for c in cases)
    assert {c.get("ids") for c in cases} >= {"group", "label"} and any(c.get("queue") for c in cases)
    assert any(c.get("ids") and 0 in c["sizes"] for c in cases)
    assert {c.get("ids") for c in cases if c.get("backend") == "triton"} >= {"group", "label"}
    directions = {d for c in cases for d in c.get("variant", {}).get("directions", ())}
    assert directions == {"query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"}
    assert {c.get("variant", {}).get("hardness_mode") for c in cases} >= {"all_negatives", "in_batch_negatives",
                                                                          "hard_negatives"}


def test_long_options_fit_the_header_and_still_tell_ranks_apart():
    """The gather compares the loss options in a 255-byte field: a longer text (every direction,
    Matryoshka weights, a false-negative rule) is cut and ends with its digest, so two texts that
    differ only past the cut still differ, and one that fits is sent as it is."""
    short = "k=1 variant=query_to_doc;joint;;0.0 tau=0.05"
    assert header_text(short) == short
    long_a = "x" * 300 + " matryoshka=(64, 768):(0.5, 1.0)"
    long_b = "x" * 300 + " matryoshka=(64, 768):(0.5, 2.0)"
    for text in (long_a, long_b):
        assert len(header_text(text).encode()) == HEADER_TEXT_BYTES
        assert header_text(text).startswith("x" * 100)
    assert header_text(long_a) != header_text(long_b)
    assert header_text(long_a) == header_text(long_a)
    # The limit is the C++ header's field less its terminator.
    source = (ROOT / "kernels" / "gather_rows.cpp").read_text()
    assert f"constexpr int64_t kOptionBytes = {HEADER_TEXT_BYTES + 1};" in source


def test_unbuilt_extension_says_how_to_build():
    code = ("import sys; sys.modules['fastcse._C'] = None\n"
            "import fastcse.distributed as d\n"
            "try:\n    d.load_extension()\nexcept RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install --no-build-isolation -e ." in out.stdout, out.stdout + out.stderr


def test_process_group_without_init_is_a_clear_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        fastcse.info_nce(torch.randn(2, 4), torch.randn(2, 4), process_group=GatherGroup())


EXIT_WORKER_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from fastcse.distributed import exit_worker
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
atexit.register(print, "the interpreter's shutdown ran")
print("work done", end="")
print("warning", end="", file=sys.stderr)
exit_worker(3)
"""


def test_exit_worker_flushes_then_skips_the_interpreters_shutdown(tmp_path):
    """What was printed arrives, the code is the process's, and no atexit handler runs."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, so the flush shows
    out = subprocess.run([sys.executable, "-c", EXIT_WORKER_SCRIPT, str(tmp_path / "store")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert (out.returncode, out.stdout, out.stderr) == (3, "work done", "warning")


def test_example_prints_the_single_process_loss():
    """examples/distributed_info_nce.py under torchrun (2 gloo ranks, 16 + 15 triples a step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "examples/distributed_info_nce.py", "--steps", "3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    steps = [line.split() for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3, out.stdout
    for words in steps:
        distributed, single = float(words[words.index("ranks)") + 1]), float(words[-1])
        assert abs(distributed - single) < 1e-5 * abs(single), words
    gap = float(out.stdout.rsplit("=", 1)[1])
    assert gap < 1e-5, out.stdout
