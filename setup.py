"""fastvq: fast vector quantization for PyTorch. Installed from source (the PyPI name `fastvq`
belongs to an unrelated project, so this distribution is called `fastvq-torch`)."""

from setuptools import setup

# The trainer's dependencies (fastvq/train/cli.py checks for them by import name before it runs).
TRAIN = ["safetensors", "tqdm", "Pillow", "matplotlib"]

setup(
    name="fastvq-torch",
    version="0.1.0",
    description="Vector quantization for PyTorch with fused Triton kernels and a chunked PyTorch path",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships as the subpackage fastvq.kernels (a top-level `kernels` package would collide
    # with Hugging Face's PyPI package of that name); benchmarks/ as fastvq.benchmarks, so that
    # `fastvq bench` works from an installed copy.
    packages=[
        "fastvq", "fastvq.reference", "fastvq.functional", "fastvq.quantizers", "fastvq.models", "fastvq.train",
        "fastvq.compat", "fastvq.kernels", "fastvq.benchmarks",
    ],
    package_dir={"fastvq.kernels": "kernels", "fastvq.benchmarks": "benchmarks"},
    license="MIT",
    # The core is the quantizer layer (`import fastvq`, fastvq.models, `fastvq bench`); the trainer's
    # checkpoints, progress bars, image grids and loss curves are the "train" extra, which
    # `fastvq train` names when it is missing.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "train": TRAIN,
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", *TRAIN],  # the tests exercise the trainer
        "bench": ["vector-quantize-pytorch"],
    },
    entry_points={"console_scripts": ["fastvq = fastvq.cli:main"]},
)
