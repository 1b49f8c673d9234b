"""Where a result came from: the machine's CPU and the code's git commit, recorded with every results file.

Kept free of heavy imports (no jax, no data stack), so benchmark scripts on a bare accelerator machine can use it.
"""

from __future__ import annotations

import pathlib
import platform
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
  cpu = platform.processor() or platform.machine() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  return cpu


def git_commit(root: pathlib.Path = ROOT, unknown: str = "unknown") -> str:
  """``HEAD`` of the checkout at ``root``, with ``+dirty`` when the tree has changes; ``unknown`` without git."""
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return unknown


def record_header(module: str) -> dict:
  """The provenance fields every results record starts with: the command (``python -m <module> <args>``), the UTC
  date, the CPU and the git commit."""
  import datetime
  import sys

  return {
    "command": f"python -m {module} " + " ".join(sys.argv[1:]),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "cpu": cpu_name(),
    "git_commit": git_commit(),
  }


def write_record(out_dir: str | pathlib.Path, name: str, record: dict, markdown: str) -> None:
  """Writes ``<out_dir>/<name>.json`` (the record) and ``<name>.md`` (its readable table), and prints the table."""
  import json

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
  (out / f"{name}.md").write_text(markdown)
  print(markdown)
