"""The GPU validation kit (``python -m fastcse gpu-check``), proven on the CPU.

The harness runs here through the Triton interpreter (``--interpret``) on a few cases: it writes
well-formed results, passes on the real kernels and FAILS (exit 1) on a deliberately broken
one; without CUDA and without ``--interpret`` it exits 2 with one line. The pure helpers
(comparisons, budgets, tables, memory and FLOP arithmetic, variant planning, wheel install,
extension loading) and the speed and sentence-transformers sections' machinery are unit-tested
on CPU tensors.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fastcse
from fastcse.gpu_check import main, no_cuda_message, selector
from fastcse.gpu_check.cases import SHAPES, LossCase
from fastcse.gpu_check.correctness import (BASE_KEYWORDS, TEMPERATURES, VARIANTS, check_half_temperature,
                                           check_loss_case, correctness_plan, grid_cases, half_subset_cases,
                                           half_temperature_cases, plan_variants, variant_cases)
from fastcse.gpu_check.extension import (_copy_build_sources, extension_build_env, has_cuda_pack_kernel,
                                         importable_extension)
from fastcse.gpu_check.markdown import markdown_table, render_markdown
from fastcse.gpu_check.peers import _install_wheel, inf_cl_head_dim, install_peer
from fastcse.gpu_check.report import Budget, Report, Section, _json_safe, write_atomically
from fastcse.gpu_check.rule_inputs import GAP_NEEDED, MARGINS, clustered_rows, level_gap, threshold_gap
from fastcse.gpu_check.runner import speed_section_plan
from fastcse.gpu_check.results import CORRECTNESS, FAIL, PASS, SETUP, SKIPPED, SPEED, Outcome, Skip, skip_case
from fastcse.gpu_check.speed import (LOSS_IMPLS, SPEED_IMPLS, _fastcse_loss, fits_in_memory, free_memory_bytes,
                                     loss_flops, measure_loss, plain_loss_bytes, speed_plan, speed_queue_size)
from fastcse.gpu_check import speed as speed_module
from fastcse.gpu_check.st_step import MINILM_L6, ST_LOSSES, random_sentences, st_step_plan
from fastcse.testing import (HALF_PRECISION_CASES, HALF_PRECISION_WEIGHT, OPTION_GRID, TEMPERATURE_CASES, TOL,
                             agreement, compare_results, loss_and_grads, row_agreement, temperature_floor,
                             temperature_floors)

ROOT = Path(__file__).resolve().parents[1]
INTERPRET = SHAPES["interpret"]


def _plan_names(plan) -> list[str]:
    return [name for name, _ in plan]


def _correctness_name(*parts: str) -> str:
    """The first interpret-profile correctness case whose name contains every part."""
    names = [n for n in _plan_names(correctness_plan(INTERPRET)) if all(p in n for p in parts)]
    assert names, parts
    return f"correctness/{names[0]}"


# A grid case on the fused-gradient path (sum), one on the recompute path (symmetric, none),
# and 16-bit zero and tiny rows (row-wise comparison with the sign rule).
FUSED = _correctness_name("fp32/", "norm-w0.7-sum")
RECOMPUTE = _correctness_name("fp32/", "norm-sym-w-0.4-none")
ZERO_ROWS = _correctness_name("bf16/", "zero-tiny-rows", "-none-")


def _run_kit(tmp_path: Path, *only: str, extra: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    out = tmp_path / "out"
    argv = ["--interpret", "--out", str(out), *extra]
    for text in only:
        argv += ["--only", text]
    code = main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md"]  # no temporaries left
    report = json.loads((out / "gpu_check.json").read_text())
    return code, report, (out / "gpu_check.md").read_text()


def _assert_well_formed(report: dict, markdown: str) -> None:
    assert report["schema"] == 1 and report["finished"] is True and report["mode"] == "interpret"
    assert report["environment"]["triton_interpret"] is True
    assert report["environment"]["versions"]["torch"] == torch.__version__
    statuses = [c["status"] for c in report["checks"]]
    assert set(statuses) <= {PASS, FAIL, SKIPPED}
    assert report["counts"] == {s: statuses.count(s) for s in (PASS, FAIL, SKIPPED)}
    for check in report["checks"]:
        assert check["full_name"] == f"{check['section']}/{check['name']}"
        assert check["kind"] in (CORRECTNESS, SPEED, SETUP)
        assert check["status"] != SKIPPED or check["reason"], check  # a skip always says why
    assert markdown.startswith("# fastcse gpu-check (interpret)")
    counts = report["counts"]
    assert f"{counts['pass']} pass, {counts['fail']} fail, {counts['skipped']} skipped" in markdown


# --------------------------------------------------------------------------------------------
# (a) the harness, through the interpreter
# --------------------------------------------------------------------------------------------


def test_interpret_run_passes_and_writes_json_and_markdown(tmp_path, capsys):
    code, report, markdown = _run_kit(tmp_path, FUSED, RECOMPUTE, ZERO_ROWS, "determinism/fp32",
                                      "compile/aot_eager/fp32", "distributed/process_group/fp32",
                                      "distributed/pack/fp16")
    _assert_well_formed(report, markdown)
    ran = {c["full_name"]: c for c in report["checks"] if c["status"] == PASS}
    assert {FUSED, RECOMPUTE, ZERO_ROWS} <= set(ran), report["checks"]
    assert any(n.startswith("determinism/fp32") for n in ran) and any(n.startswith("compile/") for n in ran)
    for name in (FUSED, RECOMPUTE):
        numbers = ran[name]["numbers"]
        assert numbers["tol"] == 2e-4 and 0 <= numbers["loss_error"] < 2e-4
        assert {"anchor_error", "positive_error", "negative_error", "temperature_error"} <= set(numbers)
    if importable_extension() is not None:  # fastcse._C built (scripts/setup.sh): the gloo world of one ran
        assert any(n.startswith("distributed/process_group/") for n in ran)
        assert "distributed/pack/fp16" in ran
    skipped = {c["full_name"]: c["reason"] for c in report["checks"] if c["status"] == SKIPPED}
    assert "CUDA" in skipped["speed/all"] and "CUDA" in skipped["st_step/all"]
    assert code == 0
    assert "## Correctness" in markdown and f"| {FUSED} | pass |" in markdown
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("gpu-check: ")


def test_a_broken_backend_fails_the_check_and_the_exit_code(tmp_path, monkeypatch):
    """A harness that cannot fail is worthless: the Triton backend's loss scaled by 1.01."""
    from fastcse import triton_info_nce

    real_forward = triton_info_nce.forward

    def forward_off_by_one_percent(*args, **kwargs):
        row_loss, *rest = real_forward(*args, **kwargs)
        return (row_loss * 1.01, *rest)

    monkeypatch.setattr(triton_info_nce, "forward", forward_off_by_one_percent)
    code, report, markdown = _run_kit(tmp_path, FUSED, RECOMPUTE)
    assert code == 1
    failed = {c["full_name"]: c for c in report["checks"] if c["status"] == FAIL}
    assert set(failed) == {FUSED, RECOMPUTE}
    for check in failed.values():
        assert check["kind"] == CORRECTNESS and check["reason"].startswith("loss: error")
        assert check["numbers"]["loss_error"] > 2e-4
    assert report["correctness_failed"] is True
    assert "## Failures" in markdown and FUSED in markdown


def test_spent_budgets_skip_cases_and_say_so(tmp_path):
    code, report, _ = _run_kit(tmp_path, FUSED, "determinism/", extra=("--budget-scale", "0"))
    assert code == 0
    checks = {c["full_name"]: c for c in report["checks"] if not c["full_name"].endswith("/all")}
    assert FUSED in checks and any(n.startswith("determinism/") for n in checks)
    for check in checks.values():
        assert check["status"] == SKIPPED and check["reason"].startswith("time budget: section"), check
    assert report["sections"]["correctness"]["skipped_for_budget"] == 1


def _env_without_interpret() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def test_cli_sets_triton_interpret_before_the_kernels_are_imported(tmp_path):
    """`python -m fastcse` imports fastcse first: neither it nor the CLI may import the kernels'
    module (or triton) before gpu-check has set TRITON_INTERPRET=1, else backend="triton" refuses
    CPU tensors and every case fails."""
    probe = ("import sys, fastcse.__main__ as cli; cli.build_parser(); "
             "print(sorted(m for m in sys.modules if m == 'triton' or m == 'fastcse.triton_info_nce'))")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                              env=_env_without_interpret(), cwd=ROOT)
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported.stdout + imported.stderr

    case = _correctness_name("fp32/B1-k0-d8")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastcse", "gpu-check", "--interpret", "--only", case, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_env_without_interpret(), cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["environment"]["triton_interpret"] is True
    assert [c["status"] for c in report["checks"] if c["full_name"] == case] == [PASS]
    assert done.stdout.strip().splitlines()[-1].startswith("gpu-check: 1 pass, 0 fail")


# --------------------------------------------------------------------------------------------
# (b) no CUDA, no --interpret: exit 2, one line
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "fastcse", "gpu-check", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=_env_without_interpret(), cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device found"), done.stderr
    assert "--interpret" in lines[0] and done.stdout == ""
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# (c) the pure helpers
# --------------------------------------------------------------------------------------------


def test_the_kit_enumerates_the_test_suites_cases():
    """The option grid, the 16-bit cases and the temperatures are fastcse.testing's, read into LossCase fields."""
    grid = grid_cases(INTERPRET, torch.float32)
    assert [(c.normalize, c.symmetric, c.num_neg, c.weight, c.reduction) for c in grid] == list(OPTION_GRID)
    half = half_subset_cases(INTERPRET)
    assert [(c.normalize, c.symmetric, c.num_neg, c.reduction, c.tau) for c in half] == list(HALF_PRECISION_CASES) * 2
    assert {c.dtype for c in half} == {torch.float16, torch.bfloat16}
    assert all(c.weight == HALF_PRECISION_WEIGHT and c.tol == TOL[c.dtype] for c in half)
    assert set(TEMPERATURE_CASES) < set(TEMPERATURES)


def test_flops_and_memory_estimates():
    assert loss_flops(4096, 8192, 768) == 6 * 4096 * 8192 * 768
    assert plain_loss_bytes(65536, 131072) == 3 * 65536 * 131072 * 4  # ~103 GB: skipped on an H200
    free_h200 = 139 * 2**30
    assert fits_in_memory(plain_loss_bytes(16384, 32768), free_h200)
    assert not fits_in_memory(plain_loss_bytes(65536, 131072), free_h200)
    assert fits_in_memory(60, 100) and not fits_in_memory(61, 100)
    assert free_memory_bytes(torch.device("cpu")) is None
    assert [inf_cl_head_dim(d) for d in (768, 1024, 384, 48)] == [256, 256, 128, 16]
    with pytest.raises(Skip, match="divisible by 16"):
        inf_cl_head_dim(100)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_and_section_skip_once_spent(tmp_path):
    clock = _Clock()
    budget = Budget(10, clock)
    assert budget.left() == 10 and not budget.spent()
    clock.now = 10.0
    assert budget.spent() and budget.elapsed() == 10.0

    clock.now = 0.0
    report = Report(tmp_path, "unit", {}, clock)
    section = Section(report, "s", 5, selector(["s/keep", "s/other"]), torch.device("cpu"), clock)

    def slow_case():
        clock.now += 6.0
        return Outcome(True, {"x": 1})

    assert section.run("dropped", slow_case) is None  # deselected by --only: not run, not reported
    first = section.run("keep-1", slow_case)
    second = section.run("keep-2", slow_case)
    forced = section.run("other-required", lambda: Outcome(True), required=True)
    assert (first.status, first.seconds, first.numbers) == (PASS, 6.0, {"x": 1})
    assert second.status == SKIPPED and "used its 5 s" in second.reason
    assert forced.status == PASS  # a step the selected cases need runs regardless
    section.close()
    assert report.sections["s"]["skipped_for_budget"] == 1
    assert (tmp_path / "gpu_check.json").exists() and (tmp_path / "gpu_check.md").exists()


def test_section_records_failures_skips_and_crashes(tmp_path):
    report = Report(tmp_path, "unit", {})
    section = Section(report, "s", 60, selector(None), torch.device("cpu"))
    section.run("fails", lambda: Outcome(False, {}, "off by 1%"))
    section.run("skips", skip_case("no peer here"))
    section.run("crashes", lambda: 1 / 0)
    section.run("speed-fails", lambda: Outcome(False), SPEED)
    by_name = {c.name: c for c in report.checks}
    assert by_name["fails"].status == FAIL and by_name["fails"].reason == "off by 1%"
    assert by_name["skips"].status == SKIPPED and by_name["skips"].reason == "no peer here"
    assert by_name["crashes"].status == FAIL and by_name["crashes"].reason.startswith("ZeroDivisionError")
    assert "traceback" in by_name["crashes"].numbers
    assert report.exit_code() == 1
    only_speed = Report(tmp_path, "unit", {})
    only_speed.add(by_name["speed-fails"])
    assert only_speed.exit_code() == 0  # a failed speed row is reported, not fatal


def test_markdown_table():
    table = markdown_table(["name", "value", "ok"], [("a|b", 0.000123456, True), ("c", 1234.5678, None),
                                                         ("d", 2.0, False), ("e", float("inf"), 7)])
    lines = table.splitlines()
    assert lines[0] == "| name | value | ok |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 1.23e-04 | yes |"
    assert lines[3] == "| c | 1234.6 |  |"
    assert lines[4] == "| d | 2 | no |" and lines[5] == "| e | inf | 7 |"
    with pytest.raises(ValueError, match="cells"):
        markdown_table(["one"], [(1, 2)])


def test_write_atomically_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.json"
    write_atomically(target, "first")
    write_atomically(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_json_is_strict():
    safe = _json_safe({"a": float("nan"), "b": [float("inf"), 1.5], "c": torch.float16, "d": None})
    assert json.loads(json.dumps(safe, allow_nan=False)) == {"a": "nan", "b": ["inf", 1.5], "c": "torch.float16",
                                                              "d": None}


def test_agreement_is_the_suites_rule():
    ref = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert agreement(ref.float() * (1 + 1e-5), ref, 2e-4).ok
    off = agreement(ref.float() * 1.01, ref, 2e-4)
    assert not off.ok and off.error == pytest.approx(0.005, rel=1e-3)  # 0.02 / (scale 2 + |-2|)
    assert agreement(torch.tensor([1.0]), torch.tensor([1.0 + 4e-4], dtype=torch.float64), 2e-4).ok  # 2 tol
    assert not agreement(torch.tensor([1.0, float("nan"), 0.5]), ref, 1.0).ok
    assert not agreement(ref[:2].float(), ref, 1.0).ok
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # the reported error and the verdict agree: ok exactly when error <= tol
        want = torch.randn(6, generator=gen, dtype=torch.float64)
        got = (want * (1 + 4e-4 * torch.randn(6, generator=gen, dtype=torch.float64))).float()
        result = agreement(got, want, 2e-4)
        assert result.ok == (result.error <= 2e-4)
    tiny = torch.tensor([1e-9, 0.0])  # below the floor: an absolute tol * 1e-2 applies
    assert agreement(tiny + 1e-7, tiny.double(), 2e-4).ok and not agreement(tiny + 1e-5, tiny.double(), 2e-4).ok


def test_row_agreement_checks_each_row_and_only_signs_past_the_range():
    ref = torch.tensor([[1e-3, -2e-3], [1e12, -1e12], [5.0, 1.0]], dtype=torch.float64)
    got = torch.tensor([[1.0005e-3, -2e-3], [float("inf"), float("-inf")], [5.0, 1.0]], dtype=torch.float16)
    assert row_agreement(got, ref, 2e-2).ok  # a whole-tensor scale of 1e12 would hide row 0
    wrong_sign = got.clone()
    wrong_sign[1, 0] = float("-inf")
    assert not row_agreement(wrong_sign, ref, 2e-2).ok
    off_row = got.clone()
    off_row[0, 1] = -3e-3
    assert not row_agreement(off_row, ref, 2e-2).ok
    nan = got.clone()
    nan[2, 0] = float("nan")
    assert "NaN" in row_agreement(nan, ref, 2e-2).detail


def test_compare_results_names_the_worst_and_the_missing():
    want = {"loss": torch.tensor(2.0, dtype=torch.float64), "anchor": torch.ones(2, 2, dtype=torch.float64),
            "temperature": torch.tensor(1.0, dtype=torch.float64)}
    got = {"loss": torch.tensor(2.0), "anchor": torch.ones(2, 2) * 1.001, "temperature": None}
    outcome = compare_results(got, want, 2e-4)
    assert not outcome.ok and outcome.numbers["worst_grad"] == "anchor"
    assert "temperature: missing" in outcome.reason and "anchor: error" in outcome.reason


def test_variants_are_planned_from_the_signatures():
    def loss(anchor, positive, negative=None, *, temperature=0.05, directions=None, partition_mode=None,
             hardness_mode=None, hardness_strength=0.0, group_ids=None, brand_new=None, backend="auto"):
        pass

    def reference(anchor, positive, negative=None, *, temperature=0.05, directions=None, partition_mode=None,
                  group_ids=None):
        pass

    planned = dict(plan_variants(loss, reference, lambda v: variant_cases(INTERPRET, v)))
    names = list(planned)
    assert any(n.startswith("variant/directions-all-joint/fp32/") for n in names)
    assert any(n.startswith("variant/group_ids-pairs/bf16/") for n in names)

    def reason(name):
        with pytest.raises(Skip) as why:
            planned[name](torch.device("cpu"))
        return str(why.value)

    assert "info_nce_reference does not" in reason("variant/hardness-hard_negatives")
    assert "has no extra_negatives" in reason("variant/extra_negatives-7")
    assert "no case" in reason("variant/brand_new")


def test_a_declared_gap_is_skipped_with_its_reason_not_failed(monkeypatch):
    def not_yet(*args, **kwargs):
        raise NotImplementedError("a new option runs on backend='cpu' only for now (its kernels come later)")

    monkeypatch.setattr(fastcse, "info_nce", not_yet)
    with pytest.raises(Skip, match=r"not implemented on backend=.triton.: a new option runs on .*\(its kernels come "
                                   r"later\)"):
        check_loss_case(LossCase(4, 0, 8), torch.device("cpu"))


def test_plans_have_unique_names_and_cover_the_spec():
    for profile, shapes in SHAPES.items():
        names = _plan_names(correctness_plan(shapes))
        assert len(names) == len(set(names)), profile
        assert {n.split("/")[0] for n in names if not n.startswith("variant/")} == {"fp32", "fp16", "bf16"}
    full = " ".join(_plan_names(correctness_plan(SHAPES["full"])))
    for dim in (64, 384, 768, 1024, 100):  # d in {64, 384, 768, 1024} and not a power of two
        assert f"-d{dim}/" in full
    assert "B1-" in full and "zero-tiny-rows" in full and "-float" in full and "dot-" in full
    speed = _plan_names(speed_plan((16384,), (768,), (torch.bfloat16,), SPEED_IMPLS))
    assert speed == ["B16384-d768/bf16-matmul-floor"] + [f"B16384-d768-bf16/{i}" for i in SPEED_IMPLS]


def test_no_cuda_message_is_one_line():
    assert "\n" not in no_cuda_message() and "--interpret" in no_cuda_message()


def test_extension_build_environment_and_sources(tmp_path):
    env = extension_build_env("9.0")
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and int(env["MAX_JOBS"]) >= 1
    assert "TORCH_CUDA_ARCH_LIST" not in extension_build_env(None) or os.environ.get("TORCH_CUDA_ARCH_LIST")
    _copy_build_sources(ROOT, tmp_path)
    assert (tmp_path / "setup.py").exists() and (tmp_path / "kernels" / "pack_cuda.cu").exists()
    assert not list((tmp_path / "fastcse").glob("*.so"))  # a stale library would shadow the new build


def _make_wheel(folder: Path, name: str, tag: str = "py3-none-any") -> Path:
    wheel = folder / f"{name}-1.0-{tag}.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        archive.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        listed = (f"{name}/__init__.py", f"{info}/METADATA", f"{info}/WHEEL", f"{info}/RECORD")
        archive.writestr(f"{info}/RECORD", "".join(f"{entry},,\n" for entry in listed))
    return wheel


def test_peer_wheels_install_into_a_target_or_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = "fastcse_gpu_check_peer"
    wheels = tmp_path / "whl"
    wheels.mkdir()
    with pytest.raises(Skip, match="fetch_gpu_wheels.sh"):
        install_peer(name, wheels, tmp_path / "target")
    _make_wheel(wheels, name)
    outcome = install_peer(name, wheels, tmp_path / "target")
    try:
        assert outcome.ok, outcome.reason
        assert outcome.numbers["from"] == f"{name}-1.0-py3-none-any.whl"
        assert __import__(name).VALUE == 42 and str(tmp_path / "target") in sys.path
    finally:
        sys.modules.pop(name, None)
    assert "not a pure-Python wheel" in _install_wheel(_make_wheel(wheels, "native", "cp312-cp312-linux_x86_64"),
                                                          tmp_path / "t2")


def test_an_extension_library_loads_as_fastcse_C_from_anywhere(tmp_path):
    built = sorted((ROOT / "fastcse").glob("_C*.so"))
    if not built:
        pytest.skip("fastcse._C is not built in this checkout (scripts/setup.sh builds it)")
    copy = tmp_path / built[0].name
    shutil.copy2(built[0], copy)
    probe = ("import sys, torch; from pathlib import Path; "
             "from fastcse.gpu_check.extension import load_extension_module; "
             "load_extension_module(Path(sys.argv[1])); import fastcse._C as m; "
             "assert m.__file__ == sys.argv[1], m.__file__; assert torch.ops.fastcse.gather_rows.default; print('ok')")
    done = subprocess.run([sys.executable, "-c", probe, str(copy)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert has_cuda_pack_kernel(copy) == (b"pack_rows_cuda" in copy.read_bytes())


# --------------------------------------------------------------------------------------------
# The speed and sentence-transformers sections' machinery, on the CPU
# --------------------------------------------------------------------------------------------


def test_speed_rows_on_cpu(tmp_path):
    device = torch.device("cpu")
    report = Report(tmp_path, "unit", {})
    section = Section(report, "speed", 60, selector(None), device)
    for name, case in speed_plan((32,), (16,), (torch.float32,), ("fastcse", "plain")):
        section.run(name, lambda c=case: c(device), SPEED)
    rows = {c.name: c for c in report.checks}
    assert all(c.status == PASS for c in rows.values()), [(c.name, c.reason) for c in rows.values()]
    floor = rows["B32-d16/bf16-matmul-floor"].numbers
    ours = rows["B32-d16-fp32/fastcse"].numbers
    assert ours["candidates"] == 64 and ours["ms"] > 0 and ours["peak_mib"] is None
    assert ours["tflops"] == pytest.approx(loss_flops(32, 64, 16) / (ours["ms"] / 1e3) / 1e12)
    assert ours["vs_matmul"] == pytest.approx(floor["ms"] / ours["ms"])
    assert rows["B32-d16-fp32/plain"].numbers["loss_rel_diff_vs_fastcse"] < 1e-5  # the same loss
    markdown = render_markdown(report)
    assert "## Loss forward + backward" in markdown and "| 32 | 64 | 16 | fp32 | plain |" in markdown


def test_row_option_speed_rows_on_cpu(tmp_path):
    """The row options (group ids, a queue): timed beside fastcse's plain call, their loss checked against the
    reference with the same option; the queue's N is 2B + Q and has no N = 2B floor ratio."""
    device = torch.device("cpu")
    report = Report(tmp_path, "unit", {})
    section = Section(report, "speed", 60, selector(None), device)
    impls = ("fastcse", "fastcse+group_ids", "fastcse+queue")
    for name, case in speed_plan((32,), (16,), (torch.float32,), impls):
        section.run(name, lambda c=case: c(device), SPEED)
    rows = {c.name: c for c in report.checks}
    assert all(c.status == PASS for c in rows.values()), [(c.name, c.reason) for c in rows.values()]
    plain, groups, queue = (rows[f"B32-d16-fp32/{i}"].numbers for i in impls)
    assert plain["x_plain_call"] is None and "loss_rel_diff_vs_fastcse" in plain
    assert groups["x_plain_call"] == pytest.approx(groups["ms"] / plain["ms"])
    assert groups["candidates"] == 64 and groups["vs_matmul"] is not None
    assert groups["loss_rel_diff_vs_reference"] < 1e-5 and groups["loss"] != pytest.approx(plain["loss"])
    assert queue["candidates"] == 64 + speed_queue_size(32) == 192 and queue["vs_matmul"] is None
    assert queue["loss_rel_diff_vs_reference"] < 1e-5 and queue["x_plain_call"] > 0
    assert "| fastcse+group_ids |" in render_markdown(report)


def test_matryoshka_speed_rows_on_cpu(tmp_path, monkeypatch):
    """The fused Matryoshka call beside the per-dimension loop: the same loss (the reference's), and the
    fused row's note gives its time over the loop's."""
    monkeypatch.setattr(speed_module, "MATRYOSHKA_DIMS", (16, 9, 3))
    device = torch.device("cpu")
    report = Report(tmp_path, "unit", {})
    section = Section(report, "speed", 60, selector(None), device)
    for name, case in speed_module.matryoshka_speed_plan(32, 16, torch.float32):
        section.run(name, lambda c=case: c(device), SPEED)
    rows = {c.name.rsplit("/", 1)[1]: c for c in report.checks}
    assert list(rows) == list(speed_module.MATRYOSHKA_IMPLS)
    assert all(c.status == PASS for c in rows.values()), [(c.name, c.reason) for c in rows.values()]
    loop, fused = rows["fastcse+matryoshka_loop"].numbers, rows["fastcse+matryoshka"].numbers
    assert loop["loss_rel_diff_vs_reference"] < 1e-5 and fused["loss_rel_diff_vs_reference"] < 1e-5
    assert fused["loss"] == pytest.approx(loop["loss"], rel=1e-5)
    assert fused["x_per_dimension_loop"] == pytest.approx(fused["ms"] / loop["ms"])
    assert "the per-dimension loop" in rows["fastcse+matryoshka"].reason


def test_a_row_option_with_a_wrong_loss_fails(tmp_path, monkeypatch):
    """The value check of a row option is against the reference with the option, not the plain loss."""
    monkeypatch.setitem(LOSS_IMPLS, "fastcse+group_ids", lambda x, **options: _fastcse_loss(x))  # ignores ids
    outcome = measure_loss("fastcse+group_ids", 32, 16, torch.float32, torch.device("cpu"), None, None)
    assert not outcome.ok and "the reference with the same option" in outcome.reason


def _shared_tokenizer() -> Path:
    from fastcse.evaluation import shared_dir

    return shared_dir() / "models" / "all-MiniLM-L6-v2"


@pytest.mark.slow
def test_sentence_transformers_step_on_a_tiny_random_model(tmp_path):
    pytest.importorskip("sentence_transformers")
    tokenizer = _shared_tokenizer()
    if not (tokenizer / "tokenizer_config.json").exists():
        pytest.skip(f"no tokenizer at {tokenizer}")
    device = torch.device("cpu")
    report = Report(tmp_path / "out", "unit", {})
    section = Section(report, "st_step", 300, selector(None), device)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    for name, case in st_step_plan(tokenizer, tmp_path, sizes, batch=8, mini_batch=4):
        section.run(name, lambda c=case: c(device))
    checks = {c.name: c for c in report.checks}
    assert set(checks) == {"agrees/fastcse-vs-mnrl", "agrees/fastcse_cached-vs-cached_mnrl"} | \
        {f"time/{n}" for n in ST_LOSSES}
    assert all(c.status == PASS for c in checks.values()), [(c.name, c.reason) for c in checks.values()]
    assert checks["agrees/fastcse-vs-mnrl"].numbers["loss_error"] < 2e-4
    assert checks["time/fastcse_cached"].numbers["mini_batch"] == 4 and checks["time/mnrl"].numbers["ms"] > 0
    saved = json.loads((tmp_path / "minilm-random" / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in saved] == ["Transformer", "Pooling"]


def test_sentence_transformers_step_without_a_tokenizer_is_skipped(tmp_path):
    planned = st_step_plan(tmp_path / "missing", tmp_path, MINILM_L6, 8, 4)
    with pytest.raises(Skip):
        planned[0][1](torch.device("cpu"))
    with pytest.raises(Skip):  # the cached failure: not rebuilt by every case
        planned[-1][1](torch.device("cpu"))


def test_random_sentences_are_reproducible_words():
    vocab = {"alpha": 0, "beta": 1, "##ing": 2, "[CLS]": 3, "gamma": 4, "café": 5}
    first = random_sentences(vocab, 20, seed=3)
    assert first == random_sentences(vocab, 20, seed=3) and len(first) == 20
    assert set(" ".join(first).split()) <= {"alpha", "beta", "gamma"}


def test_the_kit_tracks_this_fastcse():
    # The base keywords are info_nce's own; anything else is a variant (checked or reported).
    assert BASE_KEYWORDS <= set(inspect.signature(fastcse.info_nce).parameters)


# --------------------------------------------------------------------------------------------
# False negatives by similarity and Matryoshka: the cases' inputs and the option rows
# --------------------------------------------------------------------------------------------

FALSE_NEGATIVE_VARIANTS = [v for v in VARIANTS if v.label.startswith("false_negatives")]


def _variant_case(label: str, dtype: torch.dtype, shapes=INTERPRET) -> tuple[LossCase, dict]:
    variant = next(v for v in VARIANTS if v.label == label)
    case = next(c for c in variant_cases(shapes, variant) if c.dtype == dtype)
    return case, variant.make(case.batch, case.dim, case.dtype, torch.device("cpu"), case.num_neg)


@pytest.mark.parametrize("profile", list(SHAPES))
def test_false_negative_cases_keep_a_gap_around_every_threshold(profile):
    """At every profile's shape (the GPU's included) no cell of the rule lies within 2^-8 of its
    row's threshold: the kernels and the fp64 reference leave out the same keys."""
    assert {v.label for v in FALSE_NEGATIVE_VARIANTS} >= {
        "false_negatives-self-relative", "false_negatives-self-absolute-all-directions", "false_negatives-guided",
        "false_negatives-guided-q2d-d2q", "false_negatives-guided-queue"}
    for variant in FALSE_NEGATIVE_VARIANTS:
        for case in variant_cases(SHAPES[profile], variant):
            keywords = variant.make(case.batch, case.dim, case.dtype, torch.device("cpu"), case.num_neg)
            gap = threshold_gap(case.inputs(), keywords)
            assert gap >= GAP_NEEDED, (variant.label, case.name, gap)
    for strategy in MARGINS:
        assert level_gap(strategy) >= 0.05


def test_clustered_rows_leave_keys_out_in_every_direction_and_keep_others():
    """The levels: with the absolute margin each direction has cells left out and cells kept beyond
    the targets; the rule changes the reference's loss (the cases check something)."""
    anchor, positive, negative, queue = clustered_rows(13, 1, 24, seed=5, queue=7)
    unit = [torch.nn.functional.normalize(x.double(), dim=-1) for x in (anchor, positive, negative, queue)]
    cosine = (unit[0] * unit[1]).sum(1, keepdim=True)
    limit = cosine - MARGINS["absolute"]
    off_diagonal = ~torch.eye(13, dtype=torch.bool)
    for label, block in {"query_to_doc": unit[0] @ unit[1].T, "hard negatives": unit[0] @ unit[2].T,
                         "query_to_query": unit[0] @ unit[0].T, "doc_to_query": unit[1] @ unit[0].T,
                         "doc_to_doc": unit[1] @ unit[2].T}.items():
        above = (block > limit) & off_diagonal
        assert 0 < above.sum() < off_diagonal.sum(), label
    assert 0 < (unit[0] @ unit[3].T > limit).sum() < 13 * 7  # the queue's guide rows
    for label in ("false_negatives-self-relative", "false_negatives-guided-queue"):
        case, keywords = _variant_case(label, torch.float32)
        tensors = [x.double() if x is not None else None for x in case.inputs()]
        ruled = fastcse.info_nce_reference(*tensors, reduction="none", **keywords)
        plain = fastcse.info_nce_reference(*tensors, reduction="none", extra_negatives=keywords.get("extra_negatives"))
        assert (ruled < plain - 1e-9).sum() >= 3, label


def test_the_guides_queue_rows_are_passed_not_differentiated():
    """guide_extra_negatives reaches both functions as given (no gradient compared); the queue it
    belongs to is a leaf whose gradient is compared."""
    case, keywords = _variant_case("false_negatives-guided-queue", torch.float32)
    outcome = check_loss_case(case, torch.device("cpu"))
    assert outcome.ok, outcome.reason
    assert "extra_negatives_error" in outcome.numbers and "guide_extra_negatives_error" not in outcome.numbers
    assert outcome.numbers["threshold_gap"] >= GAP_NEEDED
    got = loss_and_grads(fastcse.info_nce_reference, case.inputs(), 0.05, torch.tensor(1.0), **keywords)
    assert set(got) == {"loss", "anchor", "positive", "negative", "extra_negatives", "temperature"}


def test_d_tau_is_compared_against_the_terms_it_sums():
    """The bf16 guided doc_to_query case: its d(tau) is the sum of terms ~300 times larger, which
    the bf16 kernels round (not a threshold flip: the loss agrees exactly). The kit compares d(tau)
    as the test suite does, against sum |g_i| / tau, and the case passes; with dot products
    (unbounded logits) the floor stays the plain one."""
    case, _ = _variant_case("false_negatives-guided-q2d-d2q", torch.bfloat16)
    assert case.seed == 14
    outcome = check_loss_case(case, torch.device("cpu"))
    assert outcome.ok, outcome.reason
    assert outcome.numbers["loss_error"] < 1e-6
    upstream = torch.tensor(1.7)
    assert temperature_floors(upstream, 13, "mean", 0.05, True) == {"temperature": temperature_floor(
        upstream.expand(13) / 13, 0.05)} == {"temperature": pytest.approx(34.0)}
    assert temperature_floors(upstream, 13, "mean", 0.05, False) == {"temperature": 1e-2}


def test_false_negative_speed_rows_on_cpu(tmp_path):
    """GISTEmbedLoss's directions without the rule, its math with a guide, fastcse self-guided and
    guided: the guided call and GISTEmbedLoss's math compute the reference's loss, and the rule's
    rows give their time over both."""
    device = torch.device("cpu")
    report = Report(tmp_path, "unit", {})
    section = Section(report, "speed", 60, selector(None), device)
    for name, case in speed_module.false_negative_speed_plan((32,), 16, torch.float32):
        section.run(name, lambda c=case: c(device), SPEED)
    rows = {c.name.rsplit("/", 1)[1]: c for c in report.checks}
    assert list(rows) == list(speed_module.FALSE_NEGATIVE_IMPLS)
    assert all(c.status == PASS for c in rows.values()), [(c.name, c.reason) for c in rows.values()]
    plain, gist, guided = (rows[i].numbers for i in ("fastcse+q2q", "gist_math", "fastcse+guided"))
    assert all(r.numbers["loss_rel_diff_vs_reference"] < 1e-5 for r in rows.values())
    assert gist["loss"] == pytest.approx(guided["loss"], rel=1e-5) and guided["loss"] < plain["loss"]
    for impl in ("fastcse+self_guided", "fastcse+guided"):
        numbers = rows[impl].numbers
        assert numbers["x_gist_math"] == pytest.approx(numbers["ms"] / gist["ms"])
        assert numbers["x_plain_call"] == pytest.approx(numbers["ms"] / plain["ms"])
        assert "GISTEmbedLoss's math" in rows[impl].reason


def test_matryoshka_loss_speed_row_on_cpu(tmp_path, monkeypatch):
    """sentence-transformers' MatryoshkaLoss(MNRL) on the same embeddings: the reference's loss, and
    the fused row's note compares with it."""
    pytest.importorskip("sentence_transformers")
    monkeypatch.setattr(speed_module, "MATRYOSHKA_DIMS", (16, 9, 3))
    device = torch.device("cpu")
    report = Report(tmp_path, "unit", {})
    section = Section(report, "speed", 60, selector(None), device)
    for name, case in speed_module.matryoshka_speed_plan(32, 16, torch.float32, speed_module.MATRYOSHKA_SPEED_IMPLS):
        section.run(name, lambda c=case: c(device), SPEED)
    rows = {c.name.rsplit("/", 1)[1]: c for c in report.checks}
    assert all(c.status == PASS for c in rows.values()), [(c.name, c.reason) for c in rows.values()]
    theirs, fused = rows["matryoshka_mnrl"].numbers, rows["fastcse+matryoshka"].numbers
    assert theirs["loss_rel_diff_vs_reference"] < 1e-5
    assert fused["x_matryoshka_loss"] == pytest.approx(fused["ms"] / theirs["ms"])
    assert "MatryoshkaLoss(MNRL)" in rows["fastcse+matryoshka"].reason


def test_speed_section_runs_the_option_rows_before_the_rest_of_the_grid():
    """A spent speed budget drops fp32 and d = 1024 first, never the Matryoshka or false-negative rows."""
    for profile in ("quick", "full"):
        names = _plan_names(speed_section_plan(profile))
        assert len(names) == len(set(names))
        first_fp32 = next(i for i, n in enumerate(names) if "-fp32/" in n)
        options = [i for i, n in enumerate(names) if "/matryoshka/" in n or "/false_negatives/" in n]
        assert names[0] == "B16384-d768/bf16-matmul-floor" and max(options) < first_fp32
        assert {n for n in names if "/false_negatives/gist_math" in n} == {
            f"B{b}-d768-bf16/false_negatives/gist_math" for b in speed_module.FALSE_NEGATIVE_BATCHES[profile]}
    grid = _plan_names(speed_plan(speed_module.SPEED_BATCHES["full"], speed_module.SPEED_DIMS,
                                  speed_module.SPEED_DTYPES, SPEED_IMPLS))
    assert set(grid) <= set(_plan_names(speed_section_plan("full")))


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_half_temperature_check_tells_fp32_from_rounded(monkeypatch):
    """The kernels' 16-bit d(tau) passes; one 1% off (about what the rounded dS gave) fails."""
    cases = half_temperature_cases(INTERPRET)
    assert {c.dtype for c in cases} == {torch.float16, torch.bfloat16} and {c.reduction for c in cases} == {"mean",
                                                                                                             "none"}
    outcomes = [check_half_temperature(case, torch.device("cpu")) for case in cases]
    assert all(o.ok for o in outcomes), [o.reason for o in outcomes]
    real = fastcse.info_nce

    def one_percent_off(*args, temperature, **kwargs):
        if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
            temperature.register_hook(lambda grad: grad * 1.01)
        return real(*args, temperature=temperature, **kwargs)

    monkeypatch.setattr(fastcse, "info_nce", one_percent_off)
    outcome = check_half_temperature(cases[1], torch.device("cpu"))
    assert not outcome.ok and "of the terms' scale" in outcome.reason
