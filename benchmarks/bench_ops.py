"""pytest-benchmark suite over the same registry as `fastvq bench`.

    pytest benchmarks/ --benchmark-only                         # tiny shape (as CI's smoke run)
    FASTVQ_BENCH_SHAPES=cpu-small,cpu-large pytest benchmarks/ --benchmark-only

CI runs it with --benchmark-disable: every case runs once, as a smoke test.
"""

import os

import pytest
import torch
from fastvq.benchmarks.registry import DTYPES, PROVIDERS, SHAPES, Unavailable, build

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE_NAMES = os.environ.get("FASTVQ_BENCH_SHAPES", "quick").split(",")
CASES = [(op, provider) for op, providers in PROVIDERS.items() for provider in providers]


@pytest.mark.parametrize("shape_name", SHAPE_NAMES)
@pytest.mark.parametrize("dtype_name", ["fp32"])
@pytest.mark.parametrize("op,provider", CASES)
def test_bench(benchmark, op, provider, shape_name, dtype_name):
    try:
        fn = build(op, provider, SHAPES[shape_name], DTYPES[dtype_name], DEVICE)
    except Unavailable as why:
        pytest.skip(str(why))
    benchmark.group = f"{op} {shape_name} {dtype_name}"
    benchmark(fn)
