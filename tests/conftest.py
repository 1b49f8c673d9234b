"""Test setup: CPU only, 8 host devices for the sharding tests, float32 matmuls at full precision.

Single-device tests build their meshes over ``jax.devices()[:1]`` (``mesh.data=1`` in the tiny config),
multi-device tests over 2, 4 or 8 of the fake CPU devices.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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


@pytest.fixture(scope="session")
def cli_worker():
  """``tests.helpers.CliWorker``: command lines run in one long-lived process (shared by the test modules)."""
  import pathlib

  from tests.helpers import CliWorker

  worker = CliWorker(pathlib.Path(__file__).resolve().parents[1], env=dict(os.environ, JAX_PLATFORMS="cpu"))
  yield worker
  worker.close()
