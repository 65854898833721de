"""benchmarks/gpu_check.py without a GPU: the CPU path (no GPU: exit 0; bad arguments: one line, status 2), the
runner with mocked checks (a failing check is one FAIL line and the others still run; the exit status), the
process that runs each check (results, crashes, time limits), and the figures it reads from bench_train.py."""
import ast
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import RESULT, Check, CheckFailed, Options
from conftest import ROOT

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a machine with a GPU


def run_script(*args):
    return subprocess.run([sys.executable, "benchmarks/gpu_check.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=NO_GPU)


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    result = run_script("--quick", "--only", "oom", "ddp", "--logs", "unused")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"]
    assert not (ROOT / "unused").exists()


def test_a_bad_argument_gives_one_line_and_status_2():
    result = run_script("--only", "fp64")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"error: argument --only: invalid choice: 'fp64' (choose from {', '.join(map(repr, gpu_check.NAMES))}) "
        f"(see --help)"]


@pytest.mark.parametrize("args, line", [
    (["--device", "cpu"], "error: --device cpu: the checks run on a CUDA GPU; give cuda or cuda:N (see --help)"),
    (["--device", "gpu0"], "error: --device gpu0: the checks run on a CUDA GPU; give cuda or cuda:N (see --help)"),
    (["--quick", "--fast"], "error: unrecognized arguments: --fast (see --help)"),
    (["--only"], "error: argument --only: expected at least one argument (see --help)"),
])
def test_bad_arguments_give_one_line_and_status_2(args, line, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(args)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", line + "\n")


def test_list_names_every_check_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == gpu_check.NAMES


def checks(*outcomes):
    """Checks named a, b, c... whose run returns its figure or raises the exception given."""
    def run(outcome):
        def check(options):
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return check

    return [Check(chr(ord("a") + i), "", run(outcome), 1) for i, outcome in enumerate(outcomes)]


def test_a_failing_check_prints_fail_with_its_reason_and_the_others_still_run():
    lines = []
    results = gpu_check.run_checks(
        checks("12.5 ms/step", CheckFailed("the loss rose"), RuntimeError("CUDA error:\n  an illegal access"), "ok"),
        lambda check: check.run(Options()), out=lines.append)
    assert [(r.name, r.passed, r.text) for r in results] == [
        ("a", True, "12.5 ms/step"), ("b", False, "the loss rose"), ("c", False, "CUDA error: an illegal access"),
        ("d", True, "ok")]
    assert [line.split("  (")[0].split() for line in lines] == [
        ["PASS", "a", "12.5", "ms/step"], ["FAIL", "b", "the", "loss", "rose"],
        ["FAIL", "c", "CUDA", "error:", "an", "illegal", "access"], ["PASS", "d", "ok"]]


def test_ctrl_c_stops_the_run_rather_than_failing_one_check():
    with pytest.raises(KeyboardInterrupt):
        gpu_check.run_checks(checks("ok", KeyboardInterrupt(), "ok"), lambda check: check.run(Options()),
                             out=lambda line: None)


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA available, one GPU, and each check's process replaced by a function of its name (gpu_check.in_child):
    the returned dict maps names to the outcome (a figure, or an exception to raise), and records the options."""
    outcomes, seen = {}, []

    def in_child(options, logs=None):
        def run_one(check):
            seen.append((check.name, options))
            outcome = outcomes.get(check.name, "fine")
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return run_one

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_check, "describe_gpu", lambda device: "a mocked GPU")
    monkeypatch.setattr(gpu_check, "in_child", in_child)
    return outcomes, seen


def test_the_exit_status_is_1_when_a_check_failed(fake_gpu, capsys):
    outcomes, seen = fake_gpu
    outcomes["oom"] = CheckFailed("no out-of-memory error under a cap of 512 MiB: nothing fell back")
    assert gpu_check.main(["--only", "ddp", "oom", "fp16", "--quick"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "GPU: a mocked GPU"
    assert [line.split()[:2] for line in lines[1:4]] == [["PASS", "fp16"], ["FAIL", "oom"], ["PASS", "ddp"]]
    assert "no out-of-memory error under a cap of 512 MiB" in lines[2]
    assert lines[4].startswith("2 of 3 checks passed in ") and lines[4].endswith("min; failed: oom")
    assert seen == [(name, Options("cuda", True)) for name in ("fp16", "oom", "ddp")]  # the checks' own order


def test_the_exit_status_is_0_when_every_check_passed(fake_gpu, capsys):
    outcomes, seen = fake_gpu
    assert gpu_check.main([]) == 0
    assert [name for name, _ in seen] == gpu_check.NAMES
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{len(gpu_check.NAMES)} of {len(gpu_check.NAMES)} "
                                                               f"checks passed")


def test_a_gpu_that_is_not_there_is_one_line(fake_gpu, capsys):
    assert gpu_check.main(["--device", "cuda:1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: --device cuda:1: there is no such GPU; this machine has cpu, cuda:0\n"


FAKE_CHILD = """
import json, subprocess, sys, time
name = sys.argv[2]
if name == "pass":
    print("some output of the check")
    figure = "3.2 ms/step on " + sys.argv[3] + ", quick " + sys.argv[4]
    print({result!r} + json.dumps({{"passed": True, "text": figure}}))
elif name == "fail":
    print({result!r} + json.dumps({{"passed": False, "text": "the loss rose"}}))
elif name == "die":
    print("Traceback (most recent call last):", file=sys.stderr)
    print("RuntimeError: CUDA error: an illegal memory access was encountered", file=sys.stderr)
    sys.exit(3)
elif name == "hang":
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    print(grandchild.pid, flush=True)
    time.sleep(60)
"""


def test_each_check_runs_in_its_own_process_killed_with_its_children_after_its_limit(tmp_path, monkeypatch):
    """The 'hang' check starts a process in a session of its own, as torchrun starts its workers."""
    fake = tmp_path / "fake_child.py"
    fake.write_text(FAKE_CHILD.format(result=RESULT))
    monkeypatch.setattr(gpu_check, "SCRIPT", fake)
    lines = []
    start = time.monotonic()
    results = gpu_check.run_checks([Check(name, "", None, 3) for name in ("pass", "fail", "die", "hang")],
                                   gpu_check.in_child(Options("cuda:0", True), tmp_path / "logs"), out=lines.append)
    assert time.monotonic() - start < 30
    assert [(r.name, r.passed, r.text) for r in results] == [
        ("pass", True, "3.2 ms/step on cuda:0, quick 1"), ("fail", False, "the loss rose"),
        ("die", False, "its process died (status 3): RuntimeError: CUDA error: an illegal memory access was "
                       "encountered"),
        ("hang", False, "timed out after 3 s")]
    assert (tmp_path / "logs" / "pass.log").read_text().startswith("some output of the check\n")
    grandchild = int((tmp_path / "logs" / "hang.log").read_text().split()[0])
    time.sleep(0.5)
    assert not running(grandchild)  # killed with the check's process, not left running


def running(pid):
    """Whether process `pid` runs (a killed process that its parent has not reaped yet, a zombie, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_checks_process_reports_its_figures_or_its_one_line_reason(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "CHECKS", checks("1.0 ms/step", SystemExit("error: 1 of 1 inputs failed:\n  x"),
                                                    ValueError("bad\nvalue"), SystemExit(3)))
    monkeypatch.setattr(gpu_check, "NAMES", ["a", "b", "c", "d"])
    reports = []
    for name in "abcd":
        gpu_check.child(name, Options())
        out = capsys.readouterr().out
        reports.append(json.loads(out.splitlines()[-1].removeprefix(RESULT)))
    assert reports == [{"passed": True, "text": "1.0 ms/step"},
                       {"passed": False, "text": "error: 1 of 1 inputs failed: x"},
                       {"passed": False, "text": "ValueError: bad value"},
                       {"passed": False, "text": "exit status 3"}]


def test_the_reason_of_a_failed_script_is_its_error_line():
    torchrun = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"train.py\", line 3\n"
                "[rank1]: torch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1, invalid usage\n"
                "E1207 W0 failed\nTraceback (most recent call last):\n"
                "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
                "============================================================\ntrain.py FAILED\n")
    assert gpu_check.error_of(torchrun) == ("[rank1]: torch.distributed.DistBackendError: NCCL error in: "
                                            "ProcessGroupNCCL.cpp:1, invalid usage")
    assert gpu_check.error_of("plan: 10 steps\nerror: --tile must be at least 16 pixels, got 8\n") == \
        "error: --tile must be at least 16 pixels, got 8"
    assert gpu_check.error_of("Killed\n") == "Killed"


@pytest.fixture
def bench_train_prints(monkeypatch, capsys):
    """bench_train.main's output for steps of `seconds` against a matmul peak of 2 TFLOP/s, a step of 1 TFLOP and
    a bf16 default precision: its own print statements, with the timings mocked."""
    from benchmarks import bench_train
    from precision import Precision

    def output(seconds):
        monkeypatch.setattr(sys, "argv", ["bench_train.py", "--device", "cpu", "--channels-last"])
        monkeypatch.setattr(bench_train, "choose_precision", lambda device: Precision(torch.bfloat16, True, "mocked"))
        monkeypatch.setattr(bench_train, "make_runner", lambda *args, **kwargs: None)
        monkeypatch.setattr(bench_train, "step_flops", lambda args: 1e12)
        monkeypatch.setattr(bench_train, "timed_steps", lambda *args: [(seconds, 2e12)])
        monkeypatch.setattr(bench_train, "conv_gemm_peak", lambda device, dtype: 4e12)
        bench_train.main()
        return capsys.readouterr().out

    return output


def test_the_matmul_check_reads_every_row_that_bench_train_prints(bench_train_prints, monkeypatch):
    output = bench_train_prints(2.0)  # 4 images in 2 s: 2 images/s, 0.5 TFLOP/s = 0.25 of the peak
    rows = [gpu_check.BENCH_ROW.match(line) for line in output.splitlines() if " images/s " in line]
    assert len(rows) == 3 and all(rows)
    assert [(row["name"], row["speed"], row["fraction"], row["dtype"], row["peak"]) for row in rows] == [
        ("fp32", "2.00", "0.25", "float32", "2.000"), ("fp32 channels_last", "2.00", "0.25", "float32", "2.000"),
        ("default: bf16 autocast + channels_last", "2.00", "0.25", "bfloat16", "2.000")]
    monkeypatch.setattr(gpu_check, "run_script", lambda args: SimpleNamespace(stdout=output))
    assert gpu_check.check_matmul(Options()) == (
        "fp32: 2.00 images/s, 0.25 of the fp32 (TF32) matmul peak (2 TFLOP/s); fp32 channels_last: 2.00 images/s, "
        "0.25 of the fp32 (TF32) matmul peak (2 TFLOP/s); default: bf16 autocast + channels_last: 2.00 images/s, "
        "0.25 of the bf16 matmul peak (2 TFLOP/s)")


def test_the_matmul_check_fails_above_the_peak(bench_train_prints, monkeypatch):
    output = bench_train_prints(0.25)  # 4 TFLOP/s: twice the peak, which a mismeasured peak would give
    monkeypatch.setattr(gpu_check, "run_script", lambda args: SimpleNamespace(stdout=output))
    with pytest.raises(CheckFailed, match="fp32: 2.00 of the matmul peak is impossible"):
        gpu_check.check_matmul(Options())


def test_the_step_check_passes_on_a_cpu(monkeypatch):
    """The fp32 check itself, run on the CPU: 4 steps of train.py's StepRunner on a fixed batch."""
    monkeypatch.setattr(gpu_check, "step_count", lambda options: 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        figure = gpu_check.check_precision(Options("cpu", quick=True), "fp32")
    finally:
        torch.set_num_threads(threads)
    assert figure.startswith("loss ") and " in 4 steps, " in figure


def test_every_name_the_checks_import_exists():
    """The checks import the project's functions when they run, which only a GPU machine does: each name must
    exist, so that one moved to another module (train.py's split) shows here, in CI, not on the next GPU."""
    tree = ast.parse(Path(gpu_check.__file__).read_text())
    names = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for alias in node.names]
    names += [(alias.name, None) for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert ("sampling", "make_loader") in names and ("benchmarks.bench_train", "make_runner") in names
    missing = [f"{module}.{name}" for module, name in names
               if name and not hasattr(importlib.import_module(module), name)]
    assert missing == []
