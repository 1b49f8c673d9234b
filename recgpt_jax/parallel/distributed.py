"""Joining a multi-process (multi-host) run: ``jax.distributed.initialize`` from flags or environment.

Three ways, in order of precedence:

1. explicit: ``--coordinator_address=host:port --num_processes=N --process_id=i`` (or the environment
   variables ``RECGPT_COORDINATOR_ADDRESS``, ``RECGPT_NUM_PROCESSES``, ``RECGPT_PROCESS_ID``), e.g. several
   processes on one machine (``launch/multiprocess.sh``) or any cluster without auto-detection;
2. ``--distributed=auto``: ``jax.distributed.initialize()`` with no arguments, which reads the topology
   from the environment on Cloud TPU VMs (every worker of a pod slice) and under SLURM (``srun``);
3. neither: a single process (the default).

After joining, ``jax.devices()`` lists the devices of every process; each process feeds only its own
block of rows of each batch (``recgpt_jax.data.pipeline.TrainInput(process_index=...)``). On CPU the
cross-process collectives use Gloo (jax's default).
"""

from __future__ import annotations

import os

from recgpt_jax.errors import ConfigError

MODES = ("off", "auto")


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  mode: str = "off",
) -> bool:
  """Joins the multi-process run described by the arguments or the ``RECGPT_*`` environment.

  Returns:
    True if this process joined a multi-process run (``jax.distributed`` initialised).

  Raises:
    ConfigError: incomplete or inconsistent settings (one line, no traceback at the command line).
  """
  import jax

  env = os.environ
  coordinator_address = coordinator_address or env.get("RECGPT_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _int_env("RECGPT_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _int_env("RECGPT_PROCESS_ID")
  if mode not in MODES:
    raise ConfigError(f"--distributed must be one of {MODES}, got {mode!r}")
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if explicit:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ConfigError("a multi-process run needs --coordinator_address, --num_processes and --process_id together")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True
  if mode == "auto":
    jax.distributed.initialize()
    return jax.process_count() > 1
  return False


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def is_primary() -> bool:
  """True on the process that writes the run's files (logs, results); checkpoints are written by all."""
  import jax

  return jax.process_index() == 0
