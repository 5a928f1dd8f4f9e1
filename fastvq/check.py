"""`fastvq check`: verify every Triton kernel on this machine against the PyTorch path and the fp64 oracle.

Each case draws inputs, runs a kernel twice, and checks, in numbers, what DESIGN.md's numerics
contract promises:
    search    the index meets the contract against the fp64 argmin (excess (d(k^) - d(k*)) / tau),
              exact ties go to the lowest index, the returned distance is within fp32's error of
              its formula (plus twice the PyTorch path's own error);
    forward   fastvq.vector_quantize(backend="triton"): zq bitwise equal to codebook[idx], the
              index as above, the loss against fp64 on the same indices;
    backward  its gradients to z and to the codebook against fp64 (an index_add of the rows);
    stats     fastvq.code_stats: counts exact, sums within fp32's error of the fp64 sums;
and for every case both runs must give bitwise-identical outputs (on a GPU a moving result is a
race). "excess" is the worst error / allowed bound over everything a case checks: 0 is exact,
<= 1 passes. The PyTorch path runs the same inputs; where the flash-attention rule applies its
error, doubled, is part of the bound.

On CUDA the shapes are the ones that hurt (N 8193 x K 1031 x D 3, D up to 1024, K 65536, N*D beyond
2^31 elements); without CUDA the same cases run at tiny shapes through the Triton interpreter, which
must be switched on before triton is first imported (``import fastvq`` imports it), so `fastvq check`
then re-runs itself in a child process with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from fastvq import kernels, reference
from fastvq.functional import code_stats, vector_quantize
from fastvq.testing import contract_excess

U32 = 2.0**-24  # fp32 unit roundoff
_OUT_EPS = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # rounding of an output
_BETA, _CODEBOOK_WEIGHT = 0.25, 1.0


@dataclass(frozen=True)
class Case:
    """One row of the table: an op, its dtype/metric/precision, how inputs are drawn, and two sizes."""

    name: str
    op: str  # "search" | "forward" | "backward" | "stats" | "int64"
    gpu: tuple[int, int, int]  # (N, K, D) on CUDA
    cpu: tuple[int, int, int] | None  # (N, K, D) under the interpreter; None: CUDA only
    dtype: torch.dtype = torch.float32
    metric: str = "l2"
    precision: str | None = None  # fp32 search: "ieee" | "tf32" | "tf32x3"
    data: str = "randn"  # randn | dup | near_tie | offset | strided | zeros | skew (see _inputs)


@dataclass
class Result:
    """What a case found: worst error / bound ("excess"), pass / FAIL / skip, ms of the second run."""

    case: str
    shape: str
    excess: float
    status: str
    ms: float
    note: str = ""


def _cases() -> list[Case]:
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    base, base_cpu = (8193, 1031, 67), (67, 131, 40)  # the CPU's K spans 3 interpreter tiles, D 2 fp32 chunks
    cases = []
    for metric in ("l2", "cosine"):
        for label, dtype, precision in (
            ("fp32/ieee", f32, "ieee"), ("fp32/tf32", f32, "tf32"), ("fp32/tf32x3", f32, "tf32x3"),
            ("fp16", f16, None), ("bf16", bf16, None),
        ):  # fmt: skip
            cases.append(Case(f"search {metric} {label}", "search", base, base_cpu, dtype, metric, precision))
    hurt = {  # name: (CUDA shape, interpreter shape)
        "odd N,K D3": ((8193, 1031, 3), (67, 131, 3)),
        "D1": ((4099, 257, 1), (67, 67, 1)),
        "D17": ((4099, 1031, 17), (67, 131, 17)),
        "D257": ((2049, 1031, 257), (33, 67, 257)),
        "D1024": ((1025, 1031, 1024), (17, 67, 1024)),
        "huge K D8": ((4096, 65536, 8), (33, 2053, 8)),
        "N1 huge K": ((1, 65536, 64), (1, 2053, 19)),
    }
    for label, (gpu, cpu) in hurt.items():
        for dname, dtype in (("fp32", f32), ("bf16", bf16)):
            cases.append(Case(f"search {label} {dname}", "search", gpu, cpu, dtype))
    adversarial = [("dup", "duplicated codes", ("l2", "cosine")), ("near_tie", "near-ties", ("l2", "cosine")),
                   ("offset", "+1000 offset", ("l2",)), ("strided", "non-contiguous", ("l2",))]  # fmt: skip
    for data, label, metrics in adversarial:
        for metric in metrics:
            for dname, dtype in (("fp32", f32), ("bf16", bf16)):
                name = f"search {label} {metric} {dname}"
                cases.append(Case(name, "search", (4099, 1030, 17), (67, 130, 17), dtype, metric, data=data))
    for metric in ("l2", "cosine"):
        cases.append(Case(f"search zero vectors {metric} fp32", "search", (4099, 1031, 17), (67, 131, 17),
                          metric=metric, data="zeros"))  # fmt: skip
    for op in ("forward", "backward", "stats"):
        for dname, dtype in (("fp32", f32), ("fp16", f16), ("bf16", bf16)):
            cases.append(Case(f"{op} {dname}", op, base, base_cpu, dtype, data="skew"))
        cases.append(Case(f"{op} non-contiguous fp32", op, base, base_cpu, data="strided"))
    # int64 offsets: rows past element 2^31 of z, zq and grad_z; far too big for the interpreter.
    cases.append(Case("int64 offsets N*D > 2^31 bf16", "int64", (2**31 // 64 + 4099, 37, 64), None, torch.bfloat16))
    return cases


CASES = _cases()


# ---------------------------------------------------------------------------------------------
# Inputs


def _inputs(case: Case, n: int, k: int, d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(x, codebook) for a case, drawn on the CPU from a seed fixed by the case's name."""
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, c = randn(n, d), randn(k, d)
    if case.data == "dup":
        # Codes copied to higher indices: at random, and into the same lane of later tiles
        # (j + 64, j + 128 for BLOCK_K 64 / 128); rows sit on or next to codes, so duplicates win.
        src, dst = torch.randint(0, k // 2, (k // 4,), generator=g), torch.randint(k // 2, k, (k // 4,), generator=g)
        c[dst] = c[src]
        for j in range(max(0, min(8, k - 128))):
            c[j + 64] = c[j + 128] = c[j]
        noise = 1e-3 * randn(n, d) * (torch.arange(n) % 2)[:, None]  # even rows exactly on a code
        x = c[torch.randint(0, k, (n,), generator=g)] + noise
    elif case.data == "near_tie":
        # Pairs of codes one rounding step apart (2^-10 relative), queried from their midpoint.
        half = k // 2
        c[half : 2 * half] = c[:half] + c[:half].abs() * 2.0**-10
        pick = torch.randint(0, half, (n,), generator=g)
        x = 0.5 * (c[pick] + c[pick + half])
    elif case.data == "offset":  # ||x||^2 - 2 x.c + ||c||^2 cancels catastrophically
        x, c = x + 1000.0, c + 1000.0
    elif case.data == "zeros":
        x[::3] = 0.0
        c[min(5, k - 1)] = 0.0
    elif case.data == "skew":  # half the rows on one code: a segment across many chunks of the scatter
        x[: n // 2] = c[7 % k] + 0.05 * randn(n // 2, d)
    x, c = x.to(case.dtype).to(device), c.to(case.dtype).to(device)
    if case.data == "strided":  # x every other column of a wider tensor, the codebook column-major
        wide = torch.zeros(n, 2 * d, dtype=case.dtype, device=device)
        wide[:, ::2] = x
        x, c = wide[:, ::2], c.t().contiguous().t()
    return x, c


# ---------------------------------------------------------------------------------------------
# Bounds: each returns the worst error / bound (0 exact, <= 1 passes)


def _ratio(err: Tensor, bound: Tensor) -> float:
    """max(err / bound) with 0 / 0 = 0 and x / 0 = inf; NaN errors count as inf."""
    if err.numel() == 0:
        return 0.0
    err = torch.nan_to_num(err.double(), nan=math.inf)
    r = torch.where(err > 0, err / bound.double(), torch.zeros_like(err))
    return float(r.max())


def _chosen_fp64(x: Tensor, c: Tensor, idx: Tensor, metric: str) -> Tensor:
    """fp64 distance of every row to its chosen code, from the stored values (no expansion)."""
    x64, e64 = x.double(), c.double()[idx]
    if metric == "l2":
        return ((x64 - e64) ** 2).sum(1)
    den = x64.norm(dim=1).clamp_min(1e-12) * e64.norm(dim=1).clamp_min(1e-12)
    return 1.0 - (x64 * e64).sum(1) / den


def _dist_bound(ref: Tensor, d: int, metric: str) -> Tensor:
    # l2 from the difference: relative error <= (D + 2) u; cosine from fp32 sums: absolute 4 (D + 5) u.
    return (d + 2) * U32 * ref if metric == "l2" else torch.full_like(ref, 4 * (d + 5) * U32)


def _segment_ref(idx: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """fp64 index_add of ``rows`` (N, D) by idx: (sums (K, D), sums of |rows| (K, D), counts (K,))."""
    d = rows.shape[1]
    sums = torch.zeros(k, d, dtype=torch.float64, device=rows.device).index_add_(0, idx, rows)
    abs_sums = torch.zeros_like(sums).index_add_(0, idx, rows.abs())
    counts = torch.bincount(idx, minlength=k).double()
    return sums, abs_sums, counts


def _sum_bound(abs_sums: Tensor, counts: Tensor, ref: Tensor, out_dtype: torch.dtype) -> Tensor:
    # fp32 sums of n_k terms in any order: rounding errors of random sign, about u sqrt(n_k) sum |terms|
    # (4x that), plus two ulps of the result's dtype: a GPU rounds the fp32 sum to nearest (half an
    # ulp), the interpreter truncates fp32 -> 16-bit conversions (up to one).
    return 4 * U32 * (counts[:, None] + 1).sqrt() * abs_sums + 4 * _OUT_EPS[out_dtype] * ref.abs()


# ---------------------------------------------------------------------------------------------
# The ops: each returns (run, verify); run() calls the kernel, verify(outputs) returns named checks

_Op = tuple[Callable[[], tuple], Callable[[tuple], dict]]


def _search(case: Case, x: Tensor, c: Tensor) -> _Op:
    def run():
        return kernels.nearest_code(x, c, case.metric, precision=case.precision)

    def verify(out):
        idx, dist = out
        tf32 = case.precision in ("tf32", "tf32x3")
        idx_t, dist_t = reference.nearest_code(x, c, case.metric)
        ref, ref_t = _chosen_fp64(x, c, idx, case.metric), _chosen_fp64(x, c, idx_t, case.metric)
        bound = _dist_bound(ref, x.shape[1], case.metric) + 2 * (dist_t.double() - ref_t).abs()
        return {
            "index": contract_excess(idx, x, c, case.metric, tf32),
            "dist": _ratio((dist.double() - ref).abs(), bound),
            "_differs": int((idx != idx_t).sum()),
        }

    return run, verify


def _forward(case: Case, z: Tensor, c: Tensor) -> _Op:
    def run():
        return vector_quantize(z, c, _BETA, _CODEBOOK_WEIGHT, backend="triton")

    def loss_fp64(idx: Tensor) -> Tensor:
        return (_BETA + _CODEBOOK_WEIGHT) * ((z.double() - c.double()[idx]) ** 2).mean()

    def verify(out):
        zq, idx, loss = out
        _, idx_t, loss_t = vector_quantize(z, c, _BETA, _CODEBOOK_WEIGHT, backend="torch")
        ref = loss_fp64(idx)
        bound = 2 * (loss_t.double() - loss_fp64(idx_t)).abs() + 4 * U32 * math.sqrt(z.numel()) * ref
        return {
            "zq == codebook[idx]": 0.0 if _same_bits(zq, c[idx]) else math.inf,
            "index": contract_excess(idx, z, c),
            "loss": _ratio((loss.double() - ref).abs(), bound),
            "_differs": int((idx != idx_t).sum()),
        }

    return run, verify


def _backward(case: Case, z: Tensor, c: Tensor) -> _Op:
    g = torch.Generator().manual_seed(1)
    grad_zq = torch.randn(z.shape, generator=g).to(c.dtype).to(z.device)
    grad_loss = torch.tensor(0.5 + torch.rand((), generator=g).item(), device=z.device)

    def grads(backend: str) -> tuple[Tensor, Tensor, Tensor]:
        zr, cr = z.detach().requires_grad_(True), c.detach().requires_grad_(True)
        zq, idx, loss = vector_quantize(zr, cr, _BETA, _CODEBOOK_WEIGHT, backend=backend)
        gz, gc = torch.autograd.grad((zq, loss), (zr, cr), (grad_zq, grad_loss))
        return gz, gc, idx

    def refs(idx: Tensor):
        # dz = dzq + beta s (z - e); dcodebook = index_add over idx of codebook_weight s (e - z); s = 2 g / numel.
        s = grad_loss.double() * 2.0 / z.numel()
        diff = z.double() - c.double()[idx]
        gz = grad_zq.double() + _BETA * s * diff
        gz_bound = 8 * _OUT_EPS[z.dtype] * (grad_zq.double().abs() + (_BETA * s * diff).abs())
        gc, gc_abs, counts = _segment_ref(idx, -_CODEBOOK_WEIGHT * s * diff, c.shape[0])
        return gz, gz_bound, gc, _sum_bound(gc_abs, counts, gc, c.dtype)

    def verify(out):
        gz, gc, idx = out
        gz_t, gc_t, idx_t = grads("torch")
        ref_z, bound_z, ref_c, bound_c = refs(idx)
        ref_zt, _, ref_ct, _ = refs(idx_t)
        bound_z = bound_z + 2 * (gz_t.double() - ref_zt).abs()
        bound_c = bound_c + 2 * (gc_t.double() - ref_ct).abs()
        return {
            "grad z": _ratio((gz.double() - ref_z).abs(), bound_z),
            "grad codebook": _ratio((gc.double() - ref_c).abs(), bound_c),
        }

    return lambda: grads("triton"), verify


def _stats(case: Case, x: Tensor, c: Tensor) -> _Op:
    k = c.shape[0]
    idx = reference.nearest_code(x, c)[0]

    def verify(out):
        counts, sums = out
        counts_t, sums_t = code_stats(x, idx, k, backend="torch")
        ref, ref_abs, ref_counts = _segment_ref(idx, x.double(), k)
        bound = _sum_bound(ref_abs, ref_counts, ref, torch.float32) + 2 * (sums_t.double() - ref).abs()
        return {
            "counts": 0.0 if torch.equal(counts.double(), ref_counts) else math.inf,
            "sums": _ratio((sums.double() - ref).abs(), bound),
        }

    return lambda: code_stats(x, idx, k, backend="triton"), verify


_OPS = {"search": _search, "forward": _forward, "backward": _backward, "stats": _stats}


# ---------------------------------------------------------------------------------------------
# Running a case


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (so -0.0 != 0.0 and NaN == NaN with the same payload)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = (t.detach().contiguous().reshape(-1).view(torch.uint8) for t in (a, b))
    return torch.equal(a, b)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_twice(fn: Callable[[], tuple], device: torch.device) -> tuple[tuple, float, bool]:
    """Outputs of the first run, ms of the second (warm: autotuning and compiles are in the first), same bits?"""
    first = fn()
    _sync(device)
    start = time.perf_counter()
    second = fn()
    _sync(device)
    ms = (time.perf_counter() - start) * 1e3
    return first, ms, all(_same_bits(a, b) for a, b in zip(first, second, strict=True))


def _summarise(case: Case, shape: str, checks: dict, ms: float, same: bool) -> Result:
    """One Result from named check values (floats, or per-row excess tensors) and the run-to-run flag."""
    notes, worst = [], 0.0
    for label, value in checks.items():
        if label.startswith("_"):
            continue
        if isinstance(value, Tensor):  # per-row contract excess
            bad = int((value > 1).sum())
            value = float(value.max()) if value.numel() else 0.0
            if bad:
                notes.append(f"{label}: {bad} rows break the contract")
        elif value > 1:
            notes.append(f"{label} off by {value:.3g}x its bound")
        worst = max(worst, value)
    if not same:
        notes.append("outputs differ between two identical runs (a race?)")
    if checks.get("_differs"):
        notes.append(f"index differs from the PyTorch path on {checks['_differs']} rows")
    failed = worst > 1 or not same
    return Result(case.name, shape, worst, "FAIL" if failed else "pass", ms, "; ".join(notes))


def _run_int64(case: Case, device: torch.device) -> Result:
    """vq forward, backward and code statistics where row offsets pass 2^31 elements (CUDA only)."""
    n, k, d = case.gpu
    shape = f"N{n} K{k} D{d}"
    need = 6 * n * d * 2 + 2**30  # z, two zq then two grad_z of bf16, codebook[idx] for the bitwise check
    free = torch.cuda.mem_get_info(device)[0]
    if free < need:
        return Result(case.name, shape, math.nan, "skip", 0.0, f"needs {need / 2**30:.0f} GiB free, {free / 2**30:.0f}")
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, d, generator=g, device=device, dtype=case.dtype)
    c = torch.randn(k, d, generator=g, device=device, dtype=case.dtype)
    sample = torch.cat([torch.arange(min(n, 2048)), torch.arange(max(0, n - 2048), n)]).unique().to(device)
    (zq, idx, _), ms_f, same_f = _run_twice(lambda: vector_quantize(z, c, backend="triton"), device)
    checks = {"zq == codebook[idx]": 0.0 if _same_bits(zq, c[idx]) else math.inf,
              "index (first and last rows)": contract_excess(idx[sample], z[sample], c)}  # fmt: skip
    del zq
    grad_zq = torch.zeros(1, d, device=device, dtype=case.dtype).expand(n, d)  # stride 0: no memory
    one = torch.ones((), device=device)
    (gz, gc), ms_b, same_b = _run_twice(lambda: kernels.vq_bwd(grad_zq, one, z, c, idx, _BETA, 1.0), device)
    s = 2.0 / (n * d)
    diff = z[sample].double() - c.double()[idx[sample]]
    checks["grad z (first and last rows)"] = _ratio((gz[sample].double() - _BETA * s * diff).abs(),
                                                    8 * _OUT_EPS[z.dtype] * (_BETA * s * diff).abs())  # fmt: skip
    del gz
    (counts, sums), ms_s, same_s = _run_twice(lambda: kernels.code_stats(z, idx, k), device)
    acc = [torch.zeros(k, d, dtype=torch.float64, device=device) for _ in range(4)] + [0.0]
    for start in range(0, n, 2**20):  # fp64 references in chunks: the whole z in fp64 would be 17 GB
        zc, ic = z[start : start + 2**20].double(), idx[start : start + 2**20]
        sums_part, grad_part = _segment_ref(ic, zc, k), _segment_ref(ic, c.double()[ic] - zc, k)
        acc = [a + b for a, b in zip(acc, sums_part[:2] + grad_part[:2] + sums_part[2:], strict=True)]
    ref, ref_abs, ref_grad, ref_grad_abs, ref_counts = acc
    checks["counts"] = 0.0 if torch.equal(counts.double(), ref_counts) else math.inf
    checks["sums"] = _ratio((sums.double() - ref).abs(), _sum_bound(ref_abs, ref_counts, ref, torch.float32))
    grad_bound = s * _sum_bound(ref_grad_abs, ref_counts, ref_grad, c.dtype)  # codebook_weight 1, grad_loss 1
    checks["grad codebook"] = _ratio((gc.double() - s * ref_grad).abs(), grad_bound)
    return _summarise(case, shape, checks, ms_f + ms_b + ms_s, same_f and same_b and same_s)


def run_case(case: Case, device: torch.device) -> Result:
    """Run one case on ``device`` ("cuda", or "cpu" under the interpreter); never raises for a kernel's fault."""
    size = case.gpu if device.type == "cuda" else case.cpu
    if size is None:
        return Result(case.name, "-", math.nan, "skip", 0.0, "CUDA only (too big for the interpreter)")
    shape = f"N{size[0]} K{size[1]} D{size[2]}"
    try:
        if case.op == "int64":
            return _run_int64(case, device)
        x, c = _inputs(case, *size, device)
        run, verify = _OPS[case.op](case, x, c)
        out, ms, same = _run_twice(run, device)
        return _summarise(case, shape, verify(out), ms, same)
    except torch.OutOfMemoryError as exc:
        return Result(case.name, shape, math.nan, "skip", 0.0, f"out of memory: {str(exc).splitlines()[0]}")
    except Exception as exc:  # a kernel that raises is a failure of that case, not of the command
        return Result(case.name, shape, math.inf, "FAIL", 0.0, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The command


def _row(r: Result) -> str:
    excess = "-" if math.isnan(r.excess) else ("0" if r.excess == 0 else f"{r.excess:.3g}")
    ms = f"{r.ms:.2f}" if r.status != "skip" else "-"
    return f"| {r.case} | {r.shape} | {excess} | {r.status} | {ms} | {r.note} |"


def environment(device: torch.device) -> dict:
    """Device, versions and mode, printed above the table and saved with --json."""
    import triton

    info = {"device": str(device), "torch": torch.__version__, "triton": triton.__version__,
            "interpreter": kernels.interpreter_active()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def add_parser(subparsers) -> None:
    """Register ``fastvq check`` on the top-level command's subparsers."""
    p = subparsers.add_parser(
        "check",
        help="verify the Triton kernels on this machine against the PyTorch path and an fp64 oracle",
        description="Verify every Triton kernel against the PyTorch path and the fp64 oracle, with the "
        "numerics contract; a non-zero exit on any failure. Without CUDA it runs tiny shapes "
        "through the Triton interpreter.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu (interpreter)")
    p.add_argument("--only", action="append", metavar="TEXT", help="run the cases whose name has TEXT (repeatable)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the environment and every result here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the cases, print the table; 0 when every case that ran passed, 1 otherwise, 2 for bad usage."""
    cuda = torch.cuda.is_available() and not kernels.interpreter_active()
    device = args.device or ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        print("fastvq check: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cpu" and not kernels.interpreter_active():
        # TRITON_INTERPRET is read when triton compiles the kernels' decorators, i.e. on import,
        # which `import fastvq` has already done: re-run in a child with the variable set.
        print("fastvq check: no GPU, re-running under the Triton interpreter (TRITON_INTERPRET=1)", flush=True)
        argv = ["check", "--device", "cpu"] + [a for t in args.only or [] for a in ("--only", t)]
        argv += ["--json", str(args.json)] if args.json else []
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "fastvq", *argv], env=env)
    if not kernels.AVAILABLE:
        print(f"fastvq check: the Triton kernels cannot run here: {kernels.UNAVAILABLE_REASON}", file=sys.stderr)
        return 1
    cases = [c for c in CASES if not args.only or any(t in c.name for t in args.only)]
    if not cases:
        print(f"fastvq check: no case name contains any of {args.only}", file=sys.stderr)
        return 2
    dev = torch.device(device)
    env = environment(dev)
    print("fastvq check: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    print("| case | shape | excess | result | ms | note |\n|---|---|---|---|---|---|", flush=True)
    start, results = time.perf_counter(), []
    for case in cases:
        results.append(run_case(case, dev))
        print(_row(results[-1]), flush=True)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "skip")}
    failed = [r.case for r in results if r.status == "FAIL"]
    print(f"fastvq check: {counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped "
          f"in {time.perf_counter() - start:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return 1 if failed else 0
