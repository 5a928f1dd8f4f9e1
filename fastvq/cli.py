"""The `fastvq` command (also `python -m fastvq`). Each subcommand lives in the module that owns
its work and registers itself here through an ``add_parser(subparsers)`` function that sets
``func`` on its parser; this file only assembles them."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from fastvq import check as check_cli
    from fastvq.benchmarks import cli as bench_cli
    from fastvq.train import cli as train_cli

    parser = argparse.ArgumentParser(prog="fastvq", description="fastvq: fast vector quantization for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_cli.add_parser(sub)
    train_cli.add_parser(sub)  # train {ae,vae,vqvae,vqgan,prior}, sample, reconstruct
    check_cli.add_parser(sub)  # check: the kernels on this device vs the PyTorch path and fp64
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
