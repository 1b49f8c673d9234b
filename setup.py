"""Packaging for recgpt-jax."""

import setuptools

setuptools.setup(
    name="recgpt-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of RecGPT (arXiv 2404.08675) for sequential recommendation.",
    packages=setuptools.find_packages(include=["recgpt_jax", "recgpt_jax.*"]),
    package_data={"recgpt_jax.data": ["bundled/*.txt.gz", "bundled/README.md"]},
    python_requires=">=3.10",
    # jax 0.12 and 0.11 (Python >= 3.12) are tested by `make test`, and jax 0.10 (Python 3.11) by its PyTorch
    # parity run; the upper bounds stop at the newest tested release.
    install_requires=[
        "jax>=0.10,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12,<0.13",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "array_record>=0.8",
        "absl-py>=2.1",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "pyarrow>=14",  # interaction logs (CSV/TSV/Parquet) and synthetic logs
        "tensorboardX>=2.6",
        "tqdm>=4.66",
    ],
    extras_require={
        # libtpu (through jax[tpu]) for the ahead-of-time TPU compile test; it needs no TPU. torch for the PyTorch
        # parity tests, pinned: torch==2.13.0 is the CPU build available offline, for Python 3.11 only (another
        # version, or Python 3.12, pulls a multi-GB CUDA build), so `make test` runs those tests in a 3.11 venv.
        # matplotlib for the study report's plot (tests/experiments/test_study.py). pytest-xdist runs the suite on
        # both cores (`-n 2 --dist loadfile`: a module's tests, and its trained fixtures, stay in one worker).
        # Apache Beam builds stores (recgpt_jax.data.store --beam_runner=...); it installs for Python <= 3.11 here
        # and caps numpy below 2.5.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "jax[tpu]", "matplotlib>=3.8"],
        "torch": ["torch==2.13.0; python_version < '3.12'"],
        "beam": ["apache-beam>=2.60"],
        "bench": ["torch==2.13.0; python_version < '3.12'", "matplotlib>=3.8"],
    },
)
