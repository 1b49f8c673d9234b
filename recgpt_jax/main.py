"""Command-line entry point.

  python -m recgpt_jax.main --config=experiments/configs/default.py --workdir=runs/default \
      [--mode=pretrain|finetune|prompt_tune|evaluate|recommend]

Any config field can be overridden with ``--config.<field>=<value>``. Multi-process runs add
``--coordinator_address=host:port --num_processes=N --process_id=i`` (or ``--distributed=auto`` on TPU
VMs and under SLURM); see launch/README.md. Modes: ``pretrain`` trains (resuming
from the workdir's checkpoint if present) and then evaluates the best model; ``prompt_tune`` does the same
for RecGPT's prompt-tuning stage, starting from the pre-training workdir ``--config.init_from``; ``finetune``
is prompt-tuning without prompts (the control), also from ``--config.init_from``;
``evaluate`` only evaluates the workdir's model. User errors (bad data, config or flags) are reported as
one line with exit code 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from recgpt_jax import errors
from recgpt_jax.errors import UserError

MODES = ("pretrain", "finetune", "prompt_tune", "evaluate", "recommend")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "pretrain", MODES, "What to do.")
_USERS = flags.DEFINE_list("users", [], "recommend: user ids to serve, as in the data file (raw ids of a log).")
_HISTORY = flags.DEFINE_multi_string(
  "history",
  [],
  "recommend: an item history 'i1,i2,...' (oldest first) of an unknown user, item ids as in the data file and the"
  " printed results (raw ids of an interaction log); repeatable.",
)
_EXPORT = flags.DEFINE_string("export", None, "recommend: write every user's recommendations to this CSV.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "Multi-process run: host:port of process 0 (env RECGPT_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this process, 0..num_processes-1.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed", "off", ("off", "auto"), "'auto': jax.distributed.initialize() from the TPU/SLURM environment."
)
_ALLOCATOR = flags.DEFINE_enum(
  "allocator",
  "auto",
  ("auto", "tcmalloc", "system"),
  "Memory allocator: 'auto' re-runs the command on tcmalloc when the machine has it (CPU steps page-fault"
  " their buffers every step under glibc malloc; see recgpt_jax/allocator.py), 'system' keeps glibc.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _recommend(config) -> None:
  from recgpt_jax import recommend
  from recgpt_jax.errors import UserError

  if not (_USERS.value or _HISTORY.value or _EXPORT.value):
    raise UserError("--mode=recommend needs --users, --history or --export")
  for h in _HISTORY.value:
    if not [x for x in h.replace(" ", ",").split(",") if x.strip()]:
      raise UserError(f"--history={h!r} has no item ids; give 'i1,i2,...'")
  if _EXPORT.value:
    recommend.check_export_path(_EXPORT.value)  # before anything is computed
  rec = recommend.Recommender(config, _WORKDIR.value)
  # --users and --history take the ids of the data file (raw ids of an interaction log), as printed below.
  users = [rec.parse_user(u) for u in _USERS.value]
  histories = []
  for h in _HISTORY.value:
    try:
      histories.append([rec.item_id(rec.parse_item(x)) for x in h.replace(" ", ",").split(",") if x.strip()])
    except UserError as e:
      raise UserError(f"--history={h!r}: {e}") from None
  results = []
  if users:
    results.append(rec.for_users(users))
  if histories:
    results.append(rec.for_histories(histories, dense=True))
  for r in results:
    for i, (u, items, scores, steps) in enumerate(zip(r.users, r.items, r.scores, r.steps, strict=True)):
      who = f"user {rec.raw_user(int(u))}" if u else f"history {i + 1}"
      print(
        f"{who}: "
        + " ".join(f"{rec.raw_item(it)}:{sc:.3f}@{st}" for it, sc, st in zip(items, scores, steps, strict=True))
      )
  if _EXPORT.value:
    n = rec.export(_EXPORT.value)
    print(f"wrote recommendations of {n} users to {_EXPORT.value}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)", file=sys.stderr)
    sys.exit(2)
  logging.set_verbosity(logging.WARNING)
  from recgpt_jax import allocator

  try:
    allocator.use(_ALLOCATOR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  from recgpt_jax.train import loop  # heavy imports after flag parsing, so --help is fast
  from recgpt_jax.train import workdir as workdir_lib

  try:
    config = _CONFIG.value
    config.name  # noqa: B018 (a config that failed to load raises on first access)
  except Exception as e:  # noqa: BLE001 (any failure to load the user's config file is a user error)
    detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    print(f"error: cannot load --config: {detail[-1] if detail else type(e).__name__}", file=sys.stderr)
    sys.exit(2)
  try:
    from recgpt_jax.parallel import distributed

    joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    if joined and not distributed.is_primary():  # process 0 reports; the others only print errors
      sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    workdir_lib.check_path(_WORKDIR.value)
    if _MODE.value in loop.TRAIN_STAGES:
      loop.train_and_evaluate(config, _WORKDIR.value, _MODE.value)
    elif _MODE.value == "evaluate":
      loop.evaluate_only(config, _WORKDIR.value)
    else:
      _recommend(config)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
    sys.exit(130)


def run() -> None:
  app.run(main, flags_parser=errors.parse_flags_or_exit)


if __name__ == "__main__":
  run()
