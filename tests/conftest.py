"""Test setup: CPU only, and float32 matmuls at full precision so comparisons are tight."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long runs on real data; excluded by default, run with -m slow")


def pytest_collection_modifyitems(config, items):
  import pytest

  if config.getoption("-m"):
    return
  skip = pytest.mark.skip(reason="slow: run with `make test-slow` (pytest -m slow)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
