"""`fastvq check` on CPU (the Triton interpreter, set by conftest.py): it passes on the real kernels,
and it fails, naming the case, when a kernel returns a wrong index, a moving result, or raises."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastvq import check, kernels
from fastvq.cli import main
from fastvq.testing import assert_contract, contract_excess

pytestmark = pytest.mark.skipif(
    not kernels.AVAILABLE, reason=f"Triton kernels unavailable: {kernels.UNAVAILABLE_REASON}"
)
ON_CPU = not torch.cuda.is_available()


def _row(out: str, case: str) -> str:
    rows = [line for line in out.splitlines() if line.startswith(f"| {case} |")]
    assert len(rows) == 1, f"no single row for {case!r} in:\n{out}"
    return rows[0]


@pytest.mark.skipif(not ON_CPU, reason="the CPU run of the command; on CUDA run `fastvq check` itself")
def test_every_case_passes_on_the_interpreter(capsys, tmp_path):
    assert main(["check", "--json", str(tmp_path / "check.json")]) == 0
    out = capsys.readouterr().out
    for case in check.CASES:
        row = _row(out, case.name)
        assert ("| skip |" if case.cpu is None else "| pass |") in row, row
    assert "CUDA only" in _row(out, "int64 offsets N*D > 2^31 bf16")
    assert " 0 failed" in out
    payload = json.loads((tmp_path / "check.json").read_text())
    assert payload["environment"]["interpreter"] is True
    assert {r["case"] for r in payload["results"]} == {c.name for c in check.CASES}


def test_the_cases_cover_the_contract():
    names = " | ".join(c.name for c in check.CASES)
    for part in ("search l2 fp32/ieee", "search cosine fp32/tf32", "search l2 fp32/tf32x3", "search cosine fp16",
                 "search l2 bf16", "duplicated codes", "near-ties", "+1000 offset", "non-contiguous", "D1024",
                 "huge K", "N1 huge K", "forward bf16", "backward fp16", "stats fp32", "int64"):  # fmt: skip
        assert part in names
    assert (8193, 1031, 3) in {c.gpu for c in check.CASES}


def test_a_wrong_index_fails_and_names_the_case(monkeypatch, capsys):
    real = kernels.nearest_code

    def off_by_one(x, codebook, metric="l2", **kw):
        idx, dist = real(x, codebook, metric, **kw)
        idx[0] = (idx[0] + 1) % codebook.shape[0]
        return idx, dist

    monkeypatch.setattr(kernels, "nearest_code", off_by_one)
    assert main(["check", "--device", "cpu", "--only", "search D17"]) == 1
    out = capsys.readouterr().out
    row = _row(out, "search D17 fp32")
    assert "| FAIL |" in row and "index: 1 rows break the contract" in row
    assert "FAILED: search D17 fp32, search D17 bf16" in out


def test_a_moving_result_fails_as_a_race(monkeypatch, capsys):
    real, calls = kernels.code_stats, []

    def racy(x, idx, num_codes):
        counts, sums = real(x, idx, num_codes)
        calls.append(1)
        sums[0, 0] += 2.0**-20 * len(calls)  # tiny, so only the run-to-run comparison sees it
        return counts, sums

    monkeypatch.setattr(kernels, "code_stats", racy)
    assert main(["check", "--device", "cpu", "--only", "stats fp16"]) == 1
    row = _row(capsys.readouterr().out, "stats fp16")
    assert "| FAIL |" in row and "differ between two identical runs" in row


def test_a_kernel_that_raises_fails_its_case_only(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(kernels, "vq_bwd", broken)
    assert main(["check", "--device", "cpu", "--only", "backward bf16", "--only", "stats bf16"]) == 1
    out = capsys.readouterr().out
    assert "| FAIL |" in _row(out, "backward bf16") and "RuntimeError: boom" in _row(out, "backward bf16")
    assert "| pass |" in _row(out, "stats bf16")


def test_usage_errors(capsys):
    assert main(["check", "--device", "cpu", "--only", "no such case"]) == 2
    if ON_CPU:
        assert main(["check", "--device", "cuda"]) == 2
    assert "no case name contains" in capsys.readouterr().err


@pytest.mark.skipif(not ON_CPU, reason="the re-run under the interpreter happens without CUDA only")
def test_the_command_switches_the_interpreter_on_itself():
    # `import fastvq` imports triton, so the command re-runs itself with TRITON_INTERPRET=1.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastvq", "check", "--only", "search D1 fp32"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "re-running under the Triton interpreter" in proc.stdout
    assert "| search D1 fp32 |" in proc.stdout and "interpreter=True" in proc.stdout


def test_contract_excess_matches_assert_contract():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [9.0, 0.0], [0.1, 0.0]])
    assert contract_excess(torch.tensor([0, 1, 0]), x, codebook).max().item() == 0.0
    wrong = contract_excess(torch.tensor([1, 1, 0]), x, codebook)
    assert wrong[0] > 1 and wrong[1:].max() == 0
    assert contract_excess(torch.tensor([0, 1, 2]), x, codebook)[2] == float("inf")  # higher duplicate
    assert contract_excess(torch.tensor([0, 1, 3]), x, codebook)[2] == float("inf")  # out of range
    # Row chunks give the rows assert_contract accepts.
    x, codebook = torch.randn(50, 7), torch.randn(33, 7)
    idx = torch.cdist(x, codebook).argmin(1)
    assert_contract(idx, x, codebook)
    assert (contract_excess(idx, x, codebook, chunk_bytes=8 * 33 * 7 * 3) <= 1).all()


def test_the_int64_case_verifies_at_a_tiny_size(monkeypatch):
    # The CUDA-only case's own checks (sampled rows, chunked fp64 sums), run small on CPU: they pass
    # on the real kernels and catch a wrong codebook gradient.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    case = check.Case("int64 tiny", "int64", (300, 37, 64), None, torch.bfloat16)
    result = check._run_int64(case, torch.device("cpu"))
    assert result.status == "pass", result
    real = kernels.vq_bwd

    def wrong_grad_codebook(*args, **kwargs):
        grad_z, grad_codebook = real(*args, **kwargs)
        return grad_z, grad_codebook * 1.5

    monkeypatch.setattr(kernels, "vq_bwd", wrong_grad_codebook)
    result = check._run_int64(case, torch.device("cpu"))
    assert result.status == "FAIL" and "grad codebook off" in result.note
