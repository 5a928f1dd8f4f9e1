"""fastvq: fast vector quantization for PyTorch. Installed from source (the PyPI name `fastvq`
belongs to an unrelated project, so this distribution is called `fastvq-torch`)."""

from setuptools import setup

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
        "fastvq.kernels", "fastvq.benchmarks",
    ],
    package_dir={"fastvq.kernels": "kernels", "fastvq.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton; platform_system == 'Linux'",
        # the trainer's checkpoints, progress bars, image grids and loss curves
        "safetensors",
        "tqdm",
        "Pillow",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
        "bench": ["vector-quantize-pytorch"],
    },
    entry_points={"console_scripts": ["fastvq = fastvq.cli:main"]},
)
