"""benchmarks/gpu_session.sh on CPU: its arguments, its dry run, and (with a stub for python) that
every step runs under its time limit, a failed step does not stop the next, and the summary says so."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_session.sh"
STEPS = ["install", "check", "tests", "bench-search", "bench-forward", "bench-train_step", "bench-ema_update",
         "bench-vqvae_step", "train"]  # fmt: skip

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")  # fmt: skip


def _run(*args, env=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVQ_")} | (env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=60)  # fmt: skip


@pytest.mark.parametrize("args", [[], ["a", "b"], ["--bogus", "out"], ["--wheels"]], ids=str)
def test_bad_arguments_print_usage_and_exit_2(args):
    proc = _run(*args)
    assert proc.returncode == 2
    assert "usage: benchmarks/gpu_session.sh" in proc.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dry_run_lists_every_step_and_writes_nothing(tmp_path, how):
    out = tmp_path / "results"
    proc = _run(str(out), "--dry-run") if how == "flag" else _run(str(out), env={"FASTVQ_GPU_DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("[dry-run]")]
    assert listed == STEPS
    assert f"fastvq check --json {out}/check.json" in proc.stdout
    assert "--ops vqvae_step --shapes A B C --dtypes fp32 bf16" in proc.stdout
    assert "train vqvae --device cuda" in proc.stdout
    assert not out.exists()


def test_wheels_are_installed_offline_when_given(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "vector_quantize_pytorch-1.0-py3-none-any.whl").write_bytes(b"")
    proc = _run("--dry-run", "--wheels", "wheels", "out", cwd=tmp_path)  # relative to the caller
    first = proc.stdout.splitlines()[0]
    assert first.startswith("[dry-run] wheels") and f"--no-index --find-links {wheels}" in first
    assert f"--out {tmp_path}/out " in proc.stdout


def test_steps_run_on_after_a_failure_and_the_summary_records_exit_codes(tmp_path):
    # A stand-in for python: echoes its arguments; `fastvq check` fails, `pytest` hangs.
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "stub $*"\ncase "$*" in *"fastvq check"*) exit 3;; *pytest*) sleep 30;; esac\n')
    stub.chmod(0o755)
    out = tmp_path / "results"
    env = {"PYTHON": str(stub), "FASTVQ_GPU_BUDGET": "11"}  # the hanging step is cut at the budget's end
    proc = _run(str(out), "--wheels", str(tmp_path / "none"), env=env)
    assert proc.returncode == 1
    summary = (out / "summary.txt").read_text()
    assert "install: exit 0" in summary and "check: exit 3" in summary
    assert "tests: exit 124" in summary  # timed out, and the bench steps still ran or were skipped
    assert "train: exit skipped" in summary  # nothing left of the budget
    assert "stub -m fastvq check --json" in (out / "check.log").read_text()
    assert "no wheels in" in proc.stdout
