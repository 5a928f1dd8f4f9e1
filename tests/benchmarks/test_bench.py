"""`fastvq bench` end to end at a tiny size, and the memory probe it relies on."""

import json

import torch
from fastvq.benchmarks import measure

from fastvq.cli import main


def test_bench_quick_prints_every_provider(capsys):
    assert main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    for provider in ("gemm-floor", "naive-cdist", "textbook", "fastvq-torch", "fastvq-triton"):
        assert f"| {provider} |" in out
    assert "error:" not in out  # a provider either runs or says why it cannot


def test_bench_saves_json_table_and_chart(tmp_path, capsys):
    args = ["bench", "--nkd", "300", "37", "5", "--ops", "search", "forward", "--repeats", "1"]
    assert main(args + ["--out", str(tmp_path), "--tag", "t"]) == 0
    payload = json.loads((tmp_path / "t.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__
    rows = {(r["op"], r["provider"]): r for r in payload["records"]}
    ours = rows[("search", "fastvq-torch")]
    assert ours["status"] == "ok" and ours["ms"] > 0 and ours["speedup"] > 0
    assert rows[("forward", "textbook")]["speedup"] == 1.0
    assert "| search | custom | fp32 | fastvq-torch |" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "t.png").stat().st_size > 0


def test_memory_probe_sees_a_temporary():
    measure.prepare_cpu_memory_probe()
    peak = measure.peak_extra_mib(lambda: torch.ones(16 * 2**20).sum(), "cpu")  # 64 MiB temporary
    if peak is None:  # not Linux: nothing to check
        return
    assert 60 <= peak <= 80
    assert measure.peak_extra_mib(lambda: None, "cpu") < 8
