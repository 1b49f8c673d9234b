"""The process's memory allocator: tcmalloc when the machine has it.

On CPU, XLA allocates each step's temporary buffers afresh. With glibc's malloc the large ones are
``mmap``-ed and returned to the system every step, so the next step page-faults them in again: at the
reference configuration that is ~15,400 page faults (60 MiB of zeroed pages) per pre-training step, and
the step takes 57.9 instead of 34.4 ms (``experiments/results/profile_train_step*``). tcmalloc keeps freed memory
for reuse (1-2 MiB of faults per step). glibc's ``mallopt`` knobs do not cure it reliably (its mmap
threshold is capped at 32 MiB).

A process cannot swap its allocator once running, so ``use`` re-executes the same command with tcmalloc
in ``LD_PRELOAD`` (once; the environment marks the second run, and child processes inherit both). The
command-line entry points call it before any work; ``--allocator=system`` keeps glibc (unless the parent
already preloaded tcmalloc). The whole process is replaced, so only call it at the start of a command, not
from a notebook or a driver script; a script read from stdin is never re-executed (stdin is consumed).
"""

from __future__ import annotations

import os
import sys

from recgpt_jax.errors import UserError

CHOICES = ("auto", "tcmalloc", "system")
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
SEARCH_DIRS = (
  "/usr/lib/x86_64-linux-gnu",
  "/usr/lib/aarch64-linux-gnu",
  "/usr/lib64",
  "/usr/lib",
  "/usr/local/lib",
)
REEXEC_MARK = "RECGPT_ALLOCATOR_REEXEC"
INSTALL_HINT = "Debian/Ubuntu: apt install libtcmalloc-minimal4"


def find_tcmalloc(dirs: tuple[str, ...] = SEARCH_DIRS) -> str | None:
  """Path of a tcmalloc shared library on this machine, or None."""
  for d in dirs:
    for name in LIBRARIES:
      path = os.path.join(d, name)
      if os.path.exists(path):
        return path
  return None


def loaded(maps: str | None = None) -> str:
  """``'tcmalloc'``, ``'jemalloc'`` or ``'glibc'``: the allocator mapped into this process.

  Args:
    maps: the text of ``/proc/self/maps`` (read when None; a system without it reports ``'glibc'``).
  """
  if maps is None:
    try:
      with open("/proc/self/maps") as f:
        maps = f.read()
    except OSError:
      return "glibc"
  for name in ("tcmalloc", "jemalloc"):
    if f"lib{name}" in maps:
      return name
  return "glibc"


def use(choice: str) -> None:
  """Makes this process run on tcmalloc (``'auto'``: if found; ``'tcmalloc'``: or fail; ``'system'``: no).

  Re-executes the command (``os.execve``, same interpreter and arguments) with tcmalloc preloaded; returns
  when nothing needs doing.

  Raises:
    UserError: ``choice`` is unknown, or ``'tcmalloc'`` was asked for and the machine has none.
  """
  if choice not in CHOICES:
    raise UserError(f"--allocator must be one of {', '.join(CHOICES)}, got {choice!r}")
  if choice == "system" or loaded() == "tcmalloc":
    return
  if sys.argv[:1] in (["-"], [""]):  # a script on stdin or an interactive interpreter cannot be re-run
    if choice == "tcmalloc":
      raise UserError("--allocator=tcmalloc: cannot re-run a script read from stdin; preload it with LD_PRELOAD")
    return
  path = find_tcmalloc()
  if path is None or os.environ.get(REEXEC_MARK):
    if choice == "tcmalloc":
      why = "it did not load" if path else "no libtcmalloc found"
      raise UserError(f"--allocator=tcmalloc: {why} ({INSTALL_HINT})")
    return
  preload = " ".join(p for p in (path, os.environ.get("LD_PRELOAD", "")) if p)
  # gperftools reports every allocation over 1 GiB on stderr; a big catalogue's tables are that large.
  env = {**os.environ, "LD_PRELOAD": preload, REEXEC_MARK: "1"}
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(2**40))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])), env)
