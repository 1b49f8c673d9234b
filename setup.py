"""Packaging for recgpt-jax."""

import setuptools

setuptools.setup(
    name="recgpt-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of RecGPT (arXiv 2404.08675) for sequential recommendation.",
    packages=setuptools.find_packages(include=["recgpt_jax", "recgpt_jax.*"]),
    package_data={"recgpt_jax.data": ["bundled/*.txt.gz", "bundled/README.md"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "array_record>=0.8",
        "absl-py>=2.1",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
    ],
    extras_require={
        # torch for the PyTorch parity tests. Pinned: torch==2.13.0 is the CPU build available offline;
        # another version pulls a multi-GB CUDA build.
        "test": ["pytest>=8", "ruff>=0.6", "torch==2.13.0"],
        "bench": ["torch==2.13.0", "matplotlib>=3.8"],
    },
)
