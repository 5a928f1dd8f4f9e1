"""Run a grid of (op, shape, dtype, provider) cases; print, save as JSON + markdown + PNG.

Used by `fastvq bench`. Every case that cannot run (not installed, needs CUDA, out of memory,
too big for this machine) becomes a row that says why, never a crash.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastvq.benchmarks import measure
from fastvq.benchmarks.registry import (
    BASELINE,
    GEMM_PROVIDERS,
    OPTION_OPS,
    PEER,
    PROVIDERS,
    Shape,
    Unavailable,
    build,
    peer_parity,
    search_flops,
)

from fastvq import kernels


@dataclass
class Record:
    op: str
    shape: str
    n: int
    k: int
    d: int
    dtype: str
    provider: str
    ms: float | None = None
    peak_mib: float | None = None
    gflops: float | None = None  # search only: 2 N K D / time
    of_gemm: float | None = None  # search only: the faster GEMM's time / this time, same run
    speedup: float | None = None  # baseline time / this time
    status: str = "ok"
    check: str | None = None  # option ops, fastvq rows: same loss as the peer from one state?


def environment(device: str) -> dict:
    """Machine, versions and date, recorded with every result."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "kernels": "available" if kernels.AVAILABLE else f"unavailable: {kernels.UNAVAILABLE_REASON}",
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _estimated_bytes(op: str, provider: str, shape: Shape) -> int:
    """Rough peak of the dense baselines (N x K fp32 and its temporaries); 0 for fastvq."""
    if provider.startswith("fastvq"):
        return 0
    if provider.startswith("gemm"):
        return 4 * shape.n * shape.k
    return 4 * shape.n * shape.k * (3 if op.startswith("train_step") else 2)


def run_grid(ops, shapes, dtypes, providers, device: str, repeats: int, max_bytes: int) -> list[Record]:
    records, callables = [], []
    for op in ops:
        for shape in shapes:
            for dtype_name, dtype in dtypes.items():
                check = _parity(op, shape, dtype, device, providers)
                for provider in PROVIDERS[op]:
                    if providers and provider not in providers and provider != BASELINE[op]:
                        continue
                    rec = Record(op, shape.name, shape.n, shape.k, shape.d, dtype_name, provider)
                    if provider.startswith("fastvq"):
                        rec.check = check
                    records.append(rec)
                    if _estimated_bytes(op, provider, shape) > max_bytes:
                        rec.status = f"skipped: needs ~{_estimated_bytes(op, provider, shape) / 2**30:.1f} GiB"
                        continue
                    try:
                        fn = build(op, provider, shape, dtype, device)
                        rec.ms = measure.time_ms(fn, device, repeats)
                        callables.append((rec, fn))
                    except Unavailable as why:
                        rec.status = f"n/a: {why}"
                    except (torch.OutOfMemoryError, MemoryError):
                        rec.status = "out of memory"
                    except (RuntimeError, NotImplementedError) as err:
                        rec.status = f"error: {str(err).splitlines()[0][:80]}"
                    gc.collect()
    # Memory after all timings: the probe changes malloc's behaviour (see measure.py).
    if device == "cpu":
        measure.prepare_cpu_memory_probe()
    for rec, fn in callables:
        try:
            rec.peak_mib = measure.peak_extra_mib(fn, device)
        except (torch.OutOfMemoryError, MemoryError):
            rec.peak_mib = None
    del callables
    _derive(records)
    return records


def _parity(op: str, shape: Shape, dtype, device: str, providers) -> str | None:
    """For an option op timed against the peer: one check, before timing, that both compute the
    same loss from the same state (registry.peer_parity); None for other ops."""
    if op not in OPTION_OPS or (providers and not any(p.startswith("fastvq") for p in providers)):
        return None
    try:
        return str(peer_parity(op, shape, dtype, device))
    except Unavailable as why:
        return f"not checked: {why}"
    except (torch.OutOfMemoryError, MemoryError):
        return "not checked: out of memory"
    finally:
        gc.collect()


def _derive(records: list[Record]) -> None:
    by_case = {}
    for rec in records:
        by_case.setdefault((rec.op, rec.shape, rec.dtype), {})[rec.provider] = rec
    for (op, _, _), case in by_case.items():
        base = case.get(BASELINE[op])
        gemm_ms = [case[g].ms for g in GEMM_PROVIDERS if g in case and case[g].ms is not None]
        for rec in case.values():
            if rec.ms is None:
                continue
            if base is not None and base.ms is not None:
                rec.speedup = base.ms / rec.ms
            if op == "search":
                rec.gflops = search_flops(Shape(rec.shape, rec.n, rec.k, rec.d)) / (rec.ms * 1e6)
                if gemm_ms:
                    rec.of_gemm = min(gemm_ms) / rec.ms


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[Record]) -> str:
    """A markdown table: op | shape | dtype | provider | ms | peak MiB | GFLOP/s | x GEMM | speed-up."""
    head = "| op | shape | dtype | provider | median ms | extra peak MiB | GFLOP/s | vs GEMM | speed-up |"
    lines = [head, "|" + "---|" * 9]
    for r in records:
        if r.status != "ok":
            lines.append(f"| {r.op} | {r.shape} | {r.dtype} | {r.provider} | {r.status} | | | | |")
            continue
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype} | {r.provider} | {_fmt(r.ms, '.2f')} | {_fmt(r.peak_mib, '.0f')} | "
            f"{_fmt(r.gflops, '.0f')} | {_fmt(r.of_gemm, '.2f')} | {_fmt(r.speedup, '.1f')}x |"
        )
    return "\n".join(lines)


def _checks(records: list[Record]) -> str:
    """A markdown list of the peer checks, one per (op, shape, dtype); empty without any."""
    seen = {(r.op, r.shape, r.dtype): r.check for r in records if r.check is not None}
    if not seen:
        return ""
    lines = [f"- {op} | {shape} | {dtype}: {check}" for (op, shape, dtype), check in seen.items()]
    return f"\nSame loss as {PEER} from one state (checked once per case, before timing):\n\n" + "\n".join(lines) + "\n"


def save(records: list[Record], env: dict, shapes: list[Shape], out_dir: Path, tag: str) -> list[Path]:
    """Write <tag>.json (environment + every record), <tag>.md (the table) and <tag>.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out_dir / f"{tag}.{ext}" for ext in ("json", "md", "png"))
    payload = {"environment": env, "shapes": [asdict(s) for s in shapes], "records": [asdict(r) for r in records]}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    env_line = ", ".join(f"{k}: {v}" for k, v in env.items())
    md_path.write_text(f"# fastvq bench: {tag}\n\n{env_line}\n\n{table(records)}\n{_checks(records)}")
    written = [json_path, md_path]
    if _chart(records, png_path):
        written.append(png_path)
    return written


def _chart(records: list[Record], path: Path) -> bool:
    """Speed-up over the baseline and extra peak memory per case (log scale); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in records if r.ms is not None and r.speedup is not None]
    if not ok:
        return False
    labels = [f"{r.op}\n{r.shape} {r.dtype}\n{r.provider}" for r in ok]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.6 * len(ok)), 8), sharex=True)
    axes[0].bar(range(len(ok)), [r.speedup for r in ok], color="tab:blue")
    axes[0].set_ylabel("speed-up over baseline (x)")
    axes[0].set_yscale("log")
    axes[1].bar(range(len(ok)), [max(r.peak_mib or 0.0, 0.01) for r in ok], color="tab:orange")
    axes[1].set_ylabel("extra peak memory (MiB)")
    axes[1].set_yscale("log")
    axes[1].set_xticks(range(len(ok)), labels, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
