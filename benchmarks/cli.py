"""`fastvq bench`: the benchmark a sceptical engineer runs before adopting fastvq."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
from fastvq.benchmarks import runner
from fastvq.benchmarks.registry import CPU_GRID, DTYPES, GPU_GRID, OPS, PROVIDERS, SHAPES, Shape


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time and measure the memory of fastvq against naive PyTorch and vector-quantize-pytorch",
        description="Benchmark nearest-code search, the VQ layer's forward and its training step.",
    )
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="operations to run (default: all)")
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        help="named shapes (default: the CPU grid on CPU, shapes A, B, C on CUDA)",
    )
    p.add_argument("--nkd", nargs=3, type=int, metavar=("N", "K", "D"), help="a custom shape, added to --shapes")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32"], help="input dtypes (default fp32)")
    providers = sorted({p for ps in PROVIDERS.values() for p in ps})
    p.add_argument("--providers", nargs="+", choices=providers, help="providers to run (baselines always run)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per case on CPU (median reported)")
    p.add_argument("--max-gib", type=float, default=8.0, help="skip dense baselines needing more memory than this")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds); nothing is saved")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for JSON/markdown/PNG")
    p.add_argument("--tag", help="file name stem for the results (default: <device>-<date>)")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastvq bench: --device cuda asked for, but torch sees no CUDA device")
    if args.quick:
        shapes, repeats = [SHAPES["quick"]], 2
    else:
        names = args.shapes or ([] if args.nkd else list(GPU_GRID if device == "cuda" else CPU_GRID))
        shapes, repeats = [SHAPES[n] for n in names], args.repeats
    if args.nkd:
        n, k, d = args.nkd
        if min(n, k, d) < 1:
            raise SystemExit(f"fastvq bench: --nkd needs positive N K D, got {args.nkd}")
        shapes.append(Shape("custom", n, k, d))
    dtypes = {name: DTYPES[name] for name in args.dtypes}
    env = runner.environment(device)
    print("fastvq bench: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    records = runner.run_grid(
        args.ops, shapes, dtypes, args.providers, device, repeats, int(args.max_gib * 2**30)
    )
    print(runner.table(records))
    if not (args.quick or args.no_save):
        stamp = datetime.datetime.now().strftime("%Y-%m-%d")
        tag = args.tag or f"{device}-{stamp}"
        for path in runner.save(records, env, shapes, args.out, tag):
            print(f"wrote {path}")
    return 0
