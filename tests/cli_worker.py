"""Runs many ``python -m recgpt_jax.main ...`` commands in one long-lived process (tests only).

A fresh interpreter per command costs seconds of imports and JAX start-up; the error paths under test take
milliseconds. The worker reads one JSON list of arguments per line on stdin and answers one JSON line
``{"rc": exit code, "stdout": ..., "stderr": ...}``. Each command runs as the command line runs it: flags parsed by
``errors.parse_flags_or_exit`` (which reads ``sys.argv`` for the ``--config.*`` overrides), then ``main.main``; an
uncaught exception prints its traceback and gives exit code 1, as the interpreter would. File descriptors 1 and 2
are redirected for the command, so output written below Python (XLA, absl's C++ logging) is captured too.
``--allocator=system`` is added (``auto`` would re-execute the worker on tcmalloc).

Start it with ``python -m tests.cli_worker`` from the repository root; ``CliWorker`` (tests/helpers.py) drives it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

PROG = "recgpt_jax.main"


def _run(args: list[str]) -> int:
  from absl import flags

  from recgpt_jax import errors, main

  for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # the last command's --config.<field> overrides
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  # ml_collections loads a config file as the module `<flag>_config`; a stale one would lend the next file the
  # attributes it lacks (a get_config).
  sys.modules.pop("config_config", None)
  sys.argv = [PROG, "--allocator=system", *args]
  try:
    remaining = errors.parse_flags_or_exit(list(sys.argv))
    main.main(remaining)
  except SystemExit as e:
    if e.code is None:
      return 0
    if isinstance(e.code, int):
      return e.code
    print(e.code, file=sys.stderr)
    return 1
  except BaseException:  # noqa: BLE001 (reported as the interpreter would)
    traceback.print_exc()
    return 1
  return 0


def serve() -> None:
  replies = os.fdopen(os.dup(1), "w")
  for line in sys.stdin:
    args = json.loads(line)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
      sys.stdout.flush()
      sys.stderr.flush()
      saved = os.dup(1), os.dup(2)
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      try:
        rc = _run(args)
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
      out.seek(0)
      err.seek(0)
      reply = {"rc": rc, "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


if __name__ == "__main__":
  serve()
